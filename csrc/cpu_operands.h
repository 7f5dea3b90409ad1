// SPDX-License-Identifier: Apache-2.0
// Operand preparation shared by the CPU attention adapters (dense and window families):
// compute type, strided fp32/fp64 views or copies, transposed K/V buffers. ATen-side only.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <vector>

#include "aten_utils.h"
#include "tilefuse/cpu/attention.h"
#include "tilefuse/cpu/isa.h"

namespace tilefuse {

/// Repacks x [Tn, H, C] per head into buf (head-major rows of `width`, or 16-column panels),
/// zero padded, with the kernels' parallel copy (ATen's permuted copy_ runs at ~1 GB/s here).
template <class T>
void pack(const at::Tensor& x, at::Tensor& buf, int64_t width, bool panel) {
  at::Tensor src = x;
  if (src.scalar_type() != c10::CppTypeToScalarType<T>::value || src.stride(2) != 1)
    src = src.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const Operand<T> op{src.const_data_ptr<T>(), src.stride(0), src.stride(1)};
  const ParallelRunner r = aten_runner();
  advise_huge_pages(buf);
  T* dst = buf.mutable_data_ptr<T>();
  if (cpu::current_isa() == cpu::Isa::kAvx2)
    cpu::avx2::pack_heads(op, src.size(1), src.size(0), src.size(2), dst, width, panel, r);
  else
    cpu::generic::pack_heads(op, src.size(1), src.size(0), src.size(2), dst, width, panel, r);
}

/// [Tn, H, C] -> a strided view for the kernels. Zero-copy when x already has the compute
/// dtype and unit stride along C (and, for a GEMM B operand, C is a multiple of 16); otherwise
/// a copy, zero padded to Cp columns for B operands, kept alive in `keep`.
/// head_major: the rows of one head must be contiguous ([H, Tn, width]), else x is copied so.
/// Ask for it when the tiles re-read each row many times: token-major rows lie H * C apart
/// (2 KB for H * C = 512 floats), which folds a tile's rows onto a few L1 sets and makes the
/// tile GEMMs miss L1 (measured: the dense forward at S = 4096, H = 8, D = 64 runs ~10%
/// faster on head-major q and v).
template <class T>
Operand<T> make_operand(const at::Tensor& x, int64_t Cp, bool b_operand,
                        std::vector<at::Tensor>& keep, bool head_major = false) {
  const int64_t C = x.size(2);
  const bool rows_ok = !head_major || x.size(1) == 1 || x.size(0) <= 1 || x.stride(0) == C;
  if (x.scalar_type() == c10::CppTypeToScalarType<T>::value && x.stride(2) == 1 &&
      (!b_operand || C == Cp) && rows_ok) {
    keep.push_back(x);  // x may be a temporary (a reshape that copied)
    return {x.const_data_ptr<T>(), x.stride(0), x.stride(1)};
  }
  const int64_t width = b_operand ? Cp : C;
  auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  if (head_major) {
    at::Tensor buf = at::empty({x.size(1), x.size(0), width}, opts);
    pack<T>(x, buf, width, false);
    keep.push_back(buf);
    return {buf.const_data_ptr<T>(), buf.stride(1), buf.stride(0)};
  }
  at::Tensor buf = width == C ? at::empty({x.size(0), x.size(1), width}, opts)
                              : at::zeros({x.size(0), x.size(1), width}, opts);
  buf.narrow(2, 0, C).copy_(x);
  keep.push_back(buf);
  return {buf.const_data_ptr<T>(), buf.stride(0), buf.stride(1)};
}

/// The forward's V operand panel-major: [Tn, H, C] -> [H, Cp / 16, Tn, 16] (zero padded), so
/// that the P V GEMM reads each 16-column panel from consecutive cache lines (row-major rows
/// Cp apart fold onto a quarter of the L1 sets at Cp = 64; measured 86 -> 96 GFLOP/s for the
/// 64 x 64 x 128 tile GEMM). Sets p.v and p.v_ps; the copy is kept alive in `keep`.
template <class T>
void panel_major_v(const at::Tensor& x, AttentionParams<T>& p, std::vector<at::Tensor>& keep) {
  const int64_t Tn = x.size(0), H = x.size(1), C = x.size(2), Cp = round_up(C, 16);
  auto opts = x.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor buf = at::empty({H, Cp / 16, Tn, 16}, opts);
  pack<T>(x, buf, Cp, true);
  keep.push_back(buf);
  p.v = {buf.const_data_ptr<T>(), 16, Cp * Tn};
  p.v_ps = 16 * Tn;
}

/// An operand [Tn, H, C] -> [H, C, Tn + 16]: transposed, 16 zero columns past the end.
template <class T>
at::Tensor transposed(const Operand<T>& src, int64_t H, int64_t Tn, int64_t C,
                      const at::TensorOptions& opts) {
  at::Tensor buf = at::empty({H, C, Tn + 16}, opts.dtype(c10::CppTypeToScalarType<T>::value));
  advise_huge_pages(buf);
  const ParallelRunner r = aten_runner();
  T* dst = buf.mutable_data_ptr<T>();
  if (cpu::current_isa() == cpu::Isa::kAvx2)
    cpu::avx2::transpose_heads(src, H, Tn, C, dst, Tn + 16, r);
  else
    cpu::generic::transpose_heads(src, H, Tn, C, dst, Tn + 16, r);
  return buf;
}

/// The shape fields of AttentionParams for B packed sequences: cu_q / cu_k are int64 [B + 1]
/// boundaries (kept alive by the caller), feature dims padded to 16 for B operands, K^T / V^T
/// with 16 readable columns past the Tk tokens.
template <class T>
AttentionParams<T> sequence_params(const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t H,
                                   int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, int64_t Dv,
                                   double scale) {
  AttentionParams<T> p;
  p.cu_q = cu_q.const_data_ptr<int64_t>();
  p.cu_k = cu_k.const_data_ptr<int64_t>();
  p.B = cu_q.size(0) - 1;
  p.H = H;
  p.Hkv = Hkv;
  p.Tq = Tq;
  p.Tk = Tk;
  p.D = D;
  p.Dv = Dv;
  p.Dp = round_up(D, 16);
  p.Dvp = round_up(Dv, 16);
  p.ldkt = p.ldvt = Tk + 16;
  p.scale = static_cast<T>(scale);
  return p;
}

/// Backward work split shared by the drivers: one item per (head, sequence), plus chunks of
/// key tiles (each with its own dQ partial, summed afterwards: no atomics) only when those
/// items alone cannot keep the threads busy.
inline int64_t backward_kv_chunks(int64_t items, int64_t max_key_tiles) {
  const int64_t threads = at::get_num_threads();
  return items >= 2 * threads ? 1 : std::min(max_key_tiles, ceil_div(4 * threads, items));
}

/// The backward's delta = rowsum(dout * out) - dlse, [..., H] in the compute type ct. One
/// pass over both (no dout * out temporary) when they are contiguous ct tensors.
inline at::Tensor softmax_delta(const at::Tensor& dout, const at::Tensor& out,
                                const std::optional<at::Tensor>& dlse, at::ScalarType ct) {
  at::Tensor delta;
  if (dout.scalar_type() == ct && out.scalar_type() == ct && dout.is_contiguous() &&
      out.is_contiguous() && dout.sizes() == out.sizes() && out.dim() > 0) {
    delta = at::empty(out.sizes().slice(0, out.dim() - 1), out.options());
    const int64_t C = out.size(-1), rows = delta.numel();
    AT_DISPATCH_FLOATING_TYPES(ct, "softmax_delta", [&] {
      const scalar_t *a = dout.const_data_ptr<scalar_t>(), *b = out.const_data_ptr<scalar_t>();
      scalar_t* d = delta.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, 2048, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t *x = a + r * C, *y = b + r * C;
          scalar_t acc[4] = {0, 0, 0, 0};
          int64_t c = 0;
          for (; c + 4 <= C; c += 4)
            for (int u = 0; u < 4; ++u) acc[u] += x[c + u] * y[c + u];
          for (; c < C; ++c) acc[0] += x[c] * y[c];
          d[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
      });
    });
  } else {
    delta = (dout.to(ct) * out.to(ct)).sum(-1);
  }
  if (dlse.has_value()) delta = delta - dlse->to(ct);
  return delta;
}

/// The backward's accumulators, zeroed and wired into p: dQ partials [chunks, H, Tq, Dp]
/// (p.n_kv_chunks must be set), dK / dV per query head [H, Tk, Dp | Dvp].
struct GradBuffers {
  at::Tensor dq, dk, dv;
};

template <class T>
GradBuffers grad_buffers(AttentionParams<T>& p, const at::TensorOptions& opts) {
  auto o = opts.dtype(c10::CppTypeToScalarType<T>::value);
  GradBuffers g{zeros_huge({p.n_kv_chunks, p.H, p.Tq, p.Dp}, o), zeros_huge({p.H, p.Tk, p.Dp}, o),
                zeros_huge({p.H, p.Tk, p.Dvp}, o)};
  p.dq = g.dq.mutable_data_ptr<T>();
  p.dk = g.dk.mutable_data_ptr<T>();
  p.dv = g.dv.mutable_data_ptr<T>();
  return g;
}

/// Accumulators -> token-major [T, H, C] views in the compute type: the dQ partials summed and
/// scaled, dK / dV summed over each GQA group, feature padding dropped.
template <class T>
std::array<at::Tensor, 3> grads_to_tokens(const GradBuffers& g, const AttentionParams<T>& p,
                                          double scale) {
  const int64_t G = p.H / p.Hkv;
  at::Tensor dq = (p.n_kv_chunks == 1 ? g.dq[0] : g.dq.sum(0)).narrow(2, 0, p.D);
  // Without GQA the per-query-head buffers are the result (a sum over one head would copy).
  at::Tensor dk = (G == 1 ? g.dk : g.dk.view({p.Hkv, G, p.Tk, p.Dp}).sum(1)).narrow(2, 0, p.D);
  at::Tensor dv = (G == 1 ? g.dv : g.dv.view({p.Hkv, G, p.Tk, p.Dvp}).sum(1)).narrow(2, 0, p.Dv);
  return {dq.permute({1, 0, 2}).mul(scale), dk.permute({1, 0, 2}), dv.permute({1, 0, 2})};
}

}  // namespace tilefuse
