// SPDX-License-Identifier: Apache-2.0
// CPU adapter of the attention ops: argument checks, fp32 operand buffers, kernel dispatch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "aten_utils.h"
#include "cpu_operands.h"
#include "tilefuse/cpu/attention.h"
#include "tilefuse/cpu/isa.h"

namespace tilefuse {
namespace {

struct AttnShapes {
  bool varlen = false;
  int64_t B = 0, H = 0, Hkv = 0, Sq = 0, Sk = 0, Tq = 0, Tk = 0, D = 0, Dv = 0;
  at::Tensor cu_q, cu_k;  // int64 [B + 1] on the CPU
};

void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "attention: ", name,
                   " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "attention: ", name,
                    " must be on the device of q (", q.device(), "), got ", t.device());
}

at::Tensor check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total,
                            int64_t max_seqlen, const char* max_name) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "attention: ", name, " must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, "attention: ", name,
                    " must be 1-D with batch + 1 entries, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device().is_cpu(), "attention: ", name, " must be on the CPU like q");
  at::Tensor c = cu.to(at::kLong).contiguous();
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

AttnShapes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& cu_q,
                        const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
                        double scale, int64_t wl, int64_t wr) {
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
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention: the CPU kernel got q on ", q.device());
  return s;
}

at::Tensor tokens(const at::Tensor& x, bool varlen) {  // [B, S, H, C] -> [B*S, H, C]
  return varlen ? x : x.reshape({-1, x.size(2), x.size(3)});
}

template <class T>
void run_fwd(const AttentionParams<T>& p, int64_t wl, int64_t wr) {
  const ParallelRunner r = aten_runner();
  const bool avx2 = cpu::current_isa() == cpu::Isa::kAvx2;
  if (wl < 0 && wr < 0) {
    avx2 ? cpu::avx2::attention_fwd_dense(p, r) : cpu::generic::attention_fwd_dense(p, r);
  } else {
    const BandMask::Args m{wl, wr};
    avx2 ? cpu::avx2::attention_fwd_band(p, m, r) : cpu::generic::attention_fwd_band(p, m, r);
  }
}

template <class T>
void run_bwd(const AttentionParams<T>& p, int64_t wl, int64_t wr) {
  const ParallelRunner r = aten_runner();
  const bool avx2 = cpu::current_isa() == cpu::Isa::kAvx2;
  if (wl < 0 && wr < 0) {
    avx2 ? cpu::avx2::attention_bwd_dense(p, r) : cpu::generic::attention_bwd_dense(p, r);
  } else {
    const BandMask::Args m{wl, wr};
    avx2 ? cpu::avx2::attention_bwd_band(p, m, r) : cpu::generic::attention_bwd_band(p, m, r);
  }
}

template <class T>
void fwd_impl(const AttnShapes& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              double scale, int64_t wl, int64_t wr, at::Tensor& out, at::Tensor& lse) {
  AttentionParams<T> p =
      sequence_params<T>(s.cu_q, s.cu_k, s.H, s.Hkv, s.Tq, s.Tk, s.D, s.Dv, scale);
  std::vector<at::Tensor> keep;
  p.q = make_operand<T>(tokens(q, s.varlen), p.Dp, false, keep);
  const Operand<T> k_op = make_operand<T>(tokens(k, s.varlen), p.Dp, false, keep);
  at::Tensor ktb = transposed(k_op, s.Hkv, s.Tk, s.D, q.options());
  p.v = make_operand<T>(tokens(v, s.varlen), p.Dvp, true, keep);
  p.kt = ktb.const_data_ptr<T>();
  p.o = out.mutable_data_ptr<T>();
  p.lse = lse.mutable_data_ptr<T>();
  run_fwd(p, wl, wr);
}

/// Keys compacted by a key mask: the visible keys of each sequence, packed in the varlen
/// layout. Exact because attention without a position-dependent mask does not depend on the
/// order of the keys; this keeps padding masks (BERT-style) a pure copy of K and V.
struct PackedKeys {
  AttnShapes s;  // varlen shapes: q as [B*Sq, H, D], keys as [visible, Hkv, D]
  at::Tensor k, v, index;
};

PackedKeys pack_keys(const AttnShapes& s0, const at::Tensor& k, const at::Tensor& v,
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
  r.s.cu_k = at::cat({at::zeros({1}, at::kLong), km.sum(1, false, at::kLong).cumsum(0)});
  r.k = tokens(k, false).index_select(0, r.index);
  r.v = tokens(v, false).index_select(0, r.index);
  return r;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
    int64_t max_k, double scale, int64_t wl, int64_t wr,
    const std::optional<at::Tensor>& key_mask) {
  const AttnShapes s = check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  std::vector<int64_t> lse_shape(q.sizes().begin(), q.sizes().end() - 1);
  const at::ScalarType ct = compute_type(q);
  at::Tensor out_c = at::empty(out_shape, q.options().dtype(ct));
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(ct));
  if (key_mask.has_value()) {
    const PackedKeys pk = pack_keys(s, k, v, *key_mask, wl, wr);
    if (s.Tq > 0) {
      if (ct == at::kDouble)
        fwd_impl<double>(pk.s, tokens(q, false), pk.k, pk.v, scale, wl, wr, out_c, lse);
      else
        fwd_impl<float>(pk.s, tokens(q, false), pk.k, pk.v, scale, wl, wr, out_c, lse);
    }
  } else if (s.Tq > 0) {
    if (ct == at::kDouble)
      fwd_impl<double>(s, q, k, v, scale, wl, wr, out_c, lse);
    else
      fwd_impl<float>(s, q, k, v, scale, wl, wr, out_c, lse);
  }
  return {out_c.scalar_type() == q.scalar_type() ? out_c : out_c.to(q.scalar_type()), lse};
}

template <class T>
void bwd_impl(const AttnShapes& s, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& lse, double scale, int64_t wl, int64_t wr, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv) {
  AttentionParams<T> p =
      sequence_params<T>(s.cu_q, s.cu_k, s.H, s.Hkv, s.Tq, s.Tk, s.D, s.Dv, scale);
  const bool vl = s.varlen;
  const at::ScalarType ct = compute_type(q);
  at::Tensor delta = (dout.to(ct) * out.to(ct)).sum(-1);
  if (dlse.has_value()) delta = delta - dlse->to(ct);
  delta = tokens(delta.unsqueeze(-1), vl).squeeze(-1).contiguous();
  at::Tensor lse_c = tokens(lse.unsqueeze(-1), vl).squeeze(-1).contiguous();
  std::vector<at::Tensor> keep;
  p.q = make_operand<T>(tokens(q, vl), p.Dp, true, keep);
  p.k = make_operand<T>(tokens(k, vl), p.Dp, true, keep);
  const Operand<T> v_op = make_operand<T>(tokens(v, vl), p.Dvp, false, keep);
  p.dout = make_operand<T>(tokens(dout, vl), p.Dvp, true, keep);
  at::Tensor ktb = transposed(p.k, s.Hkv, s.Tk, s.D, q.options());
  at::Tensor vtb = transposed(v_op, s.Hkv, s.Tk, s.Dv, q.options());

  int64_t max_k_tiles = 1;
  const int64_t* ck = s.cu_k.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < s.B; ++b)
    max_k_tiles = std::max(max_k_tiles, ceil_div(ck[b + 1] - ck[b], cpu::kAttnTileK));
  p.n_kv_chunks = backward_kv_chunks(s.H * s.B, max_k_tiles);
  const GradBuffers gb = grad_buffers(p, q.options());
  p.kt = ktb.const_data_ptr<T>();
  p.vt = vtb.const_data_ptr<T>();
  p.lse_in = lse_c.const_data_ptr<T>();
  p.delta = delta.const_data_ptr<T>();
  run_bwd(p, wl, wr);

  // Back to the callers' layouts and dtype.
  const auto [dq_t, dk_t, dv_t] = grads_to_tokens(gb, p, scale);
  tokens(dq, vl).copy_(dq_t);
  tokens(dk, vl).copy_(dk_t);
  tokens(dv, vl).copy_(dv_t);
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
    int64_t max_k, double scale, int64_t wl, int64_t wr,
    const std::optional<at::Tensor>& key_mask) {
  const AttnShapes s = check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
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
  at::Tensor dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  if (key_mask.has_value()) {
    const PackedKeys pk = pack_keys(s, k, v, *key_mask, wl, wr);
    if (s.Tq == 0 || pk.s.Tk == 0) return {dq, dk, dv};
    at::Tensor dk_p = at::zeros_like(pk.k), dv_p = at::zeros_like(pk.v);
    at::Tensor dq_t = tokens(dq, false);
    std::optional<at::Tensor> dlse_t;
    if (dlse.has_value()) dlse_t = dlse->reshape({-1, s.H});
    auto run = [&](auto tag) {
      bwd_impl<decltype(tag)>(pk.s, tokens(dout, false), dlse_t, tokens(q, false), pk.k, pk.v,
                              tokens(out, false), lse.reshape({-1, s.H}), scale, wl, wr, dq_t,
                              dk_p, dv_p);
    };
    ct == at::kDouble ? run(double{}) : run(float{});
    tokens(dk, false).index_copy_(0, pk.index, dk_p);
    tokens(dv, false).index_copy_(0, pk.index, dv_p);
    return {dq, dk, dv};
  }
  if (s.Tq == 0 || s.Tk == 0) return {dq, dk, dv};
  if (ct == at::kDouble)
    bwd_impl<double>(s, dout, dlse, q, k, v, out, lse, scale, wl, wr, dq, dk, dv);
  else
    bwd_impl<float>(s, dout, dlse, q, k, v, out, lse, scale, wl, wr, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tilefuse, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace tilefuse
