// SPDX-License-Identifier: Apache-2.0
// CPU adapter of the int8 ops: argument checks, activation quantisation buffers, LLM.int8()
// outlier columns, kernel dispatch over output-column ranges.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "lowbit/lowbit_args.h"
#include "tilefuse/cpu/isa.h"
#include "tilefuse/cpu/lowbit.h"

namespace tilefuse {
namespace {

using cpu::Isa;

void quantize_rows(const cpu::Int8QuantParams& p, int64_t rows) {
  const bool avx2 = cpu::current_isa() == Isa::kAvx2;
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    if (avx2) cpu::avx2::int8_quantize_rows(p, b, e);
    else cpu::generic::int8_quantize_rows(p, b, e);
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& w) {
  check_quantize_int8_args(w);
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor wf = w.to(at::kFloat).contiguous();
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N}, w.options().dtype(at::kFloat));
  cpu::Int8QuantParams p;
  p.x = wf.const_data_ptr<float>();
  p.K = K;
  p.ldx = K;
  p.ldq = K;
  p.q = q.mutable_data_ptr<int8_t>();
  p.scale = scale.mutable_data_ptr<float>();
  quantize_rows(p, N);
  return {q, scale};
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight,
                           const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                           double threshold) {
  const auto [N, K] = check_int8_linear_args(x, qweight, weight_scale, bias, threshold);
  for (const at::Tensor* t : {&x, &qweight, &weight_scale})
    TORCH_CHECK_VALUE(t->device().is_cpu(), "int8_linear: the CPU kernel got a tensor on ",
                      t->device());

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor qw = qweight.contiguous();
  at::Tensor ws = weight_scale.contiguous();
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();

  const int64_t lda = round_up(std::max<int64_t>(K, 1), cpu::kInt8KPad);
  at::Tensor aq = at::empty({M, lda}, x2.options().dtype(at::kChar));
  at::Tensor ascale = at::empty({M}, x2.options());

  // LLM.int8(): columns with any |x| >= threshold leave the int8 product; their contribution
  // x_o . q_o^T (weights dequantised from int8, as bitsandbytes) is added in the epilogue.
  // Few outlier products (M * n_out <= 256) are added by the kernel epilogue from the weight
  // rows it streams or packs (no gather over a cold weight); more, or any on the packed-panel
  // path with many rows, go through one fp32 GEMM on the gathered columns, which the
  // epilogue adds 8 columns at a time.
  const bool avx2 = cpu::current_isa() == Isa::kAvx2;
  const bool panels = avx2 && M >= cpu::kInt8PanelMinM;
  at::Tensor mask, extra, cols, xo;
  if (threshold > 0.0 && M > 0) {
    mask = at::empty({K}, x2.options().dtype(at::kByte));
    {
      const float* xp = x2.const_data_ptr<float>();
      uint8_t* mp = mask.mutable_data_ptr<uint8_t>();
      const float thr = static_cast<float>(threshold);
      at::parallel_for(0, K, 256, [&](int64_t b, int64_t e) {
        if (avx2) cpu::avx2::int8_outlier_mask(xp, M, K, thr, b, e, mp);
        else cpu::generic::int8_outlier_mask(xp, M, K, thr, b, e, mp);
      });
    }
    cols = mask.nonzero().view(-1).contiguous();
    if (cols.numel() > 0) {
      xo = x2.index_select(1, cols).contiguous();
      if (M * cols.numel() > 256 || (panels && M > cpu::kInt8PanelSmallM)) {
        at::Tensor wo = qw.index_select(1, cols).to(at::kFloat);
        extra = at::mm(xo, wo.t()).contiguous();
        xo = at::Tensor();
      }
    }
  }
  cpu::Int8QuantParams qp;
  qp.x = x2.const_data_ptr<float>();
  qp.K = K;
  qp.ldx = K;
  qp.ldq = lda;
  qp.threshold = static_cast<float>(threshold);
  qp.col_mask = mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr;
  qp.q = aq.mutable_data_ptr<int8_t>();
  qp.scale = ascale.mutable_data_ptr<float>();
  // The packed-panel GEMM broadcasts |q| and the sign masks of q (see int8_kernel.cpp).
  at::Tensor a_abs, a_neg, neg_sum;
  if (avx2) {
    neg_sum = at::empty({M}, x2.options().dtype(at::kInt));
    qp.neg_sum = neg_sum.mutable_data_ptr<int32_t>();
  }
  if (panels) {
    a_abs = at::empty({M, lda}, x2.options().dtype(at::kByte));
    a_neg = at::empty({M, lda}, x2.options().dtype(at::kByte));
    qp.a_abs = a_abs.mutable_data_ptr<uint8_t>();
    qp.a_neg = a_neg.mutable_data_ptr<uint8_t>();
  }
  quantize_rows(qp, M);

  at::Tensor out = at::empty({M, N}, x2.options());
  cpu::Int8GemmParams p;
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
  p.out = out.mutable_data_ptr<float>();
  p.M = M;
  p.N = N;
  p.K = K;
  p.lda = lda;
  if (neg_sum.defined()) p.neg_sum = neg_sum.const_data_ptr<int32_t>();
  if (a_abs.defined()) {
    p.a_abs = a_abs.const_data_ptr<uint8_t>();
    p.a_neg = a_neg.const_data_ptr<uint8_t>();
  }
  constexpr int64_t kTask = 64;  // output columns per task, a multiple of the tile widths
  at::parallel_for(0, ceil_div(N, kTask), 1, [&](int64_t b, int64_t e) {
    const int64_t n0 = b * kTask, n1 = std::min(N, e * kTask);
    if (avx2) cpu::avx2::int8_gemm(p, n0, n1);
    else cpu::generic::int8_gemm(p, n0, n1);
  });
  return out.to(x.scalar_type()).view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CPU, m) {
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
}

}  // namespace tilefuse
