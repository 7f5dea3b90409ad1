// SPDX-License-Identifier: Apache-2.0
// Argument checks and layout validation / transposition of block-sparse attention, shared by
// the CPU and CUDA adapters (ATen only; each adapter checks the device of q).
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <utility>

#include "aten_utils.h"
#include "tilefuse/attention/block_sparse.h"

namespace tilefuse {

inline constexpr const char* kOp = "block_sparse_attention";

struct BsShapes {
  int64_t B, Sq, Sk, H, Hkv, D, Dv, nq, nk;  // Sq, Sk: the longest sequence when packed
  int64_t Tq, Tk;
  at::Tensor cu_q, cu_k;  // int64 [B + 1]
};

/// Packed-sequence boundaries: int32 [B + 1], starting at 0, non-decreasing, ending at total.
inline at::Tensor check_cu_seqlens(const at::Tensor& cu, int64_t total, int64_t& longest) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, kOp, ": cu_seqlens must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, kOp,
                    ": cu_seqlens must be a 1-D tensor of batch + 1 entries, got ", cu.sizes());
  at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();  // validated on the host
  const int64_t* p = c.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(p[0] == 0 && p[c.size(0) - 1] == total, kOp, ": cu_seqlens must start at 0 "
                    "and end at the number of packed tokens (", total, ")");
  longest = 0;
  for (int64_t i = 1; i < c.size(0); ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], kOp, ": cu_seqlens must be non-decreasing");
    longest = std::max(longest, p[i] - p[i - 1]);
  }
  return c;
}

inline BsShapes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& counts, const at::Tensor& indices, int64_t bq,
                             int64_t bk, double scale, const std::optional<at::Tensor>& cu) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                       q.scalar_type() == at::kHalf || q.scalar_type() == at::kDouble,
                   kOp, ": q must be float32, bfloat16, float16 or float64, got ", q.scalar_type());
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), kOp, ": ", name,
                     " must have the dtype of q (", q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), kOp, ": ", name, " must be on the device of q");
  }
  const int64_t rank = cu.has_value() ? 3 : 4;
  const char* layout = cu.has_value() ? "[total, heads, head_dim] (varlen)"
                                      : "[batch, seq, heads, head_dim]";
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    TORCH_CHECK_VALUE(t->dim() == rank, kOp, ": ", name, " must be ", layout, ", got ", t->sizes());
  const int64_t o = rank - 3;
  BsShapes s{};
  s.H = q.size(o + 1);
  s.Hkv = k.size(o + 1);
  s.D = q.size(o + 2);
  s.Dv = v.size(o + 2);
  TORCH_CHECK_VALUE(v.size(o) == k.size(o) && v.size(o + 1) == s.Hkv, kOp,
                    ": v must match k in tokens and heads, got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(o + 2) == s.D, kOp, ": k head_dim must equal q head_dim");
  if (cu.has_value()) {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), kOp, ": with cu_seqlens, q and k pack the same "
                      "sequences (got ", q.size(0), " and ", k.size(0), " tokens)");
    s.cu_q = check_cu_seqlens(*cu, q.size(0), s.Sq);
    s.cu_k = s.cu_q;
    s.Sk = s.Sq;
    s.B = s.cu_q.size(0) - 1;
    s.Tq = s.Tk = q.size(0);
  } else {
    s.B = q.size(0);
    s.Sq = q.size(1);
    s.Sk = k.size(1);
    TORCH_CHECK_VALUE(k.size(0) == s.B && v.size(0) == s.B, kOp, ": batch sizes differ");
    s.Tq = s.B * s.Sq;
    s.Tk = s.B * s.Sk;
    s.cu_q = at::arange(0, s.B + 1, at::kLong) * s.Sq;
    s.cu_k = at::arange(0, s.B + 1, at::kLong) * s.Sk;
  }
  TORCH_CHECK_VALUE(s.D > 0 && s.Dv > 0, kOp, ": head_dim must be > 0");
  TORCH_CHECK_VALUE(s.H > 0 && s.Hkv > 0 && s.H % s.Hkv == 0, kOp, ": q heads (", s.H,
                    ") must be a multiple of k/v heads (", s.Hkv, ")");
  TORCH_CHECK_VALUE(bq >= 16 && bq <= 256 && bk >= 16 && bk <= 256, kOp,
                    ": block sizes must be in [16, 256], got (", bq, ", ", bk, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale), kOp, ": scale must be finite");
  s.nq = ceil_div(s.Sq, bq);
  s.nk = ceil_div(s.Sk, bk);
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kInt && indices.scalar_type() == at::kInt, kOp,
                   ": kv_num_blocks and kv_indices must be int32");
  TORCH_CHECK_VALUE(counts.dim() == 3 && counts.size(2) == s.nq &&
                        (counts.size(0) == 1 || counts.size(0) == s.B) &&
                        (counts.size(1) == 1 || counts.size(1) == s.H),
                    kOp, ": kv_num_blocks must be [B|1, H|1, ", s.nq, "], got ", counts.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 4 && indices.sizes().slice(0, 3) == counts.sizes(), kOp,
                    ": kv_indices must be [*kv_num_blocks.shape, max_blocks], got ",
                    indices.sizes());
  return s;
}

/// Validates the compressed rows (counts in range, indices ascending and < nk) and builds the
/// transposed layout: per key block, the ascending query blocks that attend to it.
inline std::pair<at::Tensor, at::Tensor> transpose_layout(const at::Tensor& counts_in,
                                                          const at::Tensor& indices_in,
                                                          int64_t nk) {
  // Validated and transposed on the host (a device layout costs one copy each way).
  const at::Tensor counts = counts_in.cpu().contiguous();
  const at::Tensor indices = indices_in.cpu().contiguous();
  const int64_t Bm = counts.size(0), Hm = counts.size(1), nq = counts.size(2);
  const int64_t maxc = indices.size(3);
  const int32_t* c = counts.const_data_ptr<int32_t>();
  const int32_t* ix = indices.const_data_ptr<int32_t>();
  at::Tensor qc = at::zeros({Bm, Hm, nk}, counts.options());
  at::Tensor qi = at::zeros({Bm, Hm, nk, std::max<int64_t>(nq, 1)}, counts.options());
  int32_t* qcp = qc.mutable_data_ptr<int32_t>();
  int32_t* qip = qi.mutable_data_ptr<int32_t>();
  for (int64_t bh = 0; bh < Bm * Hm; ++bh) {
    for (int64_t i = 0; i < nq; ++i) {  // ascending i keeps every column list ascending
      const int32_t n = c[bh * nq + i];
      TORCH_CHECK_VALUE(n >= 0 && n <= std::min<int64_t>(nk, maxc), kOp,
                        ": kv_num_blocks entries must be in [0, ", std::min<int64_t>(nk, maxc),
                        "], got ", n);
      int64_t prev = -1;
      for (int32_t t = 0; t < n; ++t) {
        const int32_t j = ix[(bh * nq + i) * maxc + t];
        TORCH_CHECK_VALUE(j > prev && j < nk, kOp, ": kv_indices rows must hold ascending "
                          "block indices in [0, ", nk, "), got ", j, " after ", prev);
        prev = j;
        qip[(bh * nk + j) * qi.size(3) + qcp[bh * nk + j]++] = static_cast<int32_t>(i);
      }
    }
  }
  return {qc, qi};
}

inline BlockRows rows(const at::Tensor& counts, const at::Tensor& indices) {
  return {counts.const_data_ptr<int32_t>(), indices.const_data_ptr<int32_t>(), counts.size(0),
          counts.size(1), counts.size(2), indices.size(3)};
}

inline at::Tensor tokens(const at::Tensor& x) {  // [B, S, H, C] -> [B*S, H, C]; packed stays
  return x.dim() == 3 ? x : x.reshape({-1, x.size(2), x.size(3)});
}

inline void check_bwd_args(const BsShapes& s, const at::Tensor& dout,
                           const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                           const at::Tensor& out, const at::Tensor& lse) {
  const at::ScalarType ct = compute_type(q);
  std::vector<int64_t> out_shape = q.sizes().vec();
  out_shape.back() = s.Dv;
  TORCH_CHECK_VALUE(dout.sizes() == out.sizes() && out.sizes() == at::IntArrayRef(out_shape), kOp,
                    "_bwd: grad_out and out must have shape ", out_shape);
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, q.dim() - 1) && lse.scalar_type() == ct,
                    kOp, "_bwd: lse must be ", ct, " of the shape of q without head_dim");
  TORCH_CHECK_VALUE(!dlse.has_value() || dlse->sizes() == lse.sizes(), kOp,
                    "_bwd: grad_lse must have the shape of lse");
}

}  // namespace tilefuse
