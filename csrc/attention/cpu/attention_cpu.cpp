// SPDX-License-Identifier: Apache-2.0
// CPU adapter of the attention ops: argument checks, fp32 operand buffers, kernel dispatch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "attention/attention_args.h"
#include "aten_utils.h"
#include "cpu_operands.h"
#include "tilefuse/cpu/attention.h"
#include "tilefuse/cpu/isa.h"

namespace tilefuse {
namespace {

/// Whether the tiles re-read each q / k / v row often enough to pay for head-major / panel-major
/// copies (make_operand, panel_major_v): sequences of two or more query and key tiles, and in
/// the forward not a narrow band, whose rows are re-read by only ~(BQ + wl + wr) / BK tiles
/// (measured at window (256, 256), S = 16384: 188 ms forward without the copies, 196-208 ms
/// with them). The backward streams q and dout once per key tile, so a band's backward still
/// gains (kernel alone at (256, 256), S = 16384, one thread: ~10-15% faster head-major).
bool reused_rows(const AttnShapes& s, int64_t wl, int64_t wr, bool backward) {
  const bool narrow_band = wl >= 0 && wr >= 0 && wl + wr + cpu::kAttnTileQ < 8 * cpu::kAttnTileK;
  return s.B > 0 && (backward || !narrow_band) && s.Tq >= 2 * cpu::kAttnTileQ * s.B &&
         s.Tk >= 2 * cpu::kAttnTileK * s.B;
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
  const bool hm = reused_rows(s, wl, wr, false);
  p.q = make_operand<T>(tokens(q, s.varlen), p.Dp, false, keep, hm);
  const Operand<T> k_op = make_operand<T>(tokens(k, s.varlen), p.Dp, false, keep);
  at::Tensor ktb = transposed(k_op, s.Hkv, s.Tk, s.D, q.options());
  if (hm)
    panel_major_v(tokens(v, s.varlen), p, keep);
  else
    p.v = make_operand<T>(tokens(v, s.varlen), p.Dvp, true, keep);
  p.kt = ktb.const_data_ptr<T>();
  p.o = out.mutable_data_ptr<T>();
  p.lse = lse.mutable_data_ptr<T>();
  run_fwd(p, wl, wr);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
    int64_t max_k, double scale, int64_t wl, int64_t wr,
    const std::optional<at::Tensor>& key_mask) {
  const AttnShapes s = check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention: the CPU kernel got q on ", q.device());
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  std::vector<int64_t> lse_shape(q.sizes().begin(), q.sizes().end() - 1);
  const at::ScalarType ct = compute_type(q);
  at::Tensor out_c = empty_huge(out_shape, q.options().dtype(ct));
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
  at::Tensor delta = softmax_delta(dout, out, dlse, ct);
  delta = tokens(delta.unsqueeze(-1), vl).squeeze(-1).contiguous();
  at::Tensor lse_c = tokens(lse.unsqueeze(-1), vl).squeeze(-1).contiguous();
  std::vector<at::Tensor> keep;
  const bool hm = reused_rows(s, wl, wr, true);
  p.q = make_operand<T>(tokens(q, vl), p.Dp, true, keep, hm);
  p.k = make_operand<T>(tokens(k, vl), p.Dp, true, keep, hm);
  const Operand<T> v_op = make_operand<T>(tokens(v, vl), p.Dvp, false, keep);
  p.dout = make_operand<T>(tokens(dout, vl), p.Dvp, true, keep, hm);
  at::Tensor ktb = transposed(p.k, s.Hkv, s.Tk, s.D, q.options());
  at::Tensor vtb = transposed(v_op, s.Hkv, s.Tk, s.Dv, q.options());

  int64_t max_k_tiles = 1;
  const int64_t* ck = s.cu_k.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < s.B; ++b)
    max_k_tiles = std::max(max_k_tiles, ceil_div(ck[b + 1] - ck[b], cpu::kAttnTileK));
  p.n_kv_chunks = backward_kv_chunks(s.H * s.B, max_k_tiles);
  p.kt = ktb.const_data_ptr<T>();
  p.vt = vtb.const_data_ptr<T>();
  p.lse_in = lse_c.const_data_ptr<T>();
  p.delta = delta.const_data_ptr<T>();
  at::Tensor dq_o = tokens(dq, vl), dk_o = tokens(dk, vl), dv_o = tokens(dv, vl);
  const auto is_t = [](const at::Tensor& x) {
    return x.scalar_type() == c10::CppTypeToScalarType<T>::value && x.is_contiguous();
  };
  if (s.H == s.Hkv && p.n_kv_chunks == 1 && p.Dp == s.D && p.Dvp == s.Dv && is_t(dq_o) &&
      is_t(dk_o) && is_t(dv_o)) {
    // The kernel writes the callers' outputs directly (dq arrives zeroed).
    p.grads_token_major = true;
    p.dq = dq_o.mutable_data_ptr<T>();
    p.dk = dk_o.mutable_data_ptr<T>();
    p.dv = dv_o.mutable_data_ptr<T>();
    run_bwd(p, wl, wr);
    return;
  }
  const GradBuffers gb = grad_buffers(p, q.options());
  run_bwd(p, wl, wr);
  // Back to the callers' layouts and dtype.
  const auto [dq_t, dk_t, dv_t] = grads_to_tokens(gb, p, scale);
  dq_o.copy_(dq_t);
  dk_o.copy_(dk_t);
  dv_o.copy_(dv_t);
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
    int64_t max_k, double scale, int64_t wl, int64_t wr,
    const std::optional<at::Tensor>& key_mask) {
  const AttnShapes s = check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention: the CPU kernel got q on ", q.device());
  check_bwd_args(s, dout, dlse, q, out, lse);
  const at::ScalarType ct = compute_type(q);
  // dq must start at zero (the token-major backward accumulates into it); dk and dv are
  // overwritten in full unless keys are packed out (key_mask) or there is no work.
  const bool fills_dkv = !key_mask.has_value() && s.Tq > 0 && s.Tk > 0;
  at::Tensor dq = zeros_huge(q.sizes(), q.options());
  at::Tensor dk = fills_dkv ? empty_huge(k.sizes(), k.options()) : at::zeros(k.sizes(), k.options());
  at::Tensor dv = fills_dkv ? empty_huge(v.sizes(), v.options()) : at::zeros(v.sizes(), v.options());
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
