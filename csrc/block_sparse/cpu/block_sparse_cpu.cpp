// SPDX-License-Identifier: Apache-2.0
// CPU adapter of block-sparse attention: checks, layout transpose, operands, dispatch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "block_sparse/block_sparse_args.h"
#include "cpu_operands.h"
#include "tilefuse/cpu/block_sparse.h"

namespace tilefuse {
namespace {

void check_cpu(const at::Tensor& q, const at::Tensor& counts, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), kOp, ": the CPU kernel got q on ", q.device());
  TORCH_CHECK_VALUE(counts.device().is_cpu() && indices.device().is_cpu(), kOp,
                    ": the layout must be on the CPU like q");
}

std::tuple<at::Tensor, at::Tensor> bs_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& counts,
                                              const at::Tensor& indices, int64_t bq, int64_t bk,
                                              bool causal, double scale,
                                              const std::optional<at::Tensor>& cu) {
  const BsShapes s = check_inputs(q, k, v, counts, indices, bq, bk, scale, cu);
  check_cpu(q, counts, indices);
  const auto [qc, qi] = transpose_layout(counts, indices, s.nk);
  const at::ScalarType ct = compute_type(q);
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  at::Tensor out = at::empty(out_shape, q.options().dtype(ct));
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(ct));
  if (out.numel() == 0) return {out.to(q.scalar_type()), lse};
  const at::Tensor cc = counts.contiguous(), ic = indices.contiguous();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    AttentionParams<T> p =
        sequence_params<T>(s.cu_q, s.cu_k, s.H, s.Hkv, s.Tq, s.Tk, s.D, s.Dv, scale);
    std::vector<at::Tensor> keep;
    p.q = make_operand<T>(tokens(q), p.Dp, false, keep);
    const Operand<T> k_op = make_operand<T>(tokens(k), p.Dp, false, keep);
    at::Tensor ktb = transposed(k_op, s.Hkv, p.Tk, s.D, q.options());
    panel_major_v(tokens(v), p, keep);  // every key block is read by its query blocks
    p.kt = ktb.const_data_ptr<T>();
    p.o = out.mutable_data_ptr<T>();
    p.lse = lse.mutable_data_ptr<T>();
    const BlockSparseArgs a{rows(cc, ic), rows(qc, qi), bq, bk, causal};
    const ParallelRunner r = aten_runner();
    cpu::current_isa() == cpu::Isa::kAvx2 ? cpu::avx2::block_sparse_fwd(p, a, r)
                                          : cpu::generic::block_sparse_fwd(p, a, r);
  };
  ct == at::kDouble ? run(double{}) : run(float{});
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bs_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& counts, const at::Tensor& indices, int64_t bq, int64_t bk, bool causal,
    double scale, const std::optional<at::Tensor>& cu) {
  const BsShapes s = check_inputs(q, k, v, counts, indices, bq, bk, scale, cu);
  check_cpu(q, counts, indices);
  const at::ScalarType ct = compute_type(q);
  check_bwd_args(s, dout, dlse, q, out, lse);
  const auto [qc, qi] = transpose_layout(counts, indices, s.nk);
  at::Tensor dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  const at::Tensor cc = counts.contiguous(), ic = indices.contiguous();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    AttentionParams<T> p =
        sequence_params<T>(s.cu_q, s.cu_k, s.H, s.Hkv, s.Tq, s.Tk, s.D, s.Dv, scale);
    at::Tensor delta = softmax_delta(dout, out, dlse, ct);
    delta = delta.contiguous();
    const at::Tensor lse_c = lse.contiguous();
    std::vector<at::Tensor> keep;
    p.q = make_operand<T>(tokens(q), p.Dp, true, keep);
    p.k = make_operand<T>(tokens(k), p.Dp, true, keep);
    const Operand<T> v_op = make_operand<T>(tokens(v), p.Dvp, false, keep);
    p.dout = make_operand<T>(tokens(dout), p.Dvp, true, keep);
    at::Tensor ktb = transposed(p.k, s.Hkv, p.Tk, s.D, q.options());
    at::Tensor vtb = transposed(v_op, s.Hkv, p.Tk, s.Dv, q.options());
    p.kt = ktb.const_data_ptr<T>();
    p.vt = vtb.const_data_ptr<T>();
    p.lse_in = lse_c.const_data_ptr<T>();
    p.delta = delta.const_data_ptr<T>();
    p.n_kv_chunks = backward_kv_chunks(s.H * s.B, s.nk);  // chunks of key blocks
    const GradBuffers gb = grad_buffers(p, q.options());
    const BlockSparseArgs a{rows(cc, ic), rows(qc, qi), bq, bk, causal};
    const ParallelRunner r = aten_runner();
    cpu::current_isa() == cpu::Isa::kAvx2 ? cpu::avx2::block_sparse_bwd(p, a, r)
                                          : cpu::generic::block_sparse_bwd(p, a, r);
    const auto [dq_t, dk_t, dv_t] = grads_to_tokens(gb, p, scale);
    tokens(dq).copy_(dq_t);
    tokens(dk).copy_(dk_t);
    tokens(dv).copy_(dv_t);
  };
  ct == at::kDouble ? run(double{}) : run(float{});
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CPU, m) {
  m.impl("block_sparse_attention_fwd", &bs_fwd_cpu);
  m.impl("block_sparse_attention_bwd", &bs_bwd_cpu);
}

}  // namespace tilefuse
