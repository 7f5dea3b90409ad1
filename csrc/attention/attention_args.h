// SPDX-License-Identifier: Apache-2.0
// Argument checks and token layouts of the dense attention ops, shared by the CPU and CUDA
// adapters (ATen only; the device of q is checked by each adapter).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "aten_utils.h"

namespace tilefuse {

struct AttnShapes {
  bool varlen = false;
  int64_t B = 0, H = 0, Hkv = 0, Sq = 0, Sk = 0, Tq = 0, Tk = 0, D = 0, Dv = 0;
  at::Tensor cu_q, cu_k;  // int64 [B + 1] on the CPU
};

inline void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "attention: ", name,
                   " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "attention: ", name,
                    " must be on the device of q (", q.device(), "), got ", t.device());
}

inline at::Tensor check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total,
                                   int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "attention: ", name, " must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, "attention: ", name,
                    " must be 1-D with batch + 1 entries, got shape ", cu.sizes());
  // Read on the host: a CUDA cu_seqlens costs one small copy (FlashAttention keeps them there).
  at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  const int64_t n = c.size(0);
  TORCH_CHECK_VALUE(p[0] == 0, "attention: ", name, "[0] must be 0, got ", p[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], "attention: ", name, " must be non-decreasing, but ",
                      name, "[", i, "] = ", p[i], " < ", p[i - 1]);
    longest = std::max(longest, p[i] - p[i - 1]);
  }
  TORCH_CHECK_VALUE(p[n - 1] == total, "attention: ", name, "[-1] = ", p[n - 1],
                    " must equal the number of packed tokens (", total, ")");
  TORCH_CHECK_VALUE(max_seqlen < 0 || max_seqlen >= longest, "attention: ", max_name, " = ",
                    max_seqlen, " is smaller than the longest sequence in ", name, " (", longest,
                    ")");
  return c;
}

inline AttnShapes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& cu_q,
                               const std::optional<at::Tensor>& cu_k, int64_t max_q,
                               int64_t max_k, double scale, int64_t wl, int64_t wr) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                       q.scalar_type() == at::kHalf || q.scalar_type() == at::kDouble,
                   "attention: q must be float32, bfloat16, float16 or float64, got ",
                   q.scalar_type());
  check_float_tensor(k, "k", q);
  check_float_tensor(v, "v", q);
  TORCH_CHECK_VALUE(cu_q.has_value() == cu_k.has_value(),
                    "attention: cu_seqlens_q and cu_seqlens_k must be given together");
  TORCH_CHECK_VALUE(std::isfinite(scale), "attention: scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(wl >= -1 && wr >= -1, "attention: window sizes must be >= -1 (-1 = unbounded), got (",
                    wl, ", ", wr, ")");
  AttnShapes s;
  s.varlen = cu_q.has_value();
  const int64_t rank = s.varlen ? 3 : 4;
  const char* layout = s.varlen ? "[total, heads, head_dim] (varlen)" : "[batch, seq, heads, head_dim]";
  TORCH_CHECK_VALUE(q.dim() == rank, "attention: q must be ", layout, ", got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == rank, "attention: k must be ", layout, ", got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == rank, "attention: v must be ", layout, ", got shape ", v.sizes());
  const int64_t o = rank - 3;  // offset of the token axis
  s.H = q.size(o + 1);
  s.Hkv = k.size(o + 1);
  s.D = q.size(o + 2);
  s.Dv = v.size(o + 2);
  TORCH_CHECK_VALUE(s.D > 0, "attention: head_dim of q must be > 0, got shape ", q.sizes());
  TORCH_CHECK_VALUE(s.Dv > 0, "attention: head_dim of v must be > 0, got shape ", v.sizes());
  TORCH_CHECK_VALUE(k.size(o + 2) == s.D, "attention: k head_dim (", k.size(o + 2),
                    ") must equal q head_dim (", s.D, ")");
  TORCH_CHECK_VALUE(s.H > 0 && s.Hkv > 0, "attention: heads must be > 0, got q ", q.sizes(),
                    " and k ", k.sizes());
  TORCH_CHECK_VALUE(v.size(o + 1) == s.Hkv, "attention: v heads (", v.size(o + 1),
                    ") must equal k heads (", s.Hkv, ")");
  TORCH_CHECK_VALUE(s.H % s.Hkv == 0, "attention: q heads (", s.H,
                    ") must be a multiple of k/v heads (", s.Hkv, ")");
  TORCH_CHECK_VALUE(v.size(o) == k.size(o), "attention: v tokens (", v.size(o),
                    ") must equal k tokens (", k.size(o), ")");
  if (s.varlen) {
    s.Tq = q.size(0);
    s.Tk = k.size(0);
    s.cu_q = check_cu_seqlens(*cu_q, "cu_seqlens_q", s.Tq, max_q, "max_seqlen_q");
    s.cu_k = check_cu_seqlens(*cu_k, "cu_seqlens_k", s.Tk, max_k, "max_seqlen_k");
    TORCH_CHECK_VALUE(s.cu_q.size(0) == s.cu_k.size(0), "attention: cu_seqlens_q (",
                      s.cu_q.size(0), " entries) and cu_seqlens_k (", s.cu_k.size(0),
                      ") must describe the same number of sequences");
    s.B = s.cu_q.size(0) - 1;
  } else {
    s.B = q.size(0);
    TORCH_CHECK_VALUE(k.size(0) == s.B && v.size(0) == s.B, "attention: batch sizes differ: q ",
                      q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
    s.Sq = q.size(1);
    s.Sk = k.size(1);
    s.Tq = s.B * s.Sq;
    s.Tk = s.B * s.Sk;
    s.cu_q = at::arange(0, s.B + 1, at::kLong) * s.Sq;
    s.cu_k = at::arange(0, s.B + 1, at::kLong) * s.Sk;
  }
  return s;
}

inline at::Tensor tokens(const at::Tensor& x, bool varlen) {  // [B, S, H, C] -> [B*S, H, C]
  return varlen ? x : x.reshape({-1, x.size(2), x.size(3)});
}

/// Keys compacted by a key mask: the visible keys of each sequence, packed in the varlen
/// layout. Exact because attention without a position-dependent mask does not depend on the
/// order of the keys; this keeps padding masks (BERT-style) a pure copy of K and V.
struct PackedKeys {
  AttnShapes s;  // varlen shapes: q as [B*Sq, H, D], keys as [visible, Hkv, D]
  at::Tensor k, v, index;
};

inline PackedKeys pack_keys(const AttnShapes& s0, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& key_mask, int64_t wl, int64_t wr) {
  TORCH_CHECK_VALUE(!s0.varlen,
                    "attention: key_mask applies to [batch, seq, heads, head_dim] inputs; with "
                    "cu_seqlens leave masked keys out of the packed sequences instead");
  TORCH_CHECK_NOT_IMPLEMENTED(wl < 0 && wr < 0,
                              "attention: key_mask combined with causal or window is not "
                              "implemented");
  TORCH_CHECK_TYPE(key_mask.scalar_type() == at::kBool, "attention: key_mask must be bool, got ",
                   key_mask.scalar_type());
  TORCH_CHECK_VALUE(key_mask.dim() == 2 && key_mask.size(0) == s0.B && key_mask.size(1) == s0.Sk,
                    "attention: key_mask must have shape [batch, seq_k] = [", s0.B, ", ", s0.Sk,
                    "], got ", key_mask.sizes());
  TORCH_CHECK_VALUE(key_mask.device() == k.device(), "attention: key_mask must be on the device of k");
  PackedKeys r;
  r.s = s0;
  r.s.varlen = true;
  const at::Tensor km = key_mask.contiguous();
  r.index = km.reshape({-1}).nonzero().squeeze(1);
  r.s.Tk = r.index.numel();
  r.s.cu_k = at::cat({at::zeros({1}, at::kLong), km.sum(1, false, at::kLong).cumsum(0).cpu()});
  r.k = tokens(k, false).index_select(0, r.index);
  r.v = tokens(v, false).index_select(0, r.index);
  return r;
}

inline void check_bwd_args(const AttnShapes& s, const at::Tensor& dout,
                           const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                           const at::Tensor& out, const at::Tensor& lse) {
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(out_shape) && out.sizes() == dout.sizes(),
                    "attention_bwd: grad_out and out must have shape ", out_shape, ", got ",
                    dout.sizes(), " and ", out.sizes());
  const at::ScalarType ct = compute_type(q);
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, q.dim() - 1) && lse.scalar_type() == ct,
                    "attention_bwd: lse must be ", ct, " of shape ",
                    q.sizes().slice(0, q.dim() - 1), ", got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(!dlse.has_value() || dlse->sizes() == lse.sizes(),
                    "attention_bwd: grad_lse must have the shape of lse");
}

}  // namespace tilefuse
