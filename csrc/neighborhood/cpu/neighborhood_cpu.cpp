// SPDX-License-Identifier: Apache-2.0
// CPU adapter of neighborhood attention (na_fwd/na_bwd) and Swin window attention
// (window_attention_fwd/bwd): argument checks, the dilation-group token order, operand
// buffers, bias-table layouts, and the reduction of the per-work-item partial gradients.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "aten_utils.h"
#include "cpu_operands.h"
#include "neighborhood/cpu/kernels/window_direct.h"
#include "neighborhood/window_args.h"
#include "tilefuse/cpu/window.h"

namespace tilefuse {
namespace {

/// Tile shapes: query tiles of <= 64 tokens, key tiles of <= 128, per axis (leading axes 1).
/// The window policy cuts them further at window / stride-group boundaries. Query tiles are
/// tall along the outer axis: the loop skips the rows that do not see a key slab along that
/// axis, so only the inner axes pay for the union of the windows (measured on 56x56 / k 7 and
/// 128x128 / k 13: 16x4 beat 8x8, 32x2 and 4x16). In 3-D the slab axis (the first one of
/// extent > 1) should carry a large kernel, hence 1x16x4 rather than a cube.
void default_tiles(WindowMask::Args& a, int64_t R) {
  static const int64_t q1[3] = {1, 1, 64}, k1[3] = {1, 1, 128};
  static const int64_t q2[3] = {1, 16, 4}, k2[3] = {1, 16, 8};
  static const int64_t q3[3] = {1, 16, 4}, k3[3] = {1, 16, 8};
  const int64_t* q = R == 1 ? q1 : R == 2 ? q2 : q3;
  const int64_t* k = R == 1 ? k1 : R == 2 ? k2 : k3;
  for (int a3 = 0; a3 < 3; ++a3) {
    a.q_tile[a3] = q[a3];
    a.k_tile[a3] = k[a3];
  }
}

/// Device check, then the CPU loop's tiles (kAttnTileQ / kAttnTileK tokens): one window per
/// tile for disjoint windows, else the shapes above.
void check_cpu(WinShapes& s, const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.device().is_cpu(), s.op, ": the CPU kernel got q on ", q.device());
  if (disjoint_windows(s.args)) {
    fit_window_tile(s.args.window, cpu::kAttnTileQ, s.args.q_tile);
    fit_window_tile(s.args.window, cpu::kAttnTileK, s.args.k_tile);
  } else {
    default_tiles(s.args, s.R);
  }
}

/// The inputs both passes read besides q/k/v: the bias table in the kernel's layout and the
/// pad key/value rows in the compute type, kept alive here and wired into `x`.
template <class T>
struct WindowInputs {
  at::Tensor bias, k_pad, v_pad;
  WindowExtras<T> x;
};

template <class T>
WindowInputs<T> window_inputs(const WinShapes& s, const std::optional<at::Tensor>& rpb,
                              const std::optional<at::Tensor>& k_pad,
                              const std::optional<at::Tensor>& v_pad, at::ScalarType ct) {
  WindowInputs<T> in;
  // Local (non-dependent) tensors: members of WindowInputs<T> would need ".template".
  if (rpb.has_value()) {
    const at::Tensor b = canonical_bias(s, *rpb, ct, in.x.R);
    in.x.bias = b.const_data_ptr<T>();
    in.bias = b;
  }
  if (k_pad.has_value()) {
    const at::Tensor kp = k_pad->to(ct).contiguous();
    in.x.k_pad = kp.const_data_ptr<T>();
    in.k_pad = kp;
  }
  if (v_pad.has_value()) {
    const at::Tensor vp = v_pad->to(ct).contiguous();
    in.x.v_pad = vp.const_data_ptr<T>();
    in.v_pad = vp;
  }
  return in;
}

/// Whether the forward runs the lane-vectorised sliding NA kernel: wherever it applies;
/// TILEFUSE_NA_LANES=0 sends it through the tile loop instead (A/B runs, and the tests that
/// cross-check the two).
bool use_lanes(const WinShapes& s) {
  const char* e = std::getenv("TILEFUSE_NA_LANES");
  if (e && e[0] == '0') return false;
  return cpu::na_lanes_applies(s.args);
}

template <class T>
void run_fwd_kernel(const AttentionParams<T>& p, const WindowMask::Args& a,
                    const WindowExtras<T>& x) {
  cpu::current_isa() == cpu::Isa::kAvx2 ? cpu::avx2::window_fwd(p, a, x, aten_runner())
                                        : cpu::generic::window_fwd(p, a, x, aten_runner());
}
template <class T>
void run_bwd_kernel(const AttentionParams<T>& p, const WindowMask::Args& a,
                    const WindowExtras<T>& x) {
  cpu::current_isa() == cpu::Isa::kAvx2 ? cpu::avx2::window_bwd(p, a, x, aten_runner())
                                        : cpu::generic::window_bwd(p, a, x, aten_runner());
}

template <class T>
std::tuple<at::Tensor, at::Tensor> fwd_impl(const WinShapes& s, const at::Tensor& q,
                                            const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& rpb,
                                            const std::optional<at::Tensor>& k_pad,
                                            const std::optional<at::Tensor>& v_pad, double scale) {
  const at::ScalarType ct = compute_type(q);
  // Dilation groups are separate sequences: B * G of them, sharing the boundaries s.cu.
  AttentionParams<T> p =
      sequence_params<T>(s.cu, s.cu, s.H, s.Hkv, s.B * s.N, s.B * s.N, s.D, s.Dv, scale);
  std::vector<at::Tensor> keep;
  // Sliding NA with the queries in vector lanes reads token rows only (no padded V).
  const bool lanes = use_lanes(s);
  p.q = make_operand<T>(to_tokens(s, q), p.Dp, false, keep);
  // Key tiles are gathered by rows and transposed inside the kernel (no K^T pass here).
  p.k = make_operand<T>(to_tokens(s, k), p.Dp, false, keep);
  p.v = make_operand<T>(to_tokens(s, v), p.Dvp, !lanes, keep);
  at::Tensor out_t = at::empty({p.Tq, s.H, s.Dv}, q.options().dtype(ct));
  at::Tensor lse_t = at::empty({p.Tq, s.H}, q.options().dtype(ct));
  p.o = out_t.mutable_data_ptr<T>();
  p.lse = lse_t.mutable_data_ptr<T>();
  const WindowInputs<T> in = window_inputs<T>(s, rpb, k_pad, v_pad, ct);
  if (lanes) {
    cpu::current_isa() == cpu::Isa::kAvx2 ? cpu::avx2::na_fwd_lanes(p, s.args, in.x, aten_runner())
                                          : cpu::generic::na_fwd_lanes(p, s.args, in.x, aten_runner());
  } else {
    run_fwd_kernel(p, s.args, in.x);
  }
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  at::Tensor out = from_tokens(s, out_t, out_shape);
  at::Tensor lse = from_tokens(s, lse_t, q.sizes().slice(0, q.dim() - 1));
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> fwd_dispatch(const WinShapes& s, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& rpb,
                                                const std::optional<at::Tensor>& k_pad,
                                                const std::optional<at::Tensor>& v_pad,
                                                double scale) {
  if (s.B == 0) {
    std::vector<int64_t> out_shape = q.sizes().vec();
    out_shape.back() = s.Dv;
    return {at::empty(out_shape, q.options()),
            at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(compute_type(q)))};
  }
  if (compute_type(q) == at::kDouble) return fwd_impl<double>(s, q, k, v, rpb, k_pad, v_pad, scale);
  return fwd_impl<float>(s, q, k, v, rpb, k_pad, v_pad, scale);
}

struct WinGrads {
  at::Tensor dq, dk, dv, drpb, dk_pad, dv_pad;
};

/// Backward of disjoint windows that partition the grid (window_bwd_direct_applies): the
/// kernel writes dQ / dK / dV once per token in the final [T, H, C] layout and computes Delta
/// itself, so the adapter allocates the results (no zero fill) and only reduces GQA groups
/// and the per-chunk bias / padding partials.
template <class T>
void bwd_direct_impl(const WinShapes& s, const at::Tensor& dout,
                     const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
                     const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad,
                     const at::Tensor& out, const at::Tensor& lse, double scale, WinGrads& g) {
  const at::ScalarType ct = compute_type(q);
  AttentionParams<T> p =
      sequence_params<T>(s.cu, s.cu, s.H, s.Hkv, s.B * s.N, s.B * s.N, s.D, s.Dv, scale);
  std::vector<at::Tensor> keep;
  p.q = make_operand<T>(to_tokens(s, q), p.Dp, false, keep);
  p.k = make_operand<T>(to_tokens(s, k), p.Dp, false, keep);
  p.v = make_operand<T>(to_tokens(s, v), p.Dvp, false, keep);
  p.dout = make_operand<T>(to_tokens(s, dout), p.Dvp, false, keep);
  const at::Tensor out_c = to_tokens(s, out).to(ct).contiguous();
  const at::Tensor lse_c = to_tokens(s, lse.unsqueeze(-1)).squeeze(-1).to(ct).contiguous();
  at::Tensor dlse_c;
  if (dlse.has_value()) {
    dlse_c = to_tokens(s, dlse->unsqueeze(-1)).squeeze(-1).to(ct).contiguous();
    p.delta = dlse_c.const_data_ptr<T>();
  }
  p.o = const_cast<T*>(out_c.const_data_ptr<T>());
  p.lse_in = lse_c.const_data_ptr<T>();
  auto opts = q.options().dtype(ct);
  at::Tensor dq_t = at::empty({p.Tq, s.H, s.D}, opts);
  at::Tensor dk_t = at::empty({p.Tk, s.H, s.D}, opts);
  at::Tensor dv_t = at::empty({p.Tk, s.H, s.Dv}, opts);
  p.dq = dq_t.mutable_data_ptr<T>();
  p.dk = dk_t.mutable_data_ptr<T>();
  p.dv = dv_t.mutable_data_ptr<T>();
  int64_t tiles = 0;
  for (int64_t b = 0; b < p.B; ++b) tiles += WindowMask::make(s.args, b).num_query_tiles();
  // Fixed runs of windows (not per-thread partials): deterministic for a given thread count.
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, 2 * at::get_num_threads()));
  const WindowInputs<T> in = window_inputs<T>(s, rpb, k_pad, v_pad, ct);
  WindowExtras<T> x = in.x;
  at::Tensor dbias, dkp, dvp;
  if (rpb.has_value()) {
    dbias = at::zeros({n_chunks, s.H, x.R[0] * x.R[1] * x.R[2]}, opts);
    x.dbias = dbias.mutable_data_ptr<T>();
  }
  const bool swin = s.args.kind == WindowMask::kSwin;
  if (swin) {
    dkp = at::zeros({n_chunks, s.H, s.D}, opts);
    dvp = at::zeros({n_chunks, s.H, s.Dv}, opts);
    x.dk_pad = dkp.mutable_data_ptr<T>();
    x.dv_pad = dvp.mutable_data_ptr<T>();
  }
  cpu::current_isa() == cpu::Isa::kAvx2
      ? cpu::avx2::window_bwd_direct(p, s.args, x, n_chunks, aten_runner())
      : cpu::generic::window_bwd_direct(p, s.args, x, n_chunks, aten_runner());
  const int64_t G = s.H / s.Hkv;
  if (G > 1) {
    dk_t = dk_t.view({p.Tk, s.Hkv, G, s.D}).sum(2);
    dv_t = dv_t.view({p.Tk, s.Hkv, G, s.Dv}).sum(2);
  }
  g.dq = from_tokens(s, dq_t, q.sizes()).to(q.scalar_type());
  g.dk = from_tokens(s, dk_t, k.sizes()).to(k.scalar_type());
  g.dv = from_tokens(s, dv_t, v.sizes()).to(v.scalar_type());
  if (rpb.has_value())
    g.drpb = bias_grad_to_user(s, dbias.sum(0).view({s.H, x.R[0], x.R[1], x.R[2]}), *rpb);
  if (swin && k_pad.has_value())
    g.dk_pad = dkp.view({n_chunks, s.Hkv, G, s.D}).sum({0, 2}).to(q.scalar_type());
  if (swin && v_pad.has_value())
    g.dv_pad = dvp.view({n_chunks, s.Hkv, G, s.Dv}).sum({0, 2}).to(q.scalar_type());
}

template <class T>
void bwd_impl(const WinShapes& s, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
              const std::optional<at::Tensor>& v_pad, const at::Tensor& out,
              const at::Tensor& lse, double scale, WinGrads& g) {
  if (cpu::window_bwd_direct_applies(s.args, s.G)) {
    bwd_direct_impl<T>(s, dout, dlse, q, k, v, rpb, k_pad, v_pad, out, lse, scale, g);
    return;
  }
  const at::ScalarType ct = compute_type(q);
  // Dilation groups are separate sequences: B * G of them, sharing the boundaries s.cu.
  AttentionParams<T> p =
      sequence_params<T>(s.cu, s.cu, s.H, s.Hkv, s.B * s.N, s.B * s.N, s.D, s.Dv, scale);
  at::Tensor delta = softmax_delta(dout, out, dlse, ct);
  delta = to_tokens(s, delta.unsqueeze(-1)).squeeze(-1).contiguous();
  at::Tensor lse_c = to_tokens(s, lse.unsqueeze(-1)).squeeze(-1).contiguous();
  std::vector<at::Tensor> keep;
  p.q = make_operand<T>(to_tokens(s, q), p.Dp, true, keep);
  p.k = make_operand<T>(to_tokens(s, k), p.Dp, true, keep);
  p.v = make_operand<T>(to_tokens(s, v), p.Dvp, false, keep);
  p.dout = make_operand<T>(to_tokens(s, dout), p.Dvp, true, keep);
  // Same work split as the dense backward (backward_kv_chunks).
  const int64_t items = s.H * p.B;
  int64_t max_tiles = 1;
  for (int64_t b = 0; b < std::min<int64_t>(p.B, s.G); ++b)
    max_tiles = std::max(max_tiles, WindowMask::make(s.args, b).num_key_tiles());
  p.n_kv_chunks = backward_kv_chunks(items, max_tiles);
  const int64_t n_items = items * p.n_kv_chunks;
  auto opts = q.options().dtype(ct);
  // Without GQA and key-tile chunks, the kernel writes token-major [T, H, C] results directly
  // (dQ zeroed per item, accumulated and scaled; dK / dV stored): no gradient buffers, zero
  // fills, scaling pass or layout copies.
  const bool tok = s.H == s.Hkv && p.n_kv_chunks == 1;
  GradBuffers gb;
  at::Tensor dq_t, dk_t, dv_t;
  if (tok) {
    p.grads_token_major = true;
    dq_t = at::empty({p.Tq, s.H, s.D}, opts);
    dk_t = at::empty({p.Tk, s.H, s.D}, opts);
    dv_t = at::empty({p.Tk, s.H, s.Dv}, opts);
    p.dq = dq_t.mutable_data_ptr<T>();
    p.dk = dk_t.mutable_data_ptr<T>();
    p.dv = dv_t.mutable_data_ptr<T>();
  } else {
    gb = grad_buffers(p, q.options());
  }
  p.lse_in = lse_c.const_data_ptr<T>();
  p.delta = delta.const_data_ptr<T>();
  const WindowInputs<T> in = window_inputs<T>(s, rpb, k_pad, v_pad, ct);
  WindowExtras<T> x = in.x;
  at::Tensor dbias, dkp, dvp;
  if (rpb.has_value()) {
    dbias = at::zeros({n_items, x.R[0] * x.R[1] * x.R[2]}, opts);
    x.dbias = dbias.mutable_data_ptr<T>();
  }
  const bool swin = s.args.kind == WindowMask::kSwin;
  if (swin) {
    dkp = at::zeros({n_items, s.D}, opts);
    dvp = at::zeros({n_items, s.Dv}, opts);
    x.dk_pad = dkp.mutable_data_ptr<T>();
    x.dv_pad = dvp.mutable_data_ptr<T>();
  }
  run_bwd_kernel(p, s.args, x);

  if (!tok) {
    const std::array<at::Tensor, 3> r = grads_to_tokens(gb, p, scale);
    dq_t = r[0];
    dk_t = r[1];
    dv_t = r[2];
  }
  g.dq = from_tokens(s, dq_t, q.sizes()).to(q.scalar_type());
  g.dk = from_tokens(s, dk_t, k.sizes()).to(k.scalar_type());
  g.dv = from_tokens(s, dv_t, v.sizes()).to(v.scalar_type());
  // Partial sums are per work item (head-major): a fixed-order reduction, no atomics.
  if (rpb.has_value())
    g.drpb = bias_grad_to_user(s, dbias.view({s.H, -1, x.R[0], x.R[1], x.R[2]}).sum(1), *rpb);
  if (swin && k_pad.has_value())
    g.dk_pad = dkp.view({s.Hkv, -1, s.D}).sum(1).to(q.scalar_type());
  if (swin && v_pad.has_value())
    g.dv_pad = dvp.view({s.Hkv, -1, s.Dv}).sum(1).to(q.scalar_type());
}

WinGrads bwd_dispatch(const WinShapes& s, const at::Tensor& dout,
                      const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
                      const std::optional<at::Tensor>& v_pad, const at::Tensor& out,
                      const at::Tensor& lse, double scale) {
  check_bwd_tensors(s, q, dout, dlse, out, lse);
  WinGrads g;
  const at::Tensor empty = at::empty({0}, q.options());
  if (s.B == 0) {
    g.dq = at::zeros_like(q);
    g.dk = at::zeros_like(k);
    g.dv = at::zeros_like(v);
  } else if (compute_type(q) == at::kDouble) {
    bwd_impl<double>(s, dout, dlse, q, k, v, rpb, k_pad, v_pad, out, lse, scale, g);
  } else {
    bwd_impl<float>(s, dout, dlse, q, k, v, rpb, k_pad, v_pad, out, lse, scale, g);
  }
  if (!g.drpb.defined()) g.drpb = rpb.has_value() ? at::zeros_like(*rpb) : empty;
  if (!g.dk_pad.defined()) g.dk_pad = k_pad.has_value() ? at::zeros_like(*k_pad) : empty;
  if (!g.dv_pad.defined()) g.dv_pad = v_pad.has_value() ? at::zeros_like(*v_pad) : empty;
  return g;
}

std::tuple<at::Tensor, at::Tensor> na_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v,
                                              const std::optional<at::Tensor>& rpb,
                                              at::IntArrayRef kernel, at::IntArrayRef dilation,
                                              at::IntArrayRef stride, const c10::List<bool>& causal,
                                              double scale) {
  WinShapes s = check_na(q, k, v, rpb, kernel, dilation, stride, causal, scale);
  check_cpu(s, q);
  return fwd_dispatch(s, q, k, v, rpb, std::nullopt, std::nullopt, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
    const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef kernel,
    at::IntArrayRef dilation, at::IntArrayRef stride, const c10::List<bool>& causal, double scale) {
  WinShapes s = check_na(q, k, v, rpb, kernel, dilation, stride, causal, scale);
  check_cpu(s, q);
  WinGrads g = bwd_dispatch(s, dout, dlse, q, k, v, rpb, std::nullopt, std::nullopt, out, lse, scale);
  return {g.dq, g.dk, g.dv, g.drpb};
}

std::tuple<at::Tensor, at::Tensor> window_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
    const std::optional<at::Tensor>& v_pad, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  WinShapes s = check_swin(q, k, v, rpb, k_pad, v_pad, window, shift, scale);
  check_cpu(s, q);
  return fwd_dispatch(s, q, k, v, rpb, k_pad, v_pad, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
    const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad,
    const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  WinShapes s = check_swin(q, k, v, rpb, k_pad, v_pad, window, shift, scale);
  check_cpu(s, q);
  WinGrads g = bwd_dispatch(s, dout, dlse, q, k, v, rpb, k_pad, v_pad, out, lse, scale);
  return {g.dq, g.dk, g.dv, g.drpb, g.dk_pad, g.dv_pad};
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CPU, m) {
  m.impl("na_fwd", &na_fwd_cpu);
  m.impl("na_bwd", &na_bwd_cpu);
  m.impl("window_attention_fwd", &window_fwd_cpu);
  m.impl("window_attention_bwd", &window_bwd_cpu);
}

}  // namespace tilefuse
