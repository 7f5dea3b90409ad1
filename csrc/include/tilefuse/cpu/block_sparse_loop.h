// SPDX-License-Identifier: Apache-2.0
// Block-sparse driver of the CPU attention main loop: the same fwd_step / bwd_step as the
// dense, band and window drivers, visiting only the listed (query block, key block) pairs.
// User blocks larger than the loop's tiles (BQ x BK) are split into tiles.
#pragma once
#include "tilefuse/attention/block_sparse.h"
#include "tilefuse/attention/mask.h"
#include "tilefuse/cpu/attention_loop.h"

namespace tilefuse::cpu::TF_ISA_NS {
namespace attn_detail {

// Sequences are packed (p.cu_q / p.cu_k; a dense batch is the equal-length case); layout rows
// and columns are sequence-local block indices, and blocks past a sequence's end are empty.

template <class T>
void block_sparse_fwd(const AttentionParams<T>& p, const BlockSparseArgs& a,
                      const ParallelRunner& r) {
  const index_t nq = a.kv.n_rows;
  const FwdScratch<T> proto = fwd_scratch(p, false);
  for_each_item(r, p.B * p.H * nq, proto, [&](index_t it, FwdScratch<T>& s) {
    const index_t b = it / (p.H * nq), h = (it / nq) % p.H, i = it % nq;
    const index_t hk = h / (p.H / p.Hkv);
    const index_t qbeg = p.cu_q[b], Sq = p.cu_q[b + 1] - qbeg;
    const index_t kbeg = p.cu_k[b], Sk = p.cu_k[b + 1] - kbeg;
    const BandMask causal = BandMask::make({-1, 0}, Sq, Sk);
    const T* KT = p.kt + hk * p.D * p.ldkt + kbeg;
    const T* V = p.v.at(hk, kbeg);
    const index_t nblocks = a.kv.count(b, h, i);
    const index_t qend = imin(Sq, (i + 1) * a.bq);
    for (index_t q0 = i * a.bq; q0 < qend; q0 += BQ) {
      const index_t qm = imin(BQ, qend - q0);
      const T* Q = p.q.at(h, qbeg + q0);
      fwd_init(qm, p.Dvp, s);
      for (index_t t = 0; t < nblocks; ++t) {
        const index_t j = a.kv.at(b, h, i, t);
        const index_t kend = imin(Sk, (j + 1) * a.bk);
        for (index_t k0 = j * a.bk; k0 < kend; k0 += BK) {
          const index_t kn = imin(BK, kend - k0);
          const int state = a.causal ? causal.tile(q0, q0 + qm, k0, k0 + kn) : kTileFull;
          if (state == kTileSkip) continue;
          fwd_step(
              p, Q, p.q.row_stride, 0, qm, KT + k0, p.ldkt, V + k0 * p.v.row_stride,
              p.v.row_stride, kn, s,
              [&](T* S, index_t kn_, index_t kn16) {
                if (state == kTilePartial || kn16 != kn_)
                  mask_tile(causal, state, S, qm, kn_, kn16, q0, k0);
              },
              p.v_ps);
        }
      }
      for (index_t row = 0; row < qm; ++row) fwd_write_row(p, s, row, h, qbeg + q0 + row);
    }
  });
}

template <class T>
void block_sparse_bwd(const AttentionParams<T>& p, const BlockSparseArgs& a,
                      const ParallelRunner& r) {
  const index_t nk = a.q.n_rows;
  const BwdScratch<T> proto = bwd_scratch(p, false);
  const index_t per_head = p.B * p.n_kv_chunks;
  for_each_item(r, p.H * per_head, proto, [&](index_t it, BwdScratch<T>& s) {
    const index_t h = it / per_head, b = (it % per_head) / p.n_kv_chunks;
    const index_t chunk = it % p.n_kv_chunks;
    const index_t hk = h / (p.H / p.Hkv);
    const index_t qbeg = p.cu_q[b], Sq = p.cu_q[b + 1] - qbeg;
    const index_t kbeg = p.cu_k[b], Sk = p.cu_k[b + 1] - kbeg;
    const BandMask causal = BandMask::make({-1, 0}, Sq, Sk);
    const index_t ldq = p.q.row_stride, lddo = p.dout.row_stride, ldk = p.k.row_stride;
    const T* Qh = p.q.at(h, qbeg);
    const T* dOh = p.dout.at(h, qbeg);
    const T* KT = p.kt + hk * p.D * p.ldkt + kbeg;
    const T* VT = p.vt + hk * p.Dv * p.ldvt + kbeg;
    const T* K = p.k.at(hk, kbeg);
    T* dQ = p.dq + ((chunk * p.H + h) * p.Tq + qbeg) * p.Dp;
    T *dK = s.dK.data(), *dV = s.dV.data(), *lse2 = s.lse.data(), *delta = s.delta.data();
    for (index_t j = chunk * nk / p.n_kv_chunks; j < (chunk + 1) * nk / p.n_kv_chunks; ++j) {
      const index_t kend = imin(Sk, (j + 1) * a.bk);
      const index_t nqb = a.q.count(b, h, j);
      for (index_t k0 = j * a.bk; k0 < kend; k0 += BK) {
        const index_t kn = imin(BK, kend - k0);
        std::fill(dK, dK + kn * p.Dp, T(0));
        std::fill(dV, dV + kn * p.Dvp, T(0));
        for (index_t t = 0; t < nqb; ++t) {
          const index_t i = a.q.at(b, h, j, t);
          const index_t qend = imin(Sq, (i + 1) * a.bq);
          for (index_t q0 = i * a.bq; q0 < qend; q0 += BQ) {
            const index_t qm = imin(BQ, qend - q0);
            const int state = a.causal ? causal.tile(q0, q0 + qm, k0, k0 + kn) : kTileFull;
            if (state == kTileSkip) continue;
            for (index_t row = 0; row < qm; ++row) {
              const index_t tok = (qbeg + q0 + row) * p.H + h;
              const T lse = p.lse_in[tok];
              lse2[row] = lse_base2(lse);
              delta[row] = p.delta[tok];
            }
            bwd_step<true>(p, Qh + q0 * ldq, ldq, dOh + q0 * lddo, lddo, qm, lse2, delta,
                           KT + k0, p.ldkt, VT + k0, p.ldvt, K + k0 * ldk, ldk, kn, dK, dV,
                           dQ + q0 * p.Dp, p.Dp, s,
                           [&](T* S, index_t kn_, index_t kn16) {
                             if (state == kTilePartial || kn16 != kn_)
                               mask_tile(causal, state, S, qm, kn_, kn16, q0, k0);
                           },
                           [](T*) {});
          }
        }
        store_dk_dv(p, h, kbeg + k0, kn, dK, dV);
      }
    }
  });
}

}  // namespace attn_detail
}  // namespace tilefuse::cpu::TF_ISA_NS
