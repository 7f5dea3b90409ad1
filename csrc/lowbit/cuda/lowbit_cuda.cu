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

#include "lowbit/lowbit_args.h"
#include "tilefuse/cuda/lowbit.h"

namespace tilefuse {
namespace {

using cuda::LowbitDtype;
using lowbit::Fmt4;

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

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
  check_quantize_int8_args(w);
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
  const auto [N, K] = check_int8_linear_args(x, qweight, weight_scale, bias, threshold);
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

/// check_4bit_state (lowbit/lowbit_args.h, shared with the CPU adapter) plus device checks:
/// fills a Fourbit4 of device pointers; the tensors it points into are kept alive in `keep`.
cuda::Fourbit4 parse_state(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& zero,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& nested_offset,
                           c10::string_view fmt_s, int64_t block, int64_t nested_block,
                           at::IntArrayRef shape, std::vector<at::Tensor>& keep) {
  const FourbitShape f = check_4bit_state(op, packed, absmax, zero, nested_absmax, nested_code,
                                          nested_offset, fmt_s, block, nested_block, shape);
  const at::Device dev = packed.device();
  check_device(op, "packed", packed, dev);
  check_device(op, "absmax", absmax, dev);
  cuda::Fourbit4 w;
  w.fmt = f.fmt;
  w.N = f.N;
  w.K = f.K;
  w.block = block;
  w.block_shift = log2_pow2(block);
  keep.push_back(packed.contiguous());
  w.packed = keep.back().const_data_ptr<uint8_t>();
  if (f.nested) {
    check_device(op, "nested_absmax", *nested_absmax, dev);
    check_device(op, "nested_code", *nested_code, dev);
    check_device(op, "nested_offset", *nested_offset, dev);
    w.block2_shift = log2_pow2(nested_block);
    keep.push_back(absmax.contiguous());
    w.qabsmax = keep.back().const_data_ptr<uint8_t>();
    keep.push_back(nested_absmax->contiguous());
    w.absmax2 = keep.back().const_data_ptr<float>();
    keep.push_back(nested_code->contiguous());
    w.code2 = keep.back().const_data_ptr<float>();
    keep.push_back(nested_offset->contiguous());
    w.offset = keep.back().const_data_ptr<float>();
  } else {
    keep.push_back(absmax.contiguous());
    w.absmax = keep.back().const_data_ptr<float>();
  }
  if (w.fmt == Fmt4::kInt4) {
    check_device(op, "zero", *zero, dev);
    keep.push_back(zero->contiguous());
    w.zero = keep.back().const_data_ptr<uint8_t>();
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& w,
                                                                  c10::string_view fmt_s,
                                                                  int64_t block) {
  const Fmt4 fmt = check_quantize_4bit_args(w, fmt_s, block);
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
  check_quantize_blockwise_8bit_args(x, code, block);
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
  check_linear_4bit_args(x, bias, w.N, w.K);
  const auto xt = x.scalar_type();
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
  const bool gemv = M <= cuda::kLinear4bitGemvMaxM;
  if (!gemv && xt == at::kFloat) {
    // More than 8 rows of fp32 activations: the weight is dequantised to fp32 by the kernel
    // above and multiplied by cuBLAS (an fp32 GEMM, TF32 only if the user enabled it). Costs
    // one [N, K] fp32 buffer per call.
    at::Tensor wd = dequantize_to(w, packed.options(), xt);
    at::Tensor y = bias.has_value() ? at::addmm(bias->to(xt), x2, wd.t()) : at::mm(x2, wd.t());
    return y.view(out_shape);
  }
  // The fused kernels: the dequantise-GEMV for few rows (fp32 accumulation, fp32 bias, one
  // rounding at the end), else the dequantise-GEMM for fp16 / bf16 (tensor cores, fp32
  // accumulation; each weight is its fp32 dequantised value rounded once to the activation
  // dtype, unlike the CPU op, which keeps it in fp32).
  x2 = x2.contiguous();
  if (gemv && reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 != 0)
    x2 = x2.clone();  // 16 B loads
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
  if (gemv)
    cuda::linear_4bit_gemv(p, current_stream());
  else
    cuda::linear_4bit_gemm(p, current_stream());
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
