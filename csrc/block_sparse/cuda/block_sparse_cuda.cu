// SPDX-License-Identifier: Apache-2.0
// CUDA adapter of block-sparse attention: the CPU adapter's checks and layout transpose
// (block_sparse/block_sparse_args.h, validated on the host), then the BlockRows
// instantiations of the CUDA main loop.
#include <torch/library.h>

#include "block_sparse/block_sparse_args.h"
#include "cuda_utils.h"

namespace tilefuse {
namespace {

void check_cuda(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.is_cuda(), kOp, ": the CUDA kernel got q on ", q.device());
}

/// Parameters and device layouts of one call; `keep` holds what the pointers refer to.
struct Prepared {
  cuda::CudaAttentionParams p;
  BlockSparseArgs a;
  std::vector<at::Tensor> keep;
  // By value: a later push_back may move the vector's storage.
  at::Tensor hold(at::Tensor t) {
    keep.push_back(t);
    return t;
  }
};

void prepare(const BsShapes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& counts, const at::Tensor& indices, int64_t bq, int64_t bk,
             bool causal, double scale, Prepared& pr) {
  const auto [qc, qi] = transpose_layout(counts, indices, s.nk);  // validates on the host
  cuda::CudaAttentionParams& p = pr.p;
  p.dtype = cuda_dtype(q.scalar_type());
  p.q = cuda_operand(pr.hold(unit_channel_stride(tokens(q))));
  p.k = cuda_operand(pr.hold(unit_channel_stride(tokens(k))));
  p.v = cuda_operand(pr.hold(unit_channel_stride(tokens(v))));
  p.cu_q = pr.hold(s.cu_q.to(q.device())).const_data_ptr<int64_t>();
  p.cu_k = pr.hold(s.cu_k.to(q.device())).const_data_ptr<int64_t>();
  p.B = s.B;
  p.H = s.H;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.Dv = s.Dv;
  p.max_sq = s.Sq;
  p.max_sk = s.Sk;
  p.scale = scale;
  const at::Tensor cc = pr.hold(counts.to(q.device()).contiguous());
  const at::Tensor ic = pr.hold(indices.to(q.device()).contiguous());
  const at::Tensor qcd = pr.hold(qc.to(q.device()));
  const at::Tensor qid = pr.hold(qi.to(q.device()));
  pr.a = BlockSparseArgs{rows(cc, ic), rows(qcd, qid), bq, bk, causal};
}

std::tuple<at::Tensor, at::Tensor> bs_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const at::Tensor& counts,
                                               const at::Tensor& indices, int64_t bq, int64_t bk,
                                               bool causal, double scale,
                                               const std::optional<at::Tensor>& cu) {
  const BsShapes s = check_inputs(q, k, v, counts, indices, bq, bk, scale, cu);
  check_cuda(q);
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(compute_type(q)));
  Prepared pr;
  prepare(s, q, k, v, counts, indices, bq, bk, causal, scale, pr);  // validates even when empty
  if (out.numel() == 0) return {out, lse};
  pr.p.o = out.mutable_data_ptr();
  pr.p.lse = lse.mutable_data_ptr();
  check_cuda_launch(cuda::block_sparse_fwd(pr.p, pr.a, c10::cuda::getCurrentCUDAStream()), kOp);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bs_bwd_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& counts, const at::Tensor& indices, int64_t bq, int64_t bk, bool causal,
    double scale, const std::optional<at::Tensor>& cu) {
  const BsShapes s = check_inputs(q, k, v, counts, indices, bq, bk, scale, cu);
  check_cuda(q);
  check_bwd_args(s, dout, dlse, q, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared pr;
  prepare(s, q, k, v, counts, indices, bq, bk, causal, scale, pr);
  at::Tensor dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  const at::ScalarType ct = compute_type(q);
  cuda::CudaAttentionParams& p = pr.p;
  p.dout = cuda_operand(pr.hold(unit_channel_stride(tokens(dout))));
  at::Tensor delta = (dout.to(ct) * out.to(ct)).sum(-1);
  if (dlse.has_value()) delta = delta - dlse->to(ct);
  p.delta = pr.hold(delta.contiguous()).const_data_ptr();
  p.lse_in = pr.hold(lse.contiguous()).const_data_ptr();
  auto opts = q.options().dtype(ct);
  at::Tensor dq_a = at::zeros({s.Tq, s.H, s.D}, opts);
  at::Tensor dk_a = at::zeros({s.Tk, s.H, s.D}, opts);
  at::Tensor dv_a = at::zeros({s.Tk, s.H, s.Dv}, opts);
  p.dq = dq_a.mutable_data_ptr();
  p.dk = dk_a.mutable_data_ptr();
  p.dv = dv_a.mutable_data_ptr();
  check_cuda_launch(cuda::block_sparse_bwd(p, pr.a, c10::cuda::getCurrentCUDAStream()), kOp);
  const int64_t G = s.H / s.Hkv;
  tokens(dq).copy_(dq_a);
  tokens(dk).copy_(dk_a.view({s.Tk, s.Hkv, G, s.D}).sum(2));
  tokens(dv).copy_(dv_a.view({s.Tk, s.Hkv, G, s.Dv}).sum(2));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CUDA, m) {
  m.impl("block_sparse_attention_fwd", &bs_fwd_cuda);
  m.impl("block_sparse_attention_bwd", &bs_bwd_cuda);
}

}  // namespace tilefuse
