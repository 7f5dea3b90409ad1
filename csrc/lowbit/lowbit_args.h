// SPDX-License-Identifier: Apache-2.0
// Argument checks of the low-bit ops, shared by the CPU and CUDA adapters (ATen only; each
// adapter checks devices and fills its own kernel structs).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include "tilefuse/lowbit/formats.h"

namespace tilefuse {

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline lowbit::Fmt4 parse_fmt(const char* op, c10::string_view fmt) {
  using lowbit::Fmt4;
  TORCH_CHECK_VALUE(fmt == "nf4" || fmt == "fp4" || fmt == "e2m1" || fmt == "int4", op,
                    ": fmt must be one of 'nf4', 'fp4', 'e2m1', 'int4', got '", std::string(fmt),
                    "'");
  return fmt == "nf4" ? Fmt4::kNF4
                      : (fmt == "fp4" ? Fmt4::kFP4 : (fmt == "e2m1" ? Fmt4::kE2M1 : Fmt4::kInt4));
}

inline void check_block_size(const char* op, const char* name, int64_t b) {
  TORCH_CHECK_VALUE(b >= 32 && b <= 4096 && (b & (b - 1)) == 0, op, ": ", name,
                    " must be a power of two in [32, 4096], got ", b);
}

/// log2 of a power of two.
inline int log2_pow2(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

inline void check_quantize_int8_args(const at::Tensor& w) {
  TORCH_CHECK_TYPE(is_activation_dtype(w.scalar_type()) || w.scalar_type() == at::kDouble,
                   "quantize_int8: w must be a floating tensor (float32, bfloat16, float16, "
                   "float64), got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2,
                    "quantize_int8: w must be 2-D [out_features, in_features], got shape ",
                    w.sizes());
}

/// int8_linear's checks; returns {N, K}.
inline std::pair<int64_t, int64_t> check_int8_linear_args(const at::Tensor& x,
                                                          const at::Tensor& qweight,
                                                          const at::Tensor& weight_scale,
                                                          const std::optional<at::Tensor>& bias,
                                                          double threshold) {
  TORCH_CHECK_TYPE(is_activation_dtype(x.scalar_type()),
                   "int8_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar,
                   "int8_linear: qweight must be int8 (from quantize_int8), got ",
                   qweight.scalar_type());
  TORCH_CHECK_TYPE(weight_scale.scalar_type() == at::kFloat,
                   "int8_linear: weight_scale must be float32, got ", weight_scale.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2, "int8_linear: qweight must be 2-D [N, K], got shape ",
                    qweight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1, "int8_linear: x must have at least 1 dimension");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == K, "int8_linear: x.shape[-1] (", x.size(-1),
                    ") must equal qweight in_features (", K, ")");
  TORCH_CHECK_VALUE(weight_scale.dim() == 1 && weight_scale.size(0) == N,
                    "int8_linear: weight_scale must have shape [", N, "], got ",
                    weight_scale.sizes());
  TORCH_CHECK_VALUE(K <= lowbit::kInt8MaxK, "int8_linear: in_features ", K, " exceeds ",
                    lowbit::kInt8MaxK, " (int32 accumulators could overflow)");
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0,
                    "int8_linear: threshold must be finite and >= 0, got ", threshold);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()),
                     "int8_linear: bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "int8_linear: bias must have shape [",
                      N, "], got ", bias->sizes());
  }
  return {N, K};
}

inline lowbit::Fmt4 check_quantize_4bit_args(const at::Tensor& w, c10::string_view fmt_s,
                                             int64_t block) {
  const lowbit::Fmt4 fmt = parse_fmt("quantize_4bit", fmt_s);
  check_block_size("quantize_4bit", "block_size", block);
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                   "quantize_4bit: w must be a floating tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.numel() > 0, "quantize_4bit: w must not be empty");
  return fmt;
}

inline void check_quantize_blockwise_8bit_args(const at::Tensor& x, const at::Tensor& code,
                                               int64_t block) {
  check_block_size("quantize_blockwise_8bit", "block_size", block);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "quantize_blockwise_8bit: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat,
                   "quantize_blockwise_8bit: code must be float32, got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.numel() == 256,
                    "quantize_blockwise_8bit: code must have 256 entries, got ", code.numel());
}

/// A 4-bit weight state after its checks (dtypes and sizes of every tensor; devices are the
/// adapters'): format, weight shape, number of blocks, whether absmax is double-quantised.
struct FourbitShape {
  lowbit::Fmt4 fmt;
  int64_t N, K, nblocks;
  bool nested;
};

inline FourbitShape check_4bit_state(const char* op, const at::Tensor& packed,
                                     const at::Tensor& absmax,
                                     const std::optional<at::Tensor>& zero,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& nested_offset,
                                     c10::string_view fmt_s, int64_t block, int64_t nested_block,
                                     at::IntArrayRef shape) {
  FourbitShape f;
  f.fmt = parse_fmt(op, fmt_s);
  check_block_size(op, "block_size", block);
  TORCH_CHECK_VALUE(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0, op,
                    ": shape must be the 2-D weight shape [N, K], got ", shape);
  f.N = shape[0];
  f.K = shape[1];
  const int64_t n = f.N * f.K;
  f.nblocks = ceil_div(n, block);
  const int64_t nblocks = f.nblocks;
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op,
                   ": packed must be uint8 (bitsandbytes quant_storage other than uint8: "
                   "pass packed.view(torch.uint8)), got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": packed has ", packed.numel(),
                    " bytes but shape ", shape, " needs ", (n + 1) / 2);
  f.nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(f.nested == nested_code.has_value() && f.nested == nested_offset.has_value(),
                    op, ": nested_absmax, nested_code and nested_offset must be given together");
  TORCH_CHECK_VALUE(absmax.numel() == nblocks, op, ": absmax must have one entry per block (",
                    nblocks, "), got ", absmax.numel());
  if (f.nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                     ": with double quantisation absmax must be uint8 codes, got ",
                     absmax.scalar_type());
    check_block_size(op, "nested_block_size", nested_block);
    TORCH_CHECK_TYPE(nested_absmax->scalar_type() == at::kFloat, op,
                     ": nested_absmax must be float32, got ", nested_absmax->scalar_type());
    TORCH_CHECK_VALUE(nested_absmax->numel() == ceil_div(nblocks, nested_block), op,
                      ": nested_absmax must have ", ceil_div(nblocks, nested_block),
                      " entries, got ", nested_absmax->numel());
    TORCH_CHECK_TYPE(nested_code->scalar_type() == at::kFloat, op,
                     ": nested_code must be float32, got ", nested_code->scalar_type());
    TORCH_CHECK_VALUE(nested_code->numel() == 256, op, ": nested_code must have 256 entries, got ",
                      nested_code->numel());
    TORCH_CHECK_TYPE(nested_offset->scalar_type() == at::kFloat, op,
                     ": nested_offset must be float32, got ", nested_offset->scalar_type());
    TORCH_CHECK_VALUE(nested_offset->numel() == 1, op, ": nested_offset must have one element");
  } else {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                     absmax.scalar_type());
  }
  if (f.fmt == lowbit::Fmt4::kInt4) {
    TORCH_CHECK_VALUE(zero.has_value(), op, ": fmt 'int4' needs zero (uint8 zero points)");
    TORCH_CHECK_TYPE(zero->scalar_type() == at::kByte, op, ": zero must be uint8, got ",
                     zero->scalar_type());
    TORCH_CHECK_VALUE(zero->numel() == nblocks, op, ": zero must have one entry per block (",
                      nblocks, "), got ", zero->numel());
  }
  return f;
}

/// linear_4bit's checks of x and bias against the weight shape [N, K].
inline void check_linear_4bit_args(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                   int64_t N, int64_t K) {
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(is_activation_dtype(xt) || xt == at::kDouble,
                   "linear_4bit: x must be float32, bfloat16, float16 or float64, got ", xt);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "linear_4bit: x.shape[-1] (",
                    x.dim() >= 1 ? x.size(-1) : -1, ") must equal in_features shape[1] (", K,
                    ")");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()),
                     "linear_4bit: bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N,
                      "linear_4bit: bias must have shape [", N, "], got ", bias->sizes());
  }
}

}  // namespace tilefuse
