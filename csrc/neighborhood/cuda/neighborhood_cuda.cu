// SPDX-License-Identifier: Apache-2.0
// CUDA adapter of neighborhood attention (na_fwd/na_bwd) and Swin window attention
// (window_attention_fwd/bwd). Checks, the dilation-group token order and the bias layouts are
// the CPU adapter's (neighborhood/window_args.h); the kernels are the WindowMask instantiations
// of the CUDA main loop, whose launcher picks the tile shapes.
#include <torch/library.h>

#include "cuda_utils.h"
#include "neighborhood/window_args.h"

namespace tilefuse {
namespace {

void check_cuda(const WinShapes& s, const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.is_cuda(), s.op, ": the CUDA kernel got q on ", q.device());
}

/// Kernel parameters of one call; `keep` holds the token-order copies and device tables.
struct Prepared {
  cuda::CudaAttentionParams p;
  cuda::CudaWindowBias x;
  std::vector<at::Tensor> keep;
  // By value: a later push_back may move the vector's storage.
  at::Tensor hold(at::Tensor t) {
    keep.push_back(t);
    return t;
  }
};

void prepare(const WinShapes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
             const std::optional<at::Tensor>& v_pad, double scale, Prepared& pr) {
  cuda::CudaAttentionParams& p = pr.p;
  p.dtype = cuda_dtype(q.scalar_type());
  p.q = cuda_operand(pr.hold(unit_channel_stride(to_tokens(s, q))));
  p.k = cuda_operand(pr.hold(unit_channel_stride(to_tokens(s, k))));
  p.v = cuda_operand(pr.hold(unit_channel_stride(to_tokens(s, v))));
  const at::Tensor cu = pr.hold(s.cu.to(q.device()));
  p.cu_q = p.cu_k = cu.const_data_ptr<int64_t>();
  p.B = s.B * s.G;  // one sequence per (batch element, dilation group)
  p.H = s.H;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.Dv = s.Dv;
  p.max_sq = p.max_sk = longest_segment(s.cu);
  p.scale = scale;
  if (rpb.has_value())
    pr.x.bias = pr.hold(canonical_bias(s, *rpb, compute_type(q), pr.x.R)).const_data_ptr();
  if (k_pad.has_value()) p.k_pad = pr.hold(k_pad->contiguous()).const_data_ptr();
  if (v_pad.has_value()) p.v_pad = pr.hold(v_pad->contiguous()).const_data_ptr();
}

std::tuple<at::Tensor, at::Tensor> fwd(const WinShapes& s, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v,
                                       const std::optional<at::Tensor>& rpb,
                                       const std::optional<at::Tensor>& k_pad,
                                       const std::optional<at::Tensor>& v_pad, double scale) {
  check_cuda(s, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::ScalarType ct = compute_type(q);
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  const at::IntArrayRef lse_shape = q.sizes().slice(0, q.dim() - 1);
  if (s.B == 0)
    return {at::empty(out_shape, q.options()), at::empty(lse_shape, q.options().dtype(ct))};
  Prepared pr;
  prepare(s, q, k, v, rpb, k_pad, v_pad, scale, pr);
  at::Tensor out_t = at::empty({s.B * s.N, s.H, s.Dv}, q.options());
  at::Tensor lse_t = at::empty({s.B * s.N, s.H}, q.options().dtype(ct));
  pr.p.o = out_t.mutable_data_ptr();
  pr.p.lse = lse_t.mutable_data_ptr();
  check_cuda_launch(cuda::window_fwd(pr.p, s.args, pr.x, c10::cuda::getCurrentCUDAStream()),
                    s.op.c_str());
  return {from_tokens(s, out_t, out_shape), from_tokens(s, lse_t, lse_shape)};
}

struct Grads {
  at::Tensor dq, dk, dv, drpb, dk_pad, dv_pad;
};

Grads bwd(const WinShapes& s, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
          const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
          const std::optional<at::Tensor>& v_pad, const at::Tensor& out, const at::Tensor& lse,
          double scale) {
  check_cuda(s, q);
  check_bwd_tensors(s, q, dout, dlse, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  Grads g;
  const at::Tensor empty = at::empty({0}, q.options());
  g.drpb = rpb.has_value() ? at::zeros_like(*rpb) : empty;
  g.dk_pad = k_pad.has_value() ? at::zeros_like(*k_pad) : empty;
  g.dv_pad = v_pad.has_value() ? at::zeros_like(*v_pad) : empty;
  if (s.B == 0) {
    g.dq = at::zeros_like(q);
    g.dk = at::zeros_like(k);
    g.dv = at::zeros_like(v);
    return g;
  }
  const at::ScalarType ct = compute_type(q);
  Prepared pr;
  prepare(s, q, k, v, rpb, k_pad, v_pad, scale, pr);
  cuda::CudaAttentionParams& p = pr.p;
  p.dout = cuda_operand(pr.hold(unit_channel_stride(to_tokens(s, dout))));
  at::Tensor delta = (dout.to(ct) * out.to(ct)).sum(-1);
  if (dlse.has_value()) delta = delta - dlse->to(ct);
  p.delta = pr.hold(to_tokens(s, delta.unsqueeze(-1)).squeeze(-1).contiguous()).const_data_ptr();
  p.lse_in = pr.hold(to_tokens(s, lse.unsqueeze(-1)).squeeze(-1).contiguous()).const_data_ptr();
  const int64_t T = s.B * s.N;
  auto opts = q.options().dtype(ct);
  at::Tensor dq = at::zeros({T, s.H, s.D}, opts);
  at::Tensor dk = at::zeros({T, s.H, s.D}, opts);
  at::Tensor dv = at::zeros({T, s.H, s.Dv}, opts);
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  at::Tensor dbias, dkp, dvp;
  if (rpb.has_value()) {
    dbias = at::zeros({s.H, pr.x.R[0], pr.x.R[1], pr.x.R[2]}, opts);
    pr.x.dbias = dbias.mutable_data_ptr();
  }
  if (s.args.kind == WindowMask::kSwin) {
    dkp = at::zeros({s.H, s.D}, opts);
    dvp = at::zeros({s.H, s.Dv}, opts);
    p.dk_pad = dkp.mutable_data_ptr();
    p.dv_pad = dvp.mutable_data_ptr();
  }
  check_cuda_launch(cuda::window_bwd(p, s.args, pr.x, c10::cuda::getCurrentCUDAStream()),
                    s.op.c_str());
  const int64_t G = s.H / s.Hkv;
  g.dq = from_tokens(s, dq, q.sizes()).to(q.scalar_type());
  g.dk = from_tokens(s, dk.view({T, s.Hkv, G, s.D}).sum(2), k.sizes()).to(k.scalar_type());
  g.dv = from_tokens(s, dv.view({T, s.Hkv, G, s.Dv}).sum(2), v.sizes()).to(v.scalar_type());
  if (rpb.has_value()) g.drpb = bias_grad_to_user(s, dbias, *rpb);
  if (dkp.defined() && k_pad.has_value())
    g.dk_pad = dkp.view({s.Hkv, G, s.D}).sum(1).to(q.scalar_type());
  if (dvp.defined() && v_pad.has_value())
    g.dv_pad = dvp.view({s.Hkv, G, s.Dv}).sum(1).to(q.scalar_type());
  return g;
}

std::tuple<at::Tensor, at::Tensor> na_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v,
                                               const std::optional<at::Tensor>& rpb,
                                               at::IntArrayRef kernel, at::IntArrayRef dilation,
                                               at::IntArrayRef stride,
                                               const c10::List<bool>& causal, double scale) {
  const WinShapes s = check_na(q, k, v, rpb, kernel, dilation, stride, causal, scale);
  return fwd(s, q, k, v, rpb, std::nullopt, std::nullopt, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_bwd_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
    const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef kernel,
    at::IntArrayRef dilation, at::IntArrayRef stride, const c10::List<bool>& causal, double scale) {
  const WinShapes s = check_na(q, k, v, rpb, kernel, dilation, stride, causal, scale);
  Grads g = bwd(s, dout, dlse, q, k, v, rpb, std::nullopt, std::nullopt, out, lse, scale);
  return {g.dq, g.dk, g.dv, g.drpb};
}

std::tuple<at::Tensor, at::Tensor> window_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
    const std::optional<at::Tensor>& v_pad, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  const WinShapes s = check_swin(q, k, v, rpb, k_pad, v_pad, window, shift, scale);
  return fwd(s, q, k, v, rpb, k_pad, v_pad, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
window_bwd_cuda(const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
                const std::optional<at::Tensor>& v_pad, const at::Tensor& out,
                const at::Tensor& lse, at::IntArrayRef window, at::IntArrayRef shift,
                double scale) {
  const WinShapes s = check_swin(q, k, v, rpb, k_pad, v_pad, window, shift, scale);
  Grads g = bwd(s, dout, dlse, q, k, v, rpb, k_pad, v_pad, out, lse, scale);
  return {g.dq, g.dk, g.dv, g.drpb, g.dk_pad, g.dv_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CUDA, m) {
  m.impl("na_fwd", &na_fwd_cuda);
  m.impl("na_bwd", &na_bwd_cuda);
  m.impl("window_attention_fwd", &window_fwd_cuda);
  m.impl("window_attention_bwd", &window_bwd_cuda);
}

}  // namespace tilefuse
