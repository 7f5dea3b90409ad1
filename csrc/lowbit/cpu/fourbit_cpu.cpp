// SPDX-License-Identifier: Apache-2.0
// CPU adapter of the 4-bit ops: argument checks (each naming the argument), state parsing,
// allocation and kernel dispatch over ranges of blocks / output columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "tilefuse/cpu/isa.h"
#include "tilefuse/cpu/lowbit.h"

namespace tilefuse {
namespace {

using cpu::Isa;
using lowbit::Fmt4;

bool avx2() { return cpu::current_isa() == Isa::kAvx2; }

Fmt4 parse_fmt(const char* op, c10::string_view fmt) {
  if (fmt == "nf4") return Fmt4::kNF4;
  if (fmt == "fp4") return Fmt4::kFP4;
  if (fmt == "e2m1") return Fmt4::kE2M1;
  if (fmt == "int4") return Fmt4::kInt4;
  TORCH_CHECK_VALUE(false, op, ": fmt must be one of 'nf4', 'fp4', 'e2m1', 'int4', got '",
                    std::string(fmt), "'");
}

void check_block_size(const char* op, const char* name, int64_t b) {
  TORCH_CHECK_VALUE(b >= 32 && b <= 4096 && (b & (b - 1)) == 0, op, ": ", name,
                    " must be a power of two in [32, 4096], got ", b);
}

/// Fills a Fourbit view from the op arguments, after checking every one of them.
/// The tensors it points into are returned in `keep` (contiguous copies where needed).
cpu::Fourbit parse_state(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& zero,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& nested_offset, c10::string_view fmt_s,
                         int64_t block, int64_t nested_block, at::IntArrayRef shape,
                         std::vector<at::Tensor>& keep) {
  cpu::Fourbit w;
  w.fmt = parse_fmt(op, fmt_s);
  check_block_size(op, "block_size", block);
  TORCH_CHECK_VALUE(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0, op,
                    ": shape must be the 2-D weight shape [N, K], got ", shape);
  w.N = shape[0];
  w.K = shape[1];
  w.block = block;
  const int64_t n = w.N * w.K, nblocks = ceil_div(n, block);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op,
                   ": packed must be uint8 (bitsandbytes quant_storage other than uint8: "
                   "pass packed.view(torch.uint8)), got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": packed has ", packed.numel(),
                    " bytes but shape ", shape, " needs ", (n + 1) / 2);
  keep.push_back(packed.contiguous());
  w.packed = keep.back().const_data_ptr<uint8_t>();
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == nested_offset.has_value(), op,
                    ": nested_absmax, nested_code and nested_offset must be given together");
  TORCH_CHECK_VALUE(absmax.numel() == nblocks, op, ": absmax must have one entry per block (",
                    nblocks, "), got ", absmax.numel());
  if (nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                     ": with double quantisation absmax must be uint8 codes, got ",
                     absmax.scalar_type());
    check_block_size(op, "nested_block_size", nested_block);
    w.block2 = nested_block;
    w.block2_shift = 0;
    while ((int64_t(1) << w.block2_shift) < nested_block) ++w.block2_shift;
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
    keep.push_back(absmax.contiguous());
    w.qabsmax = keep.back().const_data_ptr<uint8_t>();
    keep.push_back(nested_absmax->contiguous());
    w.absmax2 = keep.back().const_data_ptr<float>();
    keep.push_back(nested_code->contiguous());
    w.code2 = keep.back().const_data_ptr<float>();
    w.offset = nested_offset->item<float>();
  } else {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                     absmax.scalar_type());
    keep.push_back(absmax.contiguous());
    w.absmax = keep.back().const_data_ptr<float>();
  }
  if (w.fmt == Fmt4::kInt4) {
    TORCH_CHECK_VALUE(zero.has_value(), op, ": fmt 'int4' needs zero (uint8 zero points)");
    TORCH_CHECK_TYPE(zero->scalar_type() == at::kByte, op, ": zero must be uint8, got ",
                     zero->scalar_type());
    TORCH_CHECK_VALUE(zero->numel() == nblocks, op, ": zero must have one entry per block (",
                      nblocks, "), got ", zero->numel());
    keep.push_back(zero->contiguous());
    w.zero = keep.back().const_data_ptr<uint8_t>();
  }
  for (const at::Tensor& t : keep)
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": the CPU kernel got a tensor on ", t.device());
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& w,
                                                                 c10::string_view fmt_s,
                                                                 int64_t block) {
  const Fmt4 fmt = parse_fmt("quantize_4bit", fmt_s);
  check_block_size("quantize_4bit", "block_size", block);
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                   "quantize_4bit: w must be a floating tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.numel() > 0, "quantize_4bit: w must not be empty");
  at::Tensor wf = w.to(at::kFloat).contiguous().view(-1);
  const int64_t n = wf.numel(), nblocks = ceil_div(n, block);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, wf.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, wf.options());
  at::Tensor zero = at::empty({fmt == Fmt4::kInt4 ? nblocks : 0}, wf.options().dtype(at::kByte));
  const float* x = wf.const_data_ptr<float>();
  uint8_t* pk = packed.mutable_data_ptr<uint8_t>();
  float* am = absmax.mutable_data_ptr<float>();
  uint8_t* zp = fmt == Fmt4::kInt4 ? zero.mutable_data_ptr<uint8_t>() : nullptr;
  const bool a = avx2();
  at::parallel_for(0, nblocks, 64, [&](int64_t b, int64_t e) {
    if (a) cpu::avx2::quantize_4bit(x, n, block, fmt, pk, am, zp, b, e);
    else cpu::generic::quantize_4bit(x, n, block, fmt, pk, am, zp, b, e);
  });
  return {packed, absmax, zero};
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& x,
                                                               const at::Tensor& code,
                                                               int64_t block) {
  check_block_size("quantize_blockwise_8bit", "block_size", block);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "quantize_blockwise_8bit: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat,
                   "quantize_blockwise_8bit: code must be float32, got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.numel() == 256,
                    "quantize_blockwise_8bit: code must have 256 entries, got ", code.numel());
  at::Tensor xf = x.to(at::kFloat).contiguous().view(-1);
  at::Tensor c = code.contiguous();
  const int64_t n = xf.numel(), nblocks = ceil_div(n, block);
  at::Tensor q = at::empty(x.sizes(), xf.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, xf.options());
  const float* xp = xf.const_data_ptr<float>();
  const float* cp = c.const_data_ptr<float>();
  uint8_t* qp = q.mutable_data_ptr<uint8_t>();
  float* am = absmax.mutable_data_ptr<float>();
  at::parallel_for(0, nblocks, 16, [&](int64_t b, int64_t e) {
    cpu::generic::quantize_blockwise8(xp, n, block, cp, qp, am, b, e);
  });
  return {q, absmax};
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& zero,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& nested_offset,
                               c10::string_view fmt, int64_t block, int64_t nested_block,
                               at::IntArrayRef shape, at::ScalarType dtype) {
  std::vector<at::Tensor> keep;
  const cpu::Fourbit w = parse_state("dequantize_4bit", packed, absmax, zero, nested_absmax,
                                     nested_code, nested_offset, fmt, block, nested_block, shape,
                                     keep);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dequantize_4bit: dtype must be floating, got ",
                   dtype);
  at::Tensor out = at::empty({w.N, w.K}, packed.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  const bool a = avx2();
  at::parallel_for(0, w.N * w.K, 1 << 14, [&](int64_t b, int64_t e) {
    if (a) cpu::avx2::dequantize_4bit(w, o, b, e);
    else cpu::generic::dequantize_4bit(w, o, b, e);
  });
  return out.to(dtype);
}

at::Tensor linear_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& zero,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset, c10::string_view fmt,
                           int64_t block, int64_t nested_block, at::IntArrayRef shape,
                           const std::optional<at::Tensor>& bias) {
  std::vector<at::Tensor> keep;
  const cpu::Fourbit w = parse_state("linear_4bit", packed, absmax, zero, nested_absmax,
                                     nested_code, nested_offset, fmt, block, nested_block, shape,
                                     keep);
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf || xt == at::kDouble,
                   "linear_4bit: x must be float32, bfloat16, float16 or float64, got ", xt);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == w.K, "linear_4bit: x.shape[-1] (",
                    x.dim() >= 1 ? x.size(-1) : -1, ") must equal in_features shape[1] (", w.K,
                    ")");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "linear_4bit: the CPU kernel got x on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()),
                     "linear_4bit: bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.N,
                      "linear_4bit: bias must have shape [", w.N, "], got ", bias->sizes());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.N;
  if (xt == at::kDouble) {
    // float64 exists for gradcheck: the dequantised fp32 weights are exact in double.
    at::Tensor wd = dequantize_4bit_cpu(packed, absmax, zero, nested_absmax, nested_code,
                                        nested_offset, fmt, block, nested_block, shape,
                                        at::kDouble);
    at::Tensor y = at::matmul(x, wd.t());
    if (bias.has_value()) y = y + bias->to(at::kDouble);
    return y;
  }
  at::Tensor x2 = x.reshape({-1, w.K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0), Kp = round_up(std::max<int64_t>(w.K, 1), 32);
  const int64_t ldxp = cpu::linear_4bit_ldxp(Kp);
  at::Tensor xp = at::empty({M, ldxp}, x2.options());
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, w.N}, x2.options());
  const bool a = avx2();
  if (a) cpu::avx2::linear_4bit_prepare_x(x2.const_data_ptr<float>(), M, w.K, w.K,
                                          xp.mutable_data_ptr<float>(), Kp, w.fmt, w.block);
  else cpu::generic::linear_4bit_prepare_x(x2.const_data_ptr<float>(), M, w.K, w.K,
                                           xp.mutable_data_ptr<float>(), Kp, w.fmt, w.block);
  cpu::Linear4bitParams p;
  p.w = w;
  p.xp = xp.const_data_ptr<float>();
  p.M = M;
  p.Kp = Kp;
  p.ldxp = ldxp;
  p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr<float>();
  constexpr int64_t kTask = cpu::kLinear4bitTileN;
  at::parallel_for(0, ceil_div(w.N, kTask), 1, [&](int64_t b, int64_t e) {
    const int64_t n0 = b * kTask, n1 = std::min(w.N, e * kTask);
    // Few activation rows: the fused GEMV streams each weight row once (when it applies).
    if (a) {
      if (!cpu::avx2::linear_4bit_gemv(p, n0, n1)) cpu::avx2::linear_4bit(p, n0, n1);
    } else {
      cpu::generic::linear_4bit(p, n0, n1);
    }
  });
  return out.to(xt).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("linear_4bit", &linear_4bit_cpu);
}

}  // namespace tilefuse
