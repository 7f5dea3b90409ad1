// SPDX-License-Identifier: Apache-2.0
// CUDA adapter of the low-bit ops (schemas in csrc/lowbit/lowbit.cpp): the CPU adapters'
// argument checks (same messages; csrc/lowbit/cpu/{int8,fourbit}_cpu.cpp), plus "every tensor
// on the same CUDA device", allocation, and the launches of csrc/lowbit/cuda/kernels/ on the
// current stream. Semantics are the CPU ops' (docs/lowbit.md); where the CUDA path differs
// (linear_4bit with more than 8 activation rows) it says so below.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tilefuse/cuda/lowbit.h"

namespace tilefuse {
namespace {

using cuda::LowbitDtype;
using lowbit::Fmt4;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

LowbitDtype lowbit_dtype(at::ScalarType t) {
  return t == at::kHalf ? LowbitDtype::kFloat16
                        : (t == at::kBFloat16 ? LowbitDtype::kBFloat16 : LowbitDtype::kFloat32);
}

/// Every tensor of a call must be on the CUDA device of the first one (`dev`).
void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": the CUDA kernel got ", name, " on ", t.device(),
                    " (all tensors must be on the same CUDA device)");
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", name, " is on ", t.device(),
                    " but the other tensors are on ", dev);
}

// ------------------------------------------------------------------------------------ int8

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& w) {
  TORCH_CHECK_TYPE(is_activation_dtype(w.scalar_type()) || w.scalar_type() == at::kDouble,
                   "quantize_int8: w must be a floating tensor (float32, bfloat16, float16, "
                   "float64), got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2,
                    "quantize_int8: w must be 2-D [out_features, in_features], got shape ",
                    w.sizes());
  check_device("quantize_int8", "w", w, w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t N = w.size(0), K = w.size(1);
  // float64 is rounded to fp32 first (as the CPU op); the other dtypes are read as they are.
  at::Tensor wc = (w.scalar_type() == at::kDouble ? w.to(at::kFloat) : w).contiguous();
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N}, w.options().dtype(at::kFloat));
  cuda::Int8QuantArgs p;
  p.x = wc.const_data_ptr();
  p.x_dtype = lowbit_dtype(wc.scalar_type());
  p.rows = N;
  p.K = K;
  p.ldx = K;
  p.ldq = K;
  p.q = q.mutable_data_ptr<int8_t>();
  p.scale = scale.mutable_data_ptr<float>();
  cuda::int8_quantize_rows(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale};
}

/// LLM.int8() outlier columns up to which the GEMM epilogue adds the outlier products itself
/// (n_out multiply-adds per output); more go through one fp32 at::mm of the gathered columns.
constexpr int64_t kFusedOutliers = 16;

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
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
  TORCH_CHECK_VALUE(K <= cuda::kInt8MaxK, "int8_linear: in_features ", K, " exceeds ",
                    cuda::kInt8MaxK, " (int32 accumulators could overflow)");
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0,
                    "int8_linear: threshold must be finite and >= 0, got ", threshold);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()),
                     "int8_linear: bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "int8_linear: bias must have shape [",
                      N, "], got ", bias->sizes());
  }
  const at::Device dev = x.device();
  check_device("int8_linear", "x", x, dev);
  check_device("int8_linear", "qweight", qweight, dev);
  check_device("int8_linear", "weight_scale", weight_scale, dev);
  if (bias.has_value()) check_device("int8_linear", "bias", *bias, dev);
  const c10::cuda::CUDAGuard guard(dev);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).contiguous();  // read in its own dtype by the quantiser
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x2.options());
  if (M == 0 || N == 0) return out.view(out_shape);
  at::Tensor qw = qweight.contiguous();
  at::Tensor ws = weight_scale.contiguous();
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();

  const int64_t lda = round_up(std::max<int64_t>(K, 1), cuda::kInt8KPad);
  at::Tensor aq = at::empty({M, lda}, x2.options().dtype(at::kChar));
  at::Tensor ascale = at::empty({M}, x2.options().dtype(at::kFloat));

  // LLM.int8(): columns with any |x| >= threshold (compared in fp32, as the CPU op) leave the
  // int8 product; their contribution x_o . q_o^T (weights dequantised from int8) is added in
  // the epilogue. nonzero() synchronises with the device (the column count sizes the buffers).
  at::Tensor mask, extra, cols, xo;
  if (threshold > 0.0 && K > 0) {
    at::Tensor xf = x2.to(at::kFloat);
    mask = (xf.abs() >= threshold).any(0);
    cols = mask.nonzero().view(-1).contiguous();
    if (cols.numel() > 0) {
      xo = xf.index_select(1, cols).contiguous();
      if (cols.numel() > kFusedOutliers) {
        // Plain fp32 GEMM (TF32 only if the user enabled it for fp32 matmuls).
        at::Tensor wo = qw.index_select(1, cols).to(at::kFloat);
        extra = at::mm(xo, wo.t()).contiguous();
        xo = at::Tensor();
      }
    }
    mask = mask.to(at::kByte).contiguous();
  }
  const cudaStream_t stream = current_stream();
  cuda::Int8QuantArgs qp;
  qp.x = x2.const_data_ptr();
  qp.x_dtype = lowbit_dtype(x2.scalar_type());
  qp.rows = M;
  qp.K = K;
  qp.ldx = K;
  qp.ldq = lda;
  qp.threshold = static_cast<float>(threshold);
  qp.col_mask = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
  qp.q = aq.mutable_data_ptr<int8_t>();
  qp.scale = ascale.mutable_data_ptr<float>();
  cuda::int8_quantize_rows(qp, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cuda::Int8GemmArgs p;
  p.a = aq.const_data_ptr<int8_t>();
  p.a_scale = ascale.const_data_ptr<float>();
  p.w = qw.const_data_ptr<int8_t>();
  p.w_scale = ws.const_data_ptr<float>();
  p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  p.extra = extra.defined() ? extra.const_data_ptr<float>() : nullptr;
  if (xo.defined()) {
    p.out_cols = cols.const_data_ptr<int64_t>();
    p.x_out = xo.const_data_ptr<float>();
    p.n_out = cols.numel();
  }
  p.out = out.mutable_data_ptr();
  p.out_dtype = lowbit_dtype(out.scalar_type());
  p.M = M;
  p.N = N;
  p.K = K;
  p.lda = lda;
  cuda::int8_gemm(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(out_shape);
}

// ----------------------------------------------------------------------------------- 4-bit

Fmt4 parse_fmt(const char* op, c10::string_view fmt) {
  TORCH_CHECK_VALUE(fmt == "nf4" || fmt == "fp4" || fmt == "e2m1" || fmt == "int4", op,
                    ": fmt must be one of 'nf4', 'fp4', 'e2m1', 'int4', got '", std::string(fmt),
                    "'");
  return fmt == "nf4" ? Fmt4::kNF4
                      : (fmt == "fp4" ? Fmt4::kFP4 : (fmt == "e2m1" ? Fmt4::kE2M1 : Fmt4::kInt4));
}

void check_block_size(const char* op, const char* name, int64_t b) {
  TORCH_CHECK_VALUE(b >= 32 && b <= 4096 && (b & (b - 1)) == 0, op, ": ", name,
                    " must be a power of two in [32, 4096], got ", b);
}

int log2_pow2(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

/// The CPU adapter's parse_state (same checks, same messages) plus device checks: fills a
/// Fourbit4 of device pointers; the tensors it points into are kept alive in `keep`.
cuda::Fourbit4 parse_state(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& zero,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset,
                           c10::string_view fmt_s, int64_t block, int64_t nested_block,
                           at::IntArrayRef shape, std::vector<at::Tensor>& keep) {
  cuda::Fourbit4 w;
  w.fmt = parse_fmt(op, fmt_s);
  check_block_size(op, "block_size", block);
  TORCH_CHECK_VALUE(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0, op,
                    ": shape must be the 2-D weight shape [N, K], got ", shape);
  w.N = shape[0];
  w.K = shape[1];
  w.block = block;
  w.block_shift = log2_pow2(block);
  const int64_t n = w.N * w.K, nblocks = ceil_div(n, block);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op,
                   ": packed must be uint8 (bitsandbytes quant_storage other than uint8: "
                   "pass packed.view(torch.uint8)), got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() == (n + 1) / 2, op, ": packed has ", packed.numel(),
                    " bytes but shape ", shape, " needs ", (n + 1) / 2);
  const at::Device dev = packed.device();
  check_device(op, "packed", packed, dev);
  keep.push_back(packed.contiguous());
  w.packed = keep.back().const_data_ptr<uint8_t>();
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == nested_offset.has_value(), op,
                    ": nested_absmax, nested_code and nested_offset must be given together");
  TORCH_CHECK_VALUE(absmax.numel() == nblocks, op, ": absmax must have one entry per block (",
                    nblocks, "), got ", absmax.numel());
  check_device(op, "absmax", absmax, dev);
  if (nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, op,
                     ": with double quantisation absmax must be uint8 codes, got ",
                     absmax.scalar_type());
    check_block_size(op, "nested_block_size", nested_block);
    w.block2_shift = log2_pow2(nested_block);
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
    check_device(op, "nested_absmax", *nested_absmax, dev);
    check_device(op, "nested_code", *nested_code, dev);
    check_device(op, "nested_offset", *nested_offset, dev);
    keep.push_back(absmax.contiguous());
    w.qabsmax = keep.back().const_data_ptr<uint8_t>();
    keep.push_back(nested_absmax->contiguous());
    w.absmax2 = keep.back().const_data_ptr<float>();
    keep.push_back(nested_code->contiguous());
    w.code2 = keep.back().const_data_ptr<float>();
    keep.push_back(nested_offset->contiguous());
    w.offset = keep.back().const_data_ptr<float>();
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
    check_device(op, "zero", *zero, dev);
    keep.push_back(zero->contiguous());
    w.zero = keep.back().const_data_ptr<uint8_t>();
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& w,
                                                                  c10::string_view fmt_s,
                                                                  int64_t block) {
  const Fmt4 fmt = parse_fmt("quantize_4bit", fmt_s);
  check_block_size("quantize_4bit", "block_size", block);
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                   "quantize_4bit: w must be a floating tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.numel() > 0, "quantize_4bit: w must not be empty");
  check_device("quantize_4bit", "w", w, w.device());
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor wf = w.to(at::kFloat).contiguous().view(-1);
  const int64_t n = wf.numel(), nblocks = ceil_div(n, block);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, wf.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, wf.options());
  at::Tensor zero = at::empty({fmt == Fmt4::kInt4 ? nblocks : 0}, wf.options().dtype(at::kByte));
  cuda::quantize_4bit(wf.const_data_ptr<float>(), n, block, fmt,
                      packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(),
                      fmt == Fmt4::kInt4 ? zero.mutable_data_ptr<uint8_t>() : nullptr,
                      current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, absmax, zero};
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& x,
                                                                const at::Tensor& code,
                                                                int64_t block) {
  check_block_size("quantize_blockwise_8bit", "block_size", block);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "quantize_blockwise_8bit: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat,
                   "quantize_blockwise_8bit: code must be float32, got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.numel() == 256,
                    "quantize_blockwise_8bit: code must have 256 entries, got ", code.numel());
  check_device("quantize_blockwise_8bit", "x", x, x.device());
  check_device("quantize_blockwise_8bit", "code", code, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xf = x.to(at::kFloat).contiguous().view(-1);
  at::Tensor c = code.contiguous();
  const int64_t n = xf.numel(), nblocks = ceil_div(n, block);
  at::Tensor q = at::empty(x.sizes(), xf.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, xf.options());
  cuda::quantize_blockwise8(xf.const_data_ptr<float>(), n, block, c.const_data_ptr<float>(),
                            q.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(),
                            current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, absmax};
}

/// dequant(w) as an [N, K] tensor of `dtype` (fp32 / fp16 / bf16 written by the kernel, others
/// converted from fp32, which rounds the same way as the CPU op's fp32-then-.to(dtype)).
at::Tensor dequantize_to(const cuda::Fourbit4& w, const at::TensorOptions& opts,
                         at::ScalarType dtype) {
  const bool direct = is_activation_dtype(dtype);
  at::Tensor out = at::empty({w.N, w.K}, opts.dtype(direct ? dtype : at::kFloat));
  cuda::dequantize_4bit(w, out.mutable_data_ptr(), lowbit_dtype(out.scalar_type()),
                        current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return direct ? out : out.to(dtype);
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                                const std::optional<at::Tensor>& zero,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& nested_offset,
                                c10::string_view fmt, int64_t block, int64_t nested_block,
                                at::IntArrayRef shape, at::ScalarType dtype) {
  std::vector<at::Tensor> keep;
  const cuda::Fourbit4 w = parse_state("dequantize_4bit", packed, absmax, zero, nested_absmax,
                                       nested_code, nested_offset, fmt, block, nested_block,
                                       shape, keep);
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "dequantize_4bit: dtype must be floating, got ",
                   dtype);
  const c10::cuda::CUDAGuard guard(packed.device());
  return dequantize_to(w, packed.options(), dtype);
}

at::Tensor linear_4bit_cuda(const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const std::optional<at::Tensor>& zero,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code,
                            const std::optional<at::Tensor>& nested_offset, c10::string_view fmt,
                            int64_t block, int64_t nested_block, at::IntArrayRef shape,
                            const std::optional<at::Tensor>& bias) {
  std::vector<at::Tensor> keep;
  const cuda::Fourbit4 w = parse_state("linear_4bit", packed, absmax, zero, nested_absmax,
                                       nested_code, nested_offset, fmt, block, nested_block,
                                       shape, keep);
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf || xt == at::kDouble,
                   "linear_4bit: x must be float32, bfloat16, float16 or float64, got ", xt);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == w.K, "linear_4bit: x.shape[-1] (",
                    x.dim() >= 1 ? x.size(-1) : -1, ") must equal in_features shape[1] (", w.K,
                    ")");
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()),
                     "linear_4bit: bias must be a floating tensor, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.N,
                      "linear_4bit: bias must have shape [", w.N, "], got ", bias->sizes());
  }
  const at::Device dev = packed.device();
  check_device("linear_4bit", "x", x, dev);
  if (bias.has_value()) check_device("linear_4bit", "bias", *bias, dev);
  const c10::cuda::CUDAGuard guard(dev);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.N;
  if (xt == at::kDouble) {
    // float64 exists for gradcheck: the dequantised fp32 weights are exact in double.
    at::Tensor y = at::matmul(x, dequantize_to(w, packed.options(), at::kDouble).t());
    if (bias.has_value()) y = y + bias->to(at::kDouble);
    return y;
  }
  at::Tensor x2 = x.reshape({-1, w.K});
  const int64_t M = x2.size(0);
  if (M == 0 || w.N == 0) return at::empty(out_shape, x.options());
  if (M > cuda::kLinear4bitGemvMaxM && (xt == at::kHalf || xt == at::kBFloat16)) {
    // More than 8 rows of fp16 / bf16 activations: the fused dequantise-GEMM (tensor cores,
    // fp32 accumulation; each weight is its fp32 dequantised value rounded once to the
    // activation dtype, unlike the CPU op, which keeps it in fp32).
    at::Tensor xc = x2.contiguous();
    at::Tensor b32;
    if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
    at::Tensor out = at::empty({M, w.N}, xc.options());
    cuda::Linear4bitGemvArgs p;
    p.w = w;
    p.x = xc.const_data_ptr();
    p.M = M;
    p.ldx = w.K;
    p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
    p.out = out.mutable_data_ptr();
    p.dtype = lowbit_dtype(xt);
    cuda::linear_4bit_gemm(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out.view(out_shape);
  }
  if (M > cuda::kLinear4bitGemvMaxM) {
    // More than 8 rows of fp32 activations: the weight is dequantised to fp32 by the kernel
    // above and multiplied by cuBLAS (an fp32 GEMM, TF32 only if the user enabled it). Costs
    // one [N, K] fp32 buffer per call.
    at::Tensor wd = dequantize_to(w, packed.options(), xt);
    at::Tensor y = bias.has_value() ? at::addmm(bias->to(xt), x2, wd.t()) : at::mm(x2, wd.t());
    return y.view(out_shape);
  }
  // Few rows: the fused dequantise-GEMV (fp32 accumulation, fp32 bias, one rounding at the end).
  x2 = x2.contiguous();
  if (reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 != 0) x2 = x2.clone();  // 16 B loads
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, w.N}, x2.options());
  cuda::Linear4bitGemvArgs p;
  p.w = w;
  p.x = x2.const_data_ptr();
  p.M = M;
  p.ldx = w.K;
  p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.dtype = lowbit_dtype(xt);
  cuda::linear_4bit_gemv(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CUDA, m) {
  m.impl("quantize_int8", &quantize_int8_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("linear_4bit", &linear_4bit_cuda);
}

}  // namespace tilefuse
