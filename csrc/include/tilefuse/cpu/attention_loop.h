// SPDX-License-Identifier: Apache-2.0
// The tiled attention main loop on CPU (forward and backward), templated on a mask policy
// (tilefuse/attention/mask.h). Included by the ISA-tier kernel files only.
#pragma once
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "tilefuse/attention/params.h"
#include "tilefuse/attention/window.h"
#include "tilefuse/cpu/attention.h"
#include "tilefuse/cpu/gemm.h"
#include "tilefuse/cpu/vec.h"

namespace tilefuse::cpu::TF_ISA_NS {
namespace attn_detail {

constexpr index_t BQ = kAttnTileQ, BK = kAttnTileK;
template <class T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

/// Runs work(item, scratch) for items [0, n) with dynamic scheduling (causal and windowed
/// tiles cost different amounts), one Scratch per worker thread.
template <class Scratch, class Work>
void for_each_item(const ParallelRunner& r, index_t n, const Scratch& proto, const Work& work) {
  std::atomic<index_t> next{0};
  const index_t workers = imax(1, imin(r.num_threads, n));
  r.run(workers, [&](index_t) {
    Scratch s = proto;
    for (index_t it = next.fetch_add(1); it < n; it = next.fetch_add(1)) work(it, s);
  });
}

/// Sets masked elements of a logits tile to -inf: elements the policy forbids (partial tiles
/// only) and the ragged columns [kn, kn16) past the end of the keys.
template <class Mask, class T>
void mask_tile(const Mask& mask, int state, T* S, index_t qm, index_t kn, index_t kn16,
               index_t q0, index_t k0) {
  for (index_t i = 0; i < qm; ++i) {
    T* row = S + i * BK;
    if (state == kTilePartial) mask_row(mask, q0 + i, k0, kn, row, kNegInf<T>);
    for (index_t j = kn; j < kn16; ++j) row[j] = kNegInf<T>;
  }
}

// ---------------------------------------------------------------------------------------
// The tile step: one (query tile, key tile) pair of the forward and of the backward. Every
// mask policy runs through these two functions; the drivers below only differ in where the
// tiles come from (contiguous token ranges, or gathered spatial boxes) and how they are masked.

template <class T>
struct FwdScratch {
  std::vector<T> S, O, m, l, alpha;
  std::vector<T> mold, rsum;  // per-step temporaries of the softmax (previous max, row sums)
  // Gathered operands of spatial tiles (unused by contiguous tiles).
  std::vector<T> Qg, Kg, KTg, Vg;
  std::vector<index_t> qtok, ktok;
};

template <class T>
void fwd_init(index_t qm, index_t Dvp, FwdScratch<T>& s) {
  for (index_t i = 0; i < qm; ++i) {
    s.m[i] = kNegInf<T>;
    s.l[i] = 0;
  }
  std::fill(s.O.begin(), s.O.begin() + qm * Dvp, T(0));
}

/// Rows per strip of a ragged tile step (the GEMM micro-kernel's row count).
constexpr index_t kStrip = 6;

/// Column ranges of a partial tile, per strip of kStrip query rows: strip r only computes key
/// columns [cols[2r], cols[2r+1]) (multiples of 16, within [0, kn16)), the hull of its rows'
/// visible keys; every other logit of those rows is masked. A band's edge tiles then cost
/// ~(w + kStrip + 16) keys per row instead of the tile's full width. Returns false (no ragged
/// step) for policies without per-row key intervals. `rows` receives, per strip of kStrip key
/// columns, the hull [rows[2c], rows[2c+1]) of the query rows whose ranges reach it.
template <class Mask>
bool ragged_ranges(const Mask& mask, index_t q0, index_t qm, index_t k0, index_t kn,
                   index_t* cols, index_t* rows) {
  if constexpr (!HasRowInterval<Mask>::value) {
    return false;
  } else {
    const index_t kn16 = round_up(kn, 16);
    for (index_t i = 0; i < qm; i += kStrip) {
      index_t lo = kn16, hi = 0;
      for (index_t r = i; r < imin(qm, i + kStrip); ++r) {
        index_t j0 = k0, j1 = k0 + kn;
        mask.row_interval(q0 + r, j0, j1);
        if (j1 > j0) {
          lo = imin(lo, j0 - k0);
          hi = imax(hi, j1 - k0);
        }
      }
      index_t* c = cols + 2 * (i / kStrip);
      c[0] = hi > lo ? lo / 16 * 16 : 0;
      c[1] = hi > lo ? round_up(hi, 16) : 0;
    }
    if (rows != nullptr)
      for (index_t j = 0; j < kn; j += kStrip) {
        index_t lo = qm, hi = 0;
        for (index_t i = 0; i < qm; i += kStrip) {
          const index_t* c = cols + 2 * (i / kStrip);
          if (c[0] < imin(kn, j + kStrip) && c[1] > j) {
            lo = imin(lo, i);
            hi = imax(hi, imin(qm, i + kStrip));
          }
        }
        rows[2 * (j / kStrip)] = hi > lo ? lo : 0;
        rows[2 * (j / kStrip) + 1] = hi > lo ? hi : 0;
      }
    return true;
  }
}

/// S = Q K^T (base-2 logits), mask(S) (the policy's mask, bias and the ragged columns), online
/// softmax update, O = diag(alpha) O + P V, for rows [i0, i0 + qm) of the query tile (a key
/// tile may be visible to only part of it). Q is those qm rows (row stride ldq), KT
/// [D, >= kn16] (ld ldkt), V [kn, Dvp] (row stride ldv), or panel-major when v_ps > 0
/// (see gemm; ldv = 16). cols: optional per-strip column ranges (ragged_ranges; i0 = 0).
template <class T, class MaskFn>
void fwd_step(const AttentionParams<T>& p, const T* Q, index_t ldq, index_t i0, index_t qm,
              const T* KT, index_t ldkt, const T* V, index_t ldv, index_t kn, FwdScratch<T>& s,
              const MaskFn& mask, index_t v_ps = 0, const index_t* cols = nullptr) {
  constexpr int W = VecTraits<T>::W;
  const T c2 = p.scale * T(kLog2ed);  // logits in base 2
  T *S = s.S.data(), *O = s.O.data() + i0 * p.Dvp, *m = s.m.data() + i0, *l = s.l.data() + i0;
  T* alpha = s.alpha.data() + i0;
  const index_t kn16 = round_up(kn, 16);
  if (cols == nullptr) {
    gemm<GemmOut::kStoreScaled>(qm, kn16, p.D, Q, ldq, 1, KT, ldkt, S, BK, &c2);
  } else {
    for (index_t i = 0; i < qm; i += kStrip) {
      const index_t* c = cols + 2 * (i / kStrip);
      gemm<GemmOut::kStoreScaled>(imin(kStrip, qm - i), c[1] - c[0], p.D, Q + i * ldq, ldq, 1,
                                  KT + c[0], ldkt, S + i * BK + c[0], BK, &c2);
    }
  }
  mask(S, kn, kn16);
  T* mold = s.mold.data();
  T* rsum = s.rsum.data();
  for (index_t i = 0; i < qm; ++i) {
    const index_t c0 = cols == nullptr ? 0 : cols[2 * (i / kStrip)];
    const index_t c1 = cols == nullptr ? kn16 : cols[2 * (i / kStrip) + 1];
    T* row = S + i * BK;
    vec_t<T> mx0 = splatv(kNegInf<T>), mx1 = mx0;
    index_t j = c0;
    for (; j + 2 * W <= c1; j += 2 * W) {
      mx0 = vmax<T>(mx0, loadv(row + j));
      mx1 = vmax<T>(mx1, loadv(row + j + W));
    }
    for (; j < c1; j += W) mx0 = vmax<T>(mx0, loadv(row + j));
    const T rmax = hmax<T>(vmax<T>(mx0, mx1));
    const T mnew = rmax > m[i] ? rmax : m[i];
    mold[i] = m[i];
    m[i] = mnew;
    if (mnew == kNegInf<T>) {  // every key so far masked for this row
      std::fill(row + c0, row + c1, T(0));
      rsum[i] = 0;
      continue;
    }
    const vec_t<T> mv = splatv(mnew);
    vec_t<T> s0{}, s1{};
    for (j = c0; j + 2 * W <= c1; j += 2 * W) {  // two chains: the exp is throughput-bound
      const vec_t<T> e0 = exp2v_nonpos(loadv(row + j) - mv);
      const vec_t<T> e1 = exp2v_nonpos(loadv(row + j + W) - mv);
      storev(row + j, e0);
      storev(row + j + W, e1);
      s0 += e0;
      s1 += e1;
    }
    for (; j < c1; j += W) {
      const vec_t<T> e0 = exp2v_nonpos(loadv(row + j) - mv);
      storev(row + j, e0);
      s0 += e0;
    }
    rsum[i] = hsum<T>(s0 + s1);
  }
  // alpha = 2^(m_old - m_new) (1 while a row has seen no key), l = alpha l + rowsum: W rows at
  // a time, then the last rows one by one (rows past qm may belong to another part of the tile).
  const vec_t<T> ninf = splatv(kNegInf<T>), one = splatv(T(1));
  index_t i = 0;
  for (; i + W <= qm; i += W) {
    const vec_t<T> mn = loadv(m + i);
    const vec_t<T> a = mn == ninf ? one : exp2v_nonpos(loadv(mold + i) - mn);
    storev(alpha + i, a);
    storev(l + i, loadv(l + i) * a + loadv(rsum + i));
  }
  for (; i < qm; ++i) {
    alpha[i] = m[i] == kNegInf<T> ? T(1) : std::exp2(mold[i] - m[i]);
    l[i] = l[i] * alpha[i] + rsum[i];
  }
  if (cols == nullptr) {
    gemm<GemmOut::kScaleAccumulate>(qm, p.Dvp, kn, S, BK, 1, V, ldv, O, p.Dvp, alpha, v_ps);
    return;
  }
  for (index_t i = 0; i < qm; i += kStrip) {
    const index_t* c = cols + 2 * (i / kStrip);
    gemm<GemmOut::kScaleAccumulate>(imin(kStrip, qm - i), p.Dvp, imax(0, imin(c[1], kn) - c[0]),
                                    S + i * BK + c[0], BK, 1, V + c[0] * ldv, ldv,
                                    O + i * p.Dvp, p.Dvp, alpha + i, v_ps);
  }
}

/// Writes normalised output row i of head h to global token t, and its LSE (natural log).
template <class T>
void fwd_write_row(const AttentionParams<T>& p, const FwdScratch<T>& s, index_t i, index_t h,
                   index_t t) {
  T* orow = p.o + (t * p.H + h) * p.Dv;
  const T l = s.l[i];
  if (l == 0) {  // no visible key: output 0, LSE -inf (documented)
    std::fill(orow, orow + p.Dv, T(0));
    p.lse[t * p.H + h] = kNegInf<T>;
    return;
  }
  const T inv = T(1) / l;
  const T* O = s.O.data() + i * p.Dvp;
  for (index_t c = 0; c < p.Dv; ++c) orow[c] = O[c] * inv;
  p.lse[t * p.H + h] = (s.m[i] + std::log2(l)) * T(kLn2d);
}

/// The saved natural-log LSE in base 2 for P = exp2(s2 - lse2). A row without any visible key
/// has lse = -inf; +inf then makes P = exp2(s2 - inf) = 0 for every key.
template <class T>
inline T lse_base2(T lse) {
  return lse == kNegInf<T> ? std::numeric_limits<T>::infinity() : lse * T(kLog2ed);
}

/// Writes a finished key tile's accumulators (dK = scale * dS^T q, dV) for query head h,
/// starting at global key token t0.
template <class T>
void store_dk_dv(const AttentionParams<T>& p, index_t h, index_t t0, index_t kn, const T* dK,
                 const T* dV) {
  T* dKo = p.dk + (h * p.Tk + t0) * p.Dp;
  for (index_t e = 0; e < kn * p.Dp; ++e) dKo[e] = dK[e] * p.scale;
  std::copy(dV, dV + kn * p.Dvp, p.dv + (h * p.Tk + t0) * p.Dvp);
}

/// store_dk_dv into token-major outputs (p.grads_token_major): key t of head h at row t.
template <class T>
void store_dk_dv_tokens(const AttentionParams<T>& p, index_t h, index_t t0, index_t kn,
                        const T* dK, const T* dV) {
  for (index_t j = 0; j < kn; ++j) {
    T* dk = p.dk + ((t0 + j) * p.H + h) * p.D;
    const T* src = dK + j * p.Dp;
    for (index_t c = 0; c < p.D; ++c) dk[c] = src[c] * p.scale;
    std::copy(dV + j * p.Dvp, dV + j * p.Dvp + p.Dv, p.dv + ((t0 + j) * p.H + h) * p.Dv);
  }
}

template <class T>
struct BwdScratch {
  std::vector<T> S, dP, dK, dV;
  // Gathered operands of spatial tiles (unused by contiguous tiles).
  std::vector<T> Qg, dOg, Kg, KTg, Vg, VTg, dQg, lse, delta;
  std::vector<index_t> qtok, ktok;
  // The dS sum of full tile pairs that share one geometry (see window_loop.h).
  std::vector<T> dbias_tile;
  index_t dbias_key[9] = {};
  Box dbias_qb{}, dbias_kb{};
  bool dbias_pending = false;
};

/// One backward tile pair: recompute P from the saved LSE (lse2: base-2 LSE per row, +inf for
/// rows without keys), dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += dS^T Q and
/// dQ (+)= dS K (accumulated in place when kDQAccumulate, else stored to dQ for a scatter).
/// `after_ds(dS)` sees dS before the reductions (bias gradients).
template <bool kDQAccumulate, class T, class MaskFn, class DsFn>
void bwd_step(const AttentionParams<T>& p, const T* Q, index_t ldq, const T* dO, index_t lddo,
              index_t qm, const T* lse2, const T* delta, const T* KT, index_t ldkt, const T* VT,
              index_t ldvt, const T* K, index_t ldk, index_t kn, T* dK, T* dV, T* dQ,
              index_t lddq, BwdScratch<T>& s, const MaskFn& mask, const DsFn& after_ds,
              const index_t* cols = nullptr, const index_t* rows = nullptr) {
  constexpr int W = VecTraits<T>::W;
  const T c2 = p.scale * T(kLog2ed);
  T *S = s.S.data(), *dP = s.dP.data();
  const index_t kn16 = round_up(kn, 16);
  // Ragged steps (cols, rows: see ragged_ranges) restrict every GEMM to the strips' ranges;
  // P and dS are zeroed outside a row's range so the column-strip reductions stay exact.
  const auto col_range = [&](index_t i, index_t& c0, index_t& c1) {
    c0 = cols == nullptr ? 0 : cols[2 * (i / kStrip)];
    c1 = cols == nullptr ? kn16 : cols[2 * (i / kStrip) + 1];
  };
  // C (op)= A B per query strip over its columns: A = the strip's rows of X (ld ldx), B = BT
  // columns [c0, c1) (ld ldbt), C = the strip's columns of Y (ld BK).
  const auto by_query_strip = [&](auto out, const T* X, index_t ldx, index_t kdim, const T* BT,
                                  index_t ldbt, T* Y, const T* scale) {
    if (cols == nullptr) {
      gemm<decltype(out)::value>(qm, kn16, kdim, X, ldx, 1, BT, ldbt, Y, BK, scale);
      return;
    }
    for (index_t i = 0; i < qm; i += kStrip) {
      index_t c0, c1;
      col_range(i, c0, c1);
      gemm<decltype(out)::value>(imin(kStrip, qm - i), c1 - c0, kdim, X + i * ldx, ldx, 1,
                                 BT + c0, ldbt, Y + i * BK + c0, BK, scale);
    }
  };
  // Acc[kn, C] += M^T X (M = P or dS [qm, BK], X [qm, C]) per key strip over its query rows.
  const auto by_key_strip = [&](const T* M, const T* X, index_t ldx, index_t C, T* Acc) {
    if (rows == nullptr) {
      gemm<GemmOut::kAccumulate>(kn, C, qm, M, 1, BK, X, ldx, Acc, C);
      return;
    }
    for (index_t j = 0; j < kn; j += kStrip) {
      const index_t r0 = rows[2 * (j / kStrip)], r1 = rows[2 * (j / kStrip) + 1];
      gemm<GemmOut::kAccumulate>(imin(kStrip, kn - j), C, r1 - r0, M + r0 * BK + j, 1, BK,
                                 X + r0 * ldx, ldx, Acc + j * C, C);
    }
  };
  using StoreScaled = std::integral_constant<GemmOut, GemmOut::kStoreScaled>;
  using Store = std::integral_constant<GemmOut, GemmOut::kStore>;
  by_query_strip(StoreScaled{}, Q, ldq, p.D, KT, ldkt, S, &c2);
  mask(S, kn, kn16);
  // P = exp2(s - lse2): s - lse2 <= 0 up to rounding (lse2 bounds the row's logits), -inf for
  // rows without keys (lse2 = +inf), so the clamp-free exp2 applies.
  for (index_t i = 0; i < qm; ++i) {
    T* row = S + i * BK;
    index_t c0, c1;
    col_range(i, c0, c1);
    const vec_t<T> l2 = splatv(lse2[i]);
    std::fill(row, row + c0, T(0));
    for (index_t j = c0; j < c1; j += W) storev(row + j, exp2v_nonpos(loadv(row + j) - l2));
    std::fill(row + c1, row + kn16, T(0));
  }
  by_key_strip(S, dO, lddo, p.Dvp, dV);
  by_query_strip(Store{}, dO, lddo, p.Dv, VT, ldvt, dP, nullptr);
  for (index_t i = 0; i < qm; ++i) {
    T* ds = dP + i * BK;
    const T* pr = S + i * BK;
    index_t c0, c1;
    col_range(i, c0, c1);
    std::fill(ds, ds + c0, T(0));
    for (index_t j = c0; j < c1; j += W) storev(ds + j, loadv(pr + j) * (loadv(ds + j) - delta[i]));
    std::fill(ds + c1, ds + kn16, T(0));
  }
  after_ds(dP);
  // Only the first kn columns of dS feed the reductions (the ragged tail may hold garbage).
  by_key_strip(dP, Q, ldq, p.Dp, dK);
  constexpr GemmOut kDQ = kDQAccumulate ? GemmOut::kAccumulate : GemmOut::kStore;
  if (cols == nullptr) {
    gemm<kDQ>(qm, p.Dp, kn, dP, BK, 1, K, ldk, dQ, lddq);
    return;
  }
  for (index_t i = 0; i < qm; i += kStrip) {
    index_t c0, c1;
    col_range(i, c0, c1);
    gemm<kDQ>(imin(kStrip, qm - i), p.Dp, imax(0, imin(c1, kn) - c0), dP + i * BK + c0, BK, 1,
              K + c0 * ldk, ldk, dQ + i * lddq, lddq);
  }
}

// ---------------------------------------------------------------------------------------
// Driver 1: contiguous token ranges (dense, causal, sliding window; mask.h policies).

template <class Mask, class T>
void fwd_tile(const AttentionParams<T>& p, const typename Mask::Args& margs, index_t h, index_t b,
              index_t qt, FwdScratch<T>& s) {
  const index_t hk = h / (p.H / p.Hkv);
  const index_t qbeg = p.cu_q[b], Sq = p.cu_q[b + 1] - qbeg;
  const index_t kbeg = p.cu_k[b], Sk = p.cu_k[b + 1] - kbeg;
  const Mask mask = Mask::make(margs, Sq, Sk);
  const index_t q0 = qt * BQ, qm = imin(BQ, Sq - q0);
  const T* Q = p.q.at(h, qbeg + q0);
  index_t ldq = p.q.row_stride;
  const T* KT = p.kt + hk * p.D * p.ldkt + kbeg;
  const T* V = p.v.at(hk, kbeg);
  // Operands the adapter left in the caller's layout (narrow bands, short sequences, whose
  // rows are re-read too few times to pay for whole-tensor copies) are repacked per tile: the
  // Q tile contiguous, each V tile panel-major (see gemm), ~1-2% of a step's work for 12-20%
  // faster tile GEMMs (measured at window (256, 256), S = 16384).
  if (ldq != p.Dp) {
    for (index_t i = 0; i < qm; ++i)
      for (index_t c = 0; c < p.D; ++c) s.Qg[i * p.Dp + c] = Q[i * ldq + c];
    Q = s.Qg.data();
    ldq = p.Dp;
  }
  const bool pack_v = p.v_ps == 0;
  fwd_init(qm, p.Dvp, s);
  index_t klo, khi;
  mask.key_range(q0, q0 + qm, klo, khi);
  // Key tiles start at the first visible key rounded down to 16 (not at a multiple of BK): a
  // band of width w then costs (BQ + w + < 16) keys per query tile instead of up to
  // (BQ + w + 2 BK), and the K^T rows are read with 64-byte aligned vector loads (an unaligned
  // start made every other load split across two cache lines).
  klo = klo / 16 * 16;
  index_t cols[2 * ((BQ + kStrip - 1) / kStrip)];
  for (index_t k0 = klo; k0 < khi; k0 += BK) {
    const index_t kn = imin(BK, khi - k0);
    const int state = mask.tile(q0, q0 + qm, k0, k0 + kn);
    if (state == kTileSkip) continue;
    const bool ragged =
        state == kTilePartial && ragged_ranges(mask, q0, qm, k0, kn, cols, nullptr);
    const T* Vt = V + k0 * p.v.row_stride;
    index_t ldv = p.v.row_stride, v_ps = p.v_ps;
    if (pack_v) {
      constexpr int W = VecTraits<T>::W;
      for (index_t c = 0; c < p.Dvp; c += 16) {
        T* dst = &s.Vg[c * BK];  // panel c / 16: [BK][16]
        for (index_t j = 0; j < kn; ++j)
          for (int u = 0; u < 16; u += W) storev(dst + j * 16 + u, loadv(Vt + j * ldv + c + u));
      }
      Vt = s.Vg.data();
      ldv = 16;
      v_ps = BK * 16;
    }
    fwd_step(
        p, Q, ldq, 0, qm, KT + k0, p.ldkt, Vt, ldv, kn, s,
        [&](T* S, index_t kn_, index_t kn16) {
          if (state == kTilePartial || kn16 != kn_) mask_tile(mask, state, S, qm, kn_, kn16, q0, k0);
        },
        v_ps, ragged ? cols : nullptr);
  }
  for (index_t i = 0; i < qm; ++i) fwd_write_row(p, s, i, h, qbeg + q0 + i);
}

template <class T>
FwdScratch<T> fwd_scratch(const AttentionParams<T>& p, bool gathered) {
  FwdScratch<T> s;
  s.S.resize(BQ * BK);
  s.O.resize(BQ * p.Dvp);
  for (std::vector<T>* r : {&s.m, &s.l, &s.alpha, &s.mold, &s.rsum}) r->resize(BQ);
  if (gathered) {
    s.Qg.resize(BQ * p.Dp);
    s.Kg.resize(BK * p.Dp);
    s.KTg.assign(p.D * BK, T(0));
    s.Vg.resize(BK * p.Dvp);
    s.qtok.resize(BQ);
    s.ktok.resize(BK);
  }
  return s;
}

template <class Mask, class T>
void attention_fwd(const AttentionParams<T>& p, const typename Mask::Args& margs,
                   const ParallelRunner& r) {
  // Items are (head, query tile) pairs; tile_start[b] is the first tile of sequence b.
  std::vector<index_t> tile_start(p.B + 1, 0);
  for (index_t b = 0; b < p.B; ++b)
    tile_start[b + 1] = tile_start[b] + ceil_div(p.cu_q[b + 1] - p.cu_q[b], BQ);
  const index_t tiles = tile_start[p.B];
  FwdScratch<T> proto = fwd_scratch(p, false);
  proto.Qg.resize(BQ * p.Dp);  // the per-tile repacks of fwd_tile
  proto.Vg.resize(BK * p.Dvp);
  for_each_item(r, p.H * tiles, proto, [&](index_t it, FwdScratch<T>& s) {
    const index_t h = it / tiles, t = it % tiles;
    index_t b = 0;
    while (tile_start[b + 1] <= t) ++b;  // B is small next to the tile work
    fwd_tile<Mask>(p, margs, h, b, t - tile_start[b], s);
  });
}

template <class Mask, class T>
void bwd_item(const AttentionParams<T>& p, const typename Mask::Args& margs, index_t h, index_t b,
              index_t chunk, BwdScratch<T>& s) {
  const index_t hk = h / (p.H / p.Hkv);
  const index_t qbeg = p.cu_q[b], Sq = p.cu_q[b + 1] - qbeg;
  const index_t kbeg = p.cu_k[b], Sk = p.cu_k[b + 1] - kbeg;
  const Mask mask = Mask::make(margs, Sq, Sk);
  const index_t nkt = ceil_div(Sk, BK);
  const index_t kt_begin = chunk * nkt / p.n_kv_chunks, kt_end = (chunk + 1) * nkt / p.n_kv_chunks;
  const T* Qh = p.q.at(h, qbeg);
  const T* dOh = p.dout.at(h, qbeg);
  const index_t ldq = p.q.row_stride, lddo = p.dout.row_stride, ldk = p.k.row_stride;
  const T* KT = p.kt + hk * p.D * p.ldkt + kbeg;
  const T* VT = p.vt + hk * p.Dv * p.ldvt + kbeg;
  const T* K = p.k.at(hk, kbeg);
  const bool tok = p.grads_token_major;
  const index_t lddq = tok ? p.H * p.Dp : p.Dp;
  T* dQ = tok ? p.dq + qbeg * lddq + h * p.Dp : p.dq + ((chunk * p.H + h) * p.Tq + qbeg) * p.Dp;
  T *dK = s.dK.data(), *dV = s.dV.data(), *lse2 = s.lse.data(), *delta = s.delta.data();

  index_t cols[2 * ((BQ + kStrip - 1) / kStrip)], rows[2 * ((BK + kStrip - 1) / kStrip)];
  for (index_t kt = kt_begin; kt < kt_end; ++kt) {
    const index_t k0 = kt * BK, kn = imin(BK, Sk - k0);
    std::fill(dK, dK + kn * p.Dp, T(0));
    std::fill(dV, dV + kn * p.Dvp, T(0));
    index_t qlo, qhi;
    mask.query_range(k0, k0 + kn, qlo, qhi);
    for (index_t q0 = qlo; q0 < qhi; q0 += BQ) {
      const index_t qm = imin(BQ, qhi - q0);
      const int state = mask.tile(q0, q0 + qm, k0, k0 + kn);
      if (state == kTileSkip) continue;
      const bool ragged = state == kTilePartial && ragged_ranges(mask, q0, qm, k0, kn, cols, rows);
      for (index_t i = 0; i < qm; ++i) {
        const index_t t = (qbeg + q0 + i) * p.H + h;
        const T lse = p.lse_in[t];
        lse2[i] = lse_base2(lse);
        delta[i] = p.delta[t];
      }
      bwd_step<true>(p, Qh + q0 * ldq, ldq, dOh + q0 * lddo, lddo, qm, lse2, delta, KT + k0,
                     p.ldkt, VT + k0, p.ldvt, K + k0 * ldk, ldk, kn, dK, dV, dQ + q0 * lddq,
                     lddq, s,
                     [&](T* S, index_t kn_, index_t kn16) {
                       if (state == kTilePartial || kn16 != kn_)
                         mask_tile(mask, state, S, qm, kn_, kn16, q0, k0);
                     },
                     [](T*) {}, ragged ? cols : nullptr, ragged ? rows : nullptr);
    }
    if (tok)
      store_dk_dv_tokens(p, h, kbeg + k0, kn, dK, dV);
    else
      store_dk_dv(p, h, kbeg + k0, kn, dK, dV);
  }
  if (tok)  // every key tile of (h, b) is done: dQ rows of this head are final
    for (index_t i = 0; i < Sq; ++i) {
      T* row = dQ + i * lddq;
      for (index_t c = 0; c < p.D; ++c) row[c] *= p.scale;
    }
}

template <class T>
BwdScratch<T> bwd_scratch(const AttentionParams<T>& p, bool gathered) {
  BwdScratch<T> s;
  s.S.resize(BQ * BK);
  s.dP.resize(BQ * BK);
  s.dK.resize(BK * p.Dp);
  s.dV.resize(BK * p.Dvp);
  s.lse.resize(BQ);
  s.delta.resize(BQ);
  if (gathered) {
    s.Qg.resize(BQ * p.Dp);
    s.dOg.resize(BQ * p.Dvp);
    s.Kg.resize(BK * p.Dp);
    // +16: a GEMM on a column sub-range [j0, j0 + kn16) may read past the last row's end.
    s.KTg.assign(p.D * BK + 16, T(0));
    s.Vg.resize(BK * p.Dvp);
    s.VTg.assign(p.Dv * BK + 16, T(0));
    s.dQg.resize(BQ * p.Dp);
    s.qtok.resize(BQ);
    s.ktok.resize(BK);
  }
  return s;
}

template <class Mask, class T>
void attention_bwd(const AttentionParams<T>& p, const typename Mask::Args& margs,
                   const ParallelRunner& r) {
  const BwdScratch<T> proto = bwd_scratch(p, false);
  const index_t per_head = p.B * p.n_kv_chunks;
  for_each_item(r, p.H * per_head, proto, [&](index_t it, BwdScratch<T>& s) {
    const index_t h = it / per_head, rest = it % per_head;
    bwd_item<Mask>(p, margs, h, rest / p.n_kv_chunks, rest % p.n_kv_chunks, s);
  });
}

template <class T>
void transpose_heads(const Operand<T>& src, index_t H, index_t Tn, index_t C, T* dst, index_t ld,
                     const ParallelRunner& r) {
  constexpr index_t TB = 16;  // tokens per block: 16 contiguous floats written per row of dst
  const index_t blocks = ceil_div(Tn, TB);
  for_each_item(r, H * blocks, 0, [&](index_t it, int) {
    const index_t h = it / blocks, t0 = (it % blocks) * TB, tn = imin(TB, Tn - t0);
    T* d = dst + h * C * ld + t0;
    for (index_t t = 0; t < tn; ++t) {
      const T* srow = src.at(h, t0 + t);
      for (index_t c = 0; c < C; ++c) d[c * ld + t] = srow[c];
    }
    if (t0 + TB >= Tn)  // the last block also clears the readable tail
      for (index_t c = 0; c < C; ++c) std::fill(d + c * ld + tn, d + c * ld + (Tn + 16 - t0), T(0));
  });
}

template <class T>
void pack_heads(const Operand<T>& src, index_t H, index_t Tn, index_t C, T* dst, index_t width,
                bool panel, const ParallelRunner& r) {
  constexpr index_t TB = 64;  // tokens per work item
  const index_t blocks = ceil_div(Tn, TB), panels = width / 16;
  for_each_item(r, H * blocks, 0, [&](index_t it, int) {
    const index_t h = it / blocks, t0 = (it % blocks) * TB, t1 = imin(Tn, t0 + TB);
    for (index_t t = t0; t < t1; ++t) {
      const T* s = src.at(h, t);
      if (!panel) {
        T* d = dst + (h * Tn + t) * width;
        std::copy(s, s + C, d);
        std::fill(d + C, d + width, T(0));
        continue;
      }
      for (index_t q = 0; q < panels; ++q) {
        T* d = dst + ((h * panels + q) * Tn + t) * 16;
        const index_t n = imax(0, imin(16, C - 16 * q));
        std::copy(s + 16 * q, s + 16 * q + n, d);
        std::fill(d + n, d + 16, T(0));
      }
    }
  });
}

}  // namespace attn_detail
}  // namespace tilefuse::cpu::TF_ISA_NS
