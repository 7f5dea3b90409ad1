// SPDX-License-Identifier: Apache-2.0
// CUDA adapter of the dense attention ops (attention_fwd / attention_bwd): the checks and
// token layouts are the CPU adapter's (attention/attention_args.h); the kernels are the
// BandMask instantiations of the CUDA main loop (tilefuse/cuda/attention_loop.cuh).
#include <torch/library.h>

#include "attention/attention_args.h"
#include "cuda_utils.h"

namespace tilefuse {
namespace {

void check_device(const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.is_cuda(), "attention: the CUDA kernel got q on ", q.device());
}

/// Parameters shared by both passes; keeps the device copies and views alive in `keep`.
cuda::CudaAttentionParams make_params(const AttnShapes& s, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v, double scale,
                                      std::vector<at::Tensor>& keep) {
  cuda::CudaAttentionParams p;
  p.dtype = cuda_dtype(q.scalar_type());
  for (const at::Tensor& t : {q, k, v}) keep.push_back(unit_channel_stride(tokens(t, s.varlen)));
  p.q = cuda_operand(keep[keep.size() - 3]);
  p.k = cuda_operand(keep[keep.size() - 2]);
  p.v = cuda_operand(keep[keep.size() - 1]);
  keep.push_back(s.cu_q.to(q.device()));
  p.cu_q = keep.back().const_data_ptr<int64_t>();
  keep.push_back(s.cu_k.to(q.device()));
  p.cu_k = keep.back().const_data_ptr<int64_t>();
  p.B = s.B;
  p.H = s.H;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.Dv = s.Dv;
  p.max_sq = longest_segment(s.cu_q);
  p.max_sk = longest_segment(s.cu_k);
  p.scale = scale;
  return p;
}

void fwd_impl(const AttnShapes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              double scale, int64_t wl, int64_t wr, at::Tensor& out, at::Tensor& lse) {
  if (s.Tq == 0) return;
  std::vector<at::Tensor> keep;
  cuda::CudaAttentionParams p = make_params(s, q, k, v, scale, keep);
  p.o = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  check_cuda_launch(cuda::attention_fwd_band(p, {wl, wr}, c10::cuda::getCurrentCUDAStream()),
                    "attention");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
    int64_t max_k, double scale, int64_t wl, int64_t wr,
    const std::optional<at::Tensor>& key_mask) {
  const AttnShapes s = check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
  check_device(q);
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  std::vector<int64_t> lse_shape(q.sizes().begin(), q.sizes().end() - 1);
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(compute_type(q)));
  if (key_mask.has_value()) {
    const PackedKeys pk = pack_keys(s, k, v, *key_mask, wl, wr);
    fwd_impl(pk.s, tokens(q, false), pk.k, pk.v, scale, wl, wr, out, lse);
  } else {
    fwd_impl(s, q, k, v, scale, wl, wr, out, lse);
  }
  return {out, lse};
}

/// Gradients in the compute type, token-major: dq [Tq, H, D], dk [Tk, Hkv, D], dv [Tk, Hkv, Dv].
std::array<at::Tensor, 3> bwd_impl(const AttnShapes& s, const at::Tensor& dout,
                                   const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                   const at::Tensor& lse, double scale, int64_t wl, int64_t wr) {
  const at::ScalarType ct = compute_type(q);
  const bool vl = s.varlen;
  std::vector<at::Tensor> keep;
  cuda::CudaAttentionParams p = make_params(s, q, k, v, scale, keep);
  const at::Tensor dout_t = unit_channel_stride(tokens(dout, vl));
  p.dout = cuda_operand(dout_t);
  at::Tensor delta = (dout.to(ct) * out.to(ct)).sum(-1);
  if (dlse.has_value()) delta = delta - dlse->to(ct);
  delta = tokens(delta.unsqueeze(-1), vl).squeeze(-1).contiguous();
  const at::Tensor lse_t = tokens(lse.unsqueeze(-1), vl).squeeze(-1).contiguous();
  auto opts = q.options().dtype(ct);
  at::Tensor dq = at::zeros({s.Tq, s.H, s.D}, opts);
  at::Tensor dk = at::zeros({s.Tk, s.H, s.D}, opts);
  at::Tensor dv = at::zeros({s.Tk, s.H, s.Dv}, opts);
  p.lse_in = lse_t.const_data_ptr();
  p.delta = delta.const_data_ptr();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  check_cuda_launch(cuda::attention_bwd_band(p, {wl, wr}, c10::cuda::getCurrentCUDAStream()),
                    "attention_bwd");
  const int64_t G = s.H / s.Hkv;
  return {dq, dk.view({s.Tk, s.Hkv, G, s.D}).sum(2), dv.view({s.Tk, s.Hkv, G, s.Dv}).sum(2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
    int64_t max_k, double scale, int64_t wl, int64_t wr,
    const std::optional<at::Tensor>& key_mask) {
  const AttnShapes s = check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
  check_device(q);
  check_bwd_args(s, dout, dlse, q, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  if (key_mask.has_value()) {
    const PackedKeys pk = pack_keys(s, k, v, *key_mask, wl, wr);
    if (s.Tq == 0 || pk.s.Tk == 0) return {dq, dk, dv};
    std::optional<at::Tensor> dlse_t;
    if (dlse.has_value()) dlse_t = dlse->reshape({-1, s.H});
    const auto g = bwd_impl(pk.s, tokens(dout, false), dlse_t, tokens(q, false), pk.k, pk.v,
                            tokens(out, false), lse.reshape({-1, s.H}), scale, wl, wr);
    tokens(dq, false).copy_(g[0]);
    tokens(dk, false).index_copy_(0, pk.index, g[1].to(dk.scalar_type()));
    tokens(dv, false).index_copy_(0, pk.index, g[2].to(dv.scalar_type()));
    return {dq, dk, dv};
  }
  if (s.Tq == 0 || s.Tk == 0) return {dq, dk, dv};
  const auto g = bwd_impl(s, dout, dlse, q, k, v, out, lse, scale, wl, wr);
  tokens(dq, s.varlen).copy_(g[0]);
  tokens(dk, s.varlen).copy_(g[1]);
  tokens(dv, s.varlen).copy_(g[2]);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace tilefuse
