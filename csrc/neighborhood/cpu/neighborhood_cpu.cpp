// SPDX-License-Identifier: Apache-2.0
// CPU adapter of neighborhood attention (na_fwd/na_bwd) and Swin window attention
// (window_attention_fwd/bwd): argument checks, the dilation-group token order, operand
// buffers, bias-table layouts, and the reduction of the per-work-item partial gradients.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "aten_utils.h"
#include "cpu_operands.h"
#include "tilefuse/cpu/window.h"

namespace tilefuse {
namespace {

/// What one call computes, after the checks.
struct WinShapes {
  std::string op;  // "na2d", "window_attention" (error messages)
  int64_t R = 0;   // spatial rank
  int64_t B = 0, H = 0, Hkv = 0, D = 0, Dv = 0, N = 0, G = 1;
  WindowMask::Args args;
  at::Tensor perm;  // group-major position -> row-major position (only when G > 1)
  at::Tensor cu;    // int64 [B * G + 1] sequence offsets (batch element, dilation group)
};

std::vector<int64_t> spatial_of(const at::Tensor& t, int64_t R) {
  return std::vector<int64_t>(t.sizes().begin() + 1, t.sizes().begin() + 1 + R);
}

void check_common(WinShapes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  double scale, int64_t R) {
  const char* op = s.op.c_str();
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                       q.scalar_type() == at::kHalf || q.scalar_type() == at::kDouble,
                   op, ": q must be float32, bfloat16, float16 or float64, got ", q.scalar_type());
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name,
                     " must have the dtype of q (", q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on the device of q");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const std::string layout = "[batch, " + std::string(R == 1 ? "length" : R == 2 ? "height, width" : "depth, height, width") + ", heads, head_dim]";
  TORCH_CHECK_VALUE(q.dim() == R + 3, op, ": q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == R + 3, op, ": k must be ", layout, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == R + 3, op, ": v must be ", layout, ", got shape ", v.sizes());
  s.R = R;
  s.B = q.size(0);
  s.H = q.size(R + 1);
  s.D = q.size(R + 2);
  s.Hkv = k.size(R + 1);
  s.Dv = v.size(R + 2);
  TORCH_CHECK_VALUE(k.size(0) == s.B && v.size(0) == s.B, op, ": batch sizes differ: q ",
                    q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(spatial_of(k, R) == spatial_of(q, R) && spatial_of(v, R) == spatial_of(q, R),
                    op, ": k and v must have the spatial shape of q ", spatial_of(q, R),
                    ", got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(s.D > 0, op, ": head_dim of q must be > 0, got shape ", q.sizes());
  TORCH_CHECK_VALUE(s.Dv > 0, op, ": head_dim of v must be > 0, got shape ", v.sizes());
  TORCH_CHECK_VALUE(k.size(R + 2) == s.D, op, ": k head_dim (", k.size(R + 2),
                    ") must equal q head_dim (", s.D, ")");
  TORCH_CHECK_VALUE(s.H > 0 && s.Hkv > 0, op, ": heads must be > 0");
  TORCH_CHECK_VALUE(v.size(R + 1) == s.Hkv, op, ": v heads (", v.size(R + 1),
                    ") must equal k heads (", s.Hkv, ")");
  TORCH_CHECK_VALUE(s.H % s.Hkv == 0, op, ": q heads (", s.H,
                    ") must be a multiple of k/v heads (", s.Hkv, ")");
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": the CPU kernel got q on ", q.device());
  s.N = 1;
  for (int64_t a = 0; a < R; ++a) {
    TORCH_CHECK_VALUE(q.size(1 + a) > 0, op, ": spatial sizes must be > 0, got q ", q.sizes());
    s.args.size[3 - R + a] = q.size(1 + a);
    s.N *= q.size(1 + a);
  }
}

void check_rank_list(const WinShapes& s, size_t n, const char* name, int64_t R) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(n) == R, s.op, ": ", name, " must have ", R,
                    " entries (one per spatial axis), got ", n);
}

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

/// Swin: one whole window per tile where it fits (a window sees only itself), outer axes
/// shrunk first until the tile holds at most cap tokens.
void window_tiles(WindowMask::Args& a, int64_t* tile, int64_t cap) {
  for (int ax = 0; ax < 3; ++ax) tile[ax] = a.window[ax];
  for (int ax = 0; ax < 3; ++ax)
    while (tile[0] * tile[1] * tile[2] > cap && tile[ax] > 1) tile[ax] = (tile[ax] + 1) / 2;
}

void make_sequences(WinShapes& s) {
  // Dilation groups become separate sequences: token order (group, row-major inside it).
  const auto& a = s.args;
  s.G = a.dilation[0] * a.dilation[1] * a.dilation[2];
  std::vector<int64_t> glen(s.G);
  std::vector<int64_t> perm;
  if (s.G > 1) perm.reserve(s.N);
  for (int64_t g = 0; g < s.G; ++g) {
    const int64_t g0 = g / (a.dilation[1] * a.dilation[2]), g1 = (g / a.dilation[2]) % a.dilation[1],
                  g2 = g % a.dilation[2];
    const int64_t n0 = dilation_group_length(a.size[0], a.dilation[0], g0);
    const int64_t n1 = dilation_group_length(a.size[1], a.dilation[1], g1);
    const int64_t n2 = dilation_group_length(a.size[2], a.dilation[2], g2);
    glen[g] = n0 * n1 * n2;
    if (s.G > 1)
      for (int64_t i0 = 0; i0 < n0; ++i0)
        for (int64_t i1 = 0; i1 < n1; ++i1)
          for (int64_t i2 = 0; i2 < n2; ++i2)
            perm.push_back(((g0 + i0 * a.dilation[0]) * a.size[1] + g1 + i1 * a.dilation[1]) *
                               a.size[2] + g2 + i2 * a.dilation[2]);
  }
  if (s.G > 1) s.perm = at::tensor(perm, at::kLong);
  s.cu = at::empty({s.B * s.G + 1}, at::kLong);
  int64_t* cu = s.cu.mutable_data_ptr<int64_t>();
  cu[0] = 0;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t g = 0; g < s.G; ++g) cu[b * s.G + g + 1] = cu[b * s.G + g] + glen[g];
}

WinShapes check_na(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel,
                   at::IntArrayRef dilation, at::IntArrayRef stride,
                   const c10::List<bool>& causal, double scale) {
  WinShapes s;
  const int64_t R = static_cast<int64_t>(kernel.size());
  s.op = "na" + std::to_string(R) + "d";
  TORCH_CHECK_VALUE(R >= 1 && R <= 3, "na: kernel_size must have 1, 2 or 3 entries, got ", R);
  check_common(s, q, k, v, scale, R);
  check_rank_list(s, dilation.size(), "dilation", R);
  check_rank_list(s, stride.size(), "stride", R);
  check_rank_list(s, causal.size(), "is_causal", R);
  s.args.kind = WindowMask::kNeighborhood;
  for (int64_t i = 0; i < R; ++i) {
    const int a = static_cast<int>(3 - R + i);
    const int64_t L = s.args.size[a];
    TORCH_CHECK_VALUE(kernel[i] >= 1, s.op, ": kernel_size must be >= 1, got ", kernel);
    TORCH_CHECK_VALUE(dilation[i] >= 1, s.op, ": dilation must be >= 1, got ", dilation);
    TORCH_CHECK_VALUE(stride[i] >= 1 && stride[i] <= kernel[i], s.op,
                      ": stride must be in [1, kernel_size], got stride ", stride,
                      " and kernel_size ", kernel);
    TORCH_CHECK_VALUE(kernel[i] * dilation[i] <= L, s.op,
                      ": kernel_size * dilation must be <= the input size on every axis, got "
                      "kernel_size ", kernel, ", dilation ", dilation, " for spatial shape ",
                      spatial_of(q, R));
    s.args.kernel[a] = kernel[i];
    s.args.dilation[a] = dilation[i];
    s.args.stride[a] = stride[i];
    s.args.causal[a] = causal.get(i);
  }
  if (rpb.has_value()) {
    std::vector<int64_t> want{s.H};
    for (int64_t i = 0; i < R; ++i) want.push_back(2 * kernel[i] - 1);
    TORCH_CHECK_VALUE(rpb->sizes() == at::IntArrayRef(want), s.op, ": rpb must have shape ",
                      at::IntArrayRef(want),
                      " ([heads, 2k-1, ...]), got ", rpb->sizes());
    TORCH_CHECK_TYPE(rpb->scalar_type() == q.scalar_type(), s.op,
                     ": rpb must have the dtype of q (", q.scalar_type(), "), got ",
                     rpb->scalar_type());
    TORCH_CHECK_VALUE(rpb->device() == q.device(), s.op, ": rpb must be on the device of q");
  }
  default_tiles(s.args, R);
  bool blocked = true;
  for (int a = 0; a < 3; ++a) blocked = blocked && s.args.stride[a] == s.args.kernel[a];
  if (blocked) {  // disjoint windows, like Swin: one window per query tile where it fits
    for (int a = 0; a < 3; ++a) s.args.window[a] = s.args.kernel[a];
    window_tiles(s.args, s.args.q_tile, cpu::kAttnTileQ);
    window_tiles(s.args, s.args.k_tile, cpu::kAttnTileK);
  }
  make_sequences(s);
  return s;
}

WinShapes check_swin(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
                     const std::optional<at::Tensor>& v_pad, at::IntArrayRef window,
                     at::IntArrayRef shift, double scale) {
  WinShapes s;
  const int64_t R = static_cast<int64_t>(window.size());
  s.op = "window_attention";
  TORCH_CHECK_VALUE(R >= 1 && R <= 3, s.op, ": window_size must have 1, 2 or 3 entries, got ", R);
  check_common(s, q, k, v, scale, R);
  check_rank_list(s, shift.size(), "shift_size", R);
  s.args.kind = WindowMask::kSwin;
  int64_t table = 1;
  for (int64_t i = 0; i < R; ++i) {
    const int a = static_cast<int>(3 - R + i);
    TORCH_CHECK_VALUE(window[i] >= 1, s.op, ": window_size must be >= 1, got ", window);
    TORCH_CHECK_VALUE(shift[i] >= 0 && shift[i] < window[i], s.op,
                      ": shift_size must be in [0, window_size), got shift_size ", shift,
                      " and window_size ", window);
    s.args.window[a] = window[i];
    s.args.shift[a] = shift[i];
    table *= 2 * window[i] - 1;
  }
  if (rpb.has_value()) {
    TORCH_CHECK_VALUE(rpb->dim() == 2 && rpb->size(0) == table && rpb->size(1) == s.H, s.op,
                      ": rpb must have shape [", table, ", ", s.H,
                      "] (timm/HF relative_position_bias_table: [prod(2W-1), heads]), got ",
                      rpb->sizes());
    TORCH_CHECK_TYPE(rpb->scalar_type() == q.scalar_type(), s.op,
                     ": rpb must have the dtype of q (", q.scalar_type(), "), got ",
                     rpb->scalar_type());
    TORCH_CHECK_VALUE(rpb->device() == q.device(), s.op, ": rpb must be on the device of q");
  }
  for (auto [t, name, C] : {std::tuple{&k_pad, "k_pad", s.D}, std::tuple{&v_pad, "v_pad", s.Dv}}) {
    if (!t->has_value()) continue;
    TORCH_CHECK_VALUE((*t)->dim() == 2 && (*t)->size(0) == s.Hkv && (*t)->size(1) == C, s.op,
                      ": ", name, " must have shape [", s.Hkv, ", ", C,
                      "] (kv heads, head_dim), got ", (*t)->sizes());
    TORCH_CHECK_TYPE((*t)->scalar_type() == q.scalar_type(), s.op, ": ", name,
                     " must have the dtype of q");
    TORCH_CHECK_VALUE((*t)->device() == q.device(), s.op, ": ", name, " must be on the device of q");
  }
  window_tiles(s.args, s.args.q_tile, cpu::kAttnTileQ);
  window_tiles(s.args, s.args.k_tile, cpu::kAttnTileK);
  make_sequences(s);
  return s;
}

/// [B, *spatial, H, C] -> [B*N, H, C] in the kernel's token order (dilation groups first).
at::Tensor to_tokens(const WinShapes& s, const at::Tensor& x) {
  at::Tensor t = x.reshape({s.B, s.N, x.size(-2), x.size(-1)});
  if (s.G > 1) t = t.index_select(1, s.perm);
  return t.reshape({s.B * s.N, x.size(-2), x.size(-1)});
}

/// Inverse of to_tokens for a [B*N, ...] result, into a tensor shaped like `like`.
at::Tensor from_tokens(const WinShapes& s, const at::Tensor& t, at::IntArrayRef shape) {
  std::vector<int64_t> tail(t.sizes().begin() + 1, t.sizes().end());
  std::vector<int64_t> bn{s.B, s.N};
  bn.insert(bn.end(), tail.begin(), tail.end());
  at::Tensor x = t.reshape(bn);
  if (s.G > 1) x = at::empty_like(x).index_copy_(1, s.perm, x);
  return x.reshape(shape).contiguous();
}

/// The user's bias table in the kernel's canonical layout [H, R0, R1, R2] indexed by
/// (key - query) + (R - 1) / 2, times log2(e). NA tables are [H, 2k-1, ...] already indexed
/// by key - query; Swin tables are [prod(2W-1), H] indexed by query - key (flip every axis).
at::Tensor canonical_bias(const WinShapes& s, const at::Tensor& rpb, at::ScalarType ct,
                          int64_t* R) {
  for (int a = 0; a < 3; ++a)
    R[a] = s.args.kind == WindowMask::kSwin ? 2 * s.args.window[a] - 1 : 2 * s.args.kernel[a] - 1;
  at::Tensor c = s.args.kind == WindowMask::kSwin
                     ? rpb.t().reshape({s.H, R[0], R[1], R[2]}).flip({1, 2, 3})
                     : rpb.reshape({s.H, R[0], R[1], R[2]});
  return (c.to(ct) * kLog2ed).contiguous();
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

at::Tensor bias_grad_to_user(const WinShapes& s, const at::Tensor& g, const at::Tensor& rpb) {
  if (s.args.kind == WindowMask::kSwin)
    return g.flip({1, 2, 3}).reshape({s.H, -1}).t().contiguous().to(rpb.scalar_type());
  return g.reshape(rpb.sizes()).to(rpb.scalar_type());
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
  p.q = make_operand<T>(to_tokens(s, q), p.Dp, false, keep);
  // Key tiles are gathered by rows and transposed inside the kernel (no K^T pass here).
  p.k = make_operand<T>(to_tokens(s, k), p.Dp, false, keep);
  p.v = make_operand<T>(to_tokens(s, v), p.Dvp, true, keep);
  at::Tensor out_t = at::empty({p.Tq, s.H, s.Dv}, q.options().dtype(ct));
  at::Tensor lse_t = at::empty({p.Tq, s.H}, q.options().dtype(ct));
  p.o = out_t.mutable_data_ptr<T>();
  p.lse = lse_t.mutable_data_ptr<T>();
  const WindowInputs<T> in = window_inputs<T>(s, rpb, k_pad, v_pad, ct);
  run_fwd_kernel(p, s.args, in.x);
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

template <class T>
void bwd_impl(const WinShapes& s, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
              const std::optional<at::Tensor>& v_pad, const at::Tensor& out,
              const at::Tensor& lse, double scale, WinGrads& g) {
  const at::ScalarType ct = compute_type(q);
  // Dilation groups are separate sequences: B * G of them, sharing the boundaries s.cu.
  AttentionParams<T> p =
      sequence_params<T>(s.cu, s.cu, s.H, s.Hkv, s.B * s.N, s.B * s.N, s.D, s.Dv, scale);
  at::Tensor delta = (dout.to(ct) * out.to(ct)).sum(-1);
  if (dlse.has_value()) delta = delta - dlse->to(ct);
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
  const GradBuffers gb = grad_buffers(p, q.options());
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

  const auto [dq_t, dk_t, dv_t] = grads_to_tokens(gb, p, scale);
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

void check_bwd_tensors(const WinShapes& s, const at::Tensor& q, const at::Tensor& dout,
                       const std::optional<at::Tensor>& dlse, const at::Tensor& out,
                       const at::Tensor& lse) {
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(out_shape) && out.sizes() == dout.sizes(),
                    s.op, "_bwd: grad_out and out must have shape ", out_shape, ", got ",
                    dout.sizes(), " and ", out.sizes());
  const at::ScalarType ct = compute_type(q);
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, q.dim() - 1) && lse.scalar_type() == ct,
                    s.op, "_bwd: lse must be ", ct, " of shape ", q.sizes().slice(0, q.dim() - 1),
                    ", got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(!dlse.has_value() || dlse->sizes() == lse.sizes(), s.op,
                    "_bwd: grad_lse must have the shape of lse");
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
  const WinShapes s = check_na(q, k, v, rpb, kernel, dilation, stride, causal, scale);
  return fwd_dispatch(s, q, k, v, rpb, std::nullopt, std::nullopt, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
    const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef kernel,
    at::IntArrayRef dilation, at::IntArrayRef stride, const c10::List<bool>& causal, double scale) {
  const WinShapes s = check_na(q, k, v, rpb, kernel, dilation, stride, causal, scale);
  WinGrads g = bwd_dispatch(s, dout, dlse, q, k, v, rpb, std::nullopt, std::nullopt, out, lse, scale);
  return {g.dq, g.dk, g.dv, g.drpb};
}

std::tuple<at::Tensor, at::Tensor> window_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& rpb, const std::optional<at::Tensor>& k_pad,
    const std::optional<at::Tensor>& v_pad, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  const WinShapes s = check_swin(q, k, v, rpb, k_pad, v_pad, window, shift, scale);
  return fwd_dispatch(s, q, k, v, rpb, k_pad, v_pad, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& rpb,
    const std::optional<at::Tensor>& k_pad, const std::optional<at::Tensor>& v_pad,
    const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef window, at::IntArrayRef shift,
    double scale) {
  const WinShapes s = check_swin(q, k, v, rpb, k_pad, v_pad, window, shift, scale);
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
