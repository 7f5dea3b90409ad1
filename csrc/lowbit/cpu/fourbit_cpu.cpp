// SPDX-License-Identifier: Apache-2.0
// CPU adapter of the 4-bit ops: argument checks (each naming the argument), state parsing,
// allocation and kernel dispatch over ranges of blocks / output columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lowbit/lowbit_args.h"
#include "tilefuse/cpu/isa.h"
#include "tilefuse/cpu/lowbit.h"

namespace tilefuse {
namespace {

using cpu::Isa;
using lowbit::Fmt4;

bool avx2() { return cpu::current_isa() == Isa::kAvx2; }

/// Fills a Fourbit view from the op arguments, after checking every one of them.
/// The tensors it points into are returned in `keep` (contiguous copies where needed).
cpu::Fourbit parse_state(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& zero,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& nested_offset, c10::string_view fmt_s,
                         int64_t block, int64_t nested_block, at::IntArrayRef shape,
                         std::vector<at::Tensor>& keep) {
  const FourbitShape f = check_4bit_state(op, packed, absmax, zero, nested_absmax, nested_code,
                                          nested_offset, fmt_s, block, nested_block, shape);
  cpu::Fourbit w;
  w.fmt = f.fmt;
  w.N = f.N;
  w.K = f.K;
  w.block = block;
  keep.push_back(packed.contiguous());
  w.packed = keep.back().const_data_ptr<uint8_t>();
  if (f.nested) {
    w.block2 = nested_block;
    w.block2_shift = log2_pow2(nested_block);
    keep.push_back(absmax.contiguous());
    w.qabsmax = keep.back().const_data_ptr<uint8_t>();
    keep.push_back(nested_absmax->contiguous());
    w.absmax2 = keep.back().const_data_ptr<float>();
    keep.push_back(nested_code->contiguous());
    w.code2 = keep.back().const_data_ptr<float>();
    w.offset = nested_offset->item<float>();
  } else {
    keep.push_back(absmax.contiguous());
    w.absmax = keep.back().const_data_ptr<float>();
  }
  if (w.fmt == Fmt4::kInt4) {
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
  const Fmt4 fmt = check_quantize_4bit_args(w, fmt_s, block);
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
  check_quantize_blockwise_8bit_args(x, code, block);
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
  check_linear_4bit_args(x, bias, w.N, w.K);
  const auto xt = x.scalar_type();
  TORCH_CHECK_VALUE(x.device().is_cpu(), "linear_4bit: the CPU kernel got x on ", x.device());
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
