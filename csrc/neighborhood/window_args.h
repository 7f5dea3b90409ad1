// SPDX-License-Identifier: Apache-2.0
// Argument checks, dilation-group token order and bias-table layouts of the neighborhood and
// Swin window ops, shared by the CPU and CUDA adapters (ATen only; each adapter checks the
// device of q and picks its own tile shapes).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

#include "aten_utils.h"
#include "tilefuse/attention/window.h"

namespace tilefuse {

/// What one call computes, after the checks.
struct WinShapes {
  std::string op;  // "na2d", "window_attention" (error messages)
  int64_t R = 0;   // spatial rank
  int64_t B = 0, H = 0, Hkv = 0, D = 0, Dv = 0, N = 0, G = 1;
  WindowMask::Args args;
  at::Tensor perm;  // group-major position -> row-major position (only when G > 1)
  at::Tensor cu;    // int64 [B * G + 1] sequence offsets (batch element, dilation group)
};

inline std::vector<int64_t> spatial_of(const at::Tensor& t, int64_t R) {
  return std::vector<int64_t>(t.sizes().begin() + 1, t.sizes().begin() + 1 + R);
}

inline void check_common(WinShapes& s, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, double scale, int64_t R) {
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
  s.N = 1;
  for (int64_t a = 0; a < R; ++a) {
    TORCH_CHECK_VALUE(q.size(1 + a) > 0, op, ": spatial sizes must be > 0, got q ", q.sizes());
    s.args.size[3 - R + a] = q.size(1 + a);
    s.N *= q.size(1 + a);
  }
}

inline void check_rank_list(const WinShapes& s, size_t n, const char* name, int64_t R) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(n) == R, s.op, ": ", name, " must have ", R,
                    " entries (one per spatial axis), got ", n);
}

inline void make_sequences(WinShapes& s) {
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

inline WinShapes check_na(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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
  bool blocked = true;
  for (int a = 0; a < 3; ++a) blocked = blocked && s.args.stride[a] == s.args.kernel[a];
  if (blocked)  // disjoint windows, like Swin: the tilers keep one window per tile
    for (int a = 0; a < 3; ++a) s.args.window[a] = s.args.kernel[a];
  make_sequences(s);
  return s;
}

inline WinShapes check_swin(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& rpb,
                            const std::optional<at::Tensor>& k_pad,
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
  make_sequences(s);
  return s;
}

/// [B, *spatial, H, C] -> [B*N, H, C] in the kernel's token order (dilation groups first).
inline at::Tensor to_tokens(const WinShapes& s, const at::Tensor& x) {
  at::Tensor t = x.reshape({s.B, s.N, x.size(-2), x.size(-1)});
  if (s.G > 1) t = t.index_select(1, s.perm.to(x.device()));
  return t.reshape({s.B * s.N, x.size(-2), x.size(-1)});
}

/// Inverse of to_tokens for a [B*N, ...] result, into a tensor shaped like `like`.
inline at::Tensor from_tokens(const WinShapes& s, const at::Tensor& t, at::IntArrayRef shape) {
  std::vector<int64_t> tail(t.sizes().begin() + 1, t.sizes().end());
  std::vector<int64_t> bn{s.B, s.N};
  bn.insert(bn.end(), tail.begin(), tail.end());
  at::Tensor x = t.reshape(bn);
  if (s.G > 1) x = at::empty_like(x).index_copy_(1, s.perm.to(x.device()), x);
  return x.reshape(shape).contiguous();
}

/// The user's bias table in the kernel's canonical layout [H, R0, R1, R2] indexed by
/// (key - query) + (R - 1) / 2, times log2(e). NA tables are [H, 2k-1, ...] already indexed
/// by key - query; Swin tables are [prod(2W-1), H] indexed by query - key (flip every axis).
inline at::Tensor canonical_bias(const WinShapes& s, const at::Tensor& rpb, at::ScalarType ct,
                                 int64_t* R) {
  for (int a = 0; a < 3; ++a)
    R[a] = s.args.kind == WindowMask::kSwin ? 2 * s.args.window[a] - 1 : 2 * s.args.kernel[a] - 1;
  at::Tensor c = s.args.kind == WindowMask::kSwin
                     ? rpb.t().reshape({s.H, R[0], R[1], R[2]}).flip({1, 2, 3})
                     : rpb.reshape({s.H, R[0], R[1], R[2]});
  return (c.to(ct) * kLog2ed).contiguous();
}

inline at::Tensor bias_grad_to_user(const WinShapes& s, const at::Tensor& g,
                                    const at::Tensor& rpb) {
  if (s.args.kind == WindowMask::kSwin)
    return g.flip({1, 2, 3}).reshape({s.H, -1}).t().contiguous().to(rpb.scalar_type());
  return g.reshape(rpb.sizes()).to(rpb.scalar_type());
}

inline void check_bwd_tensors(const WinShapes& s, const at::Tensor& q, const at::Tensor& dout,
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

}  // namespace tilefuse
