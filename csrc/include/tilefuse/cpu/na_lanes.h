// SPDX-License-Identifier: Apache-2.0
// Driver 3 of the window policy: the forward of sliding neighborhood attention with the
// queries in vector lanes (stride 1 on the innermost axis). Included by the ISA-tier kernel
// files only.
//
// With stride 1, the window of query x on the innermost axis starts at start(x) = x - k/2
// away from the borders, so for W consecutive queries x0 .. x0+W-1 ("a block") and window
// offset j the keys are the W consecutive keys start(x0) + j .. + W-1. With Q, K and V
// transposed per row ([D][x]: one vector holds one feature of W consecutive tokens),
//   S[j] (lanes) = sum_d Q^T[d][x0 ..] * K^T[d][start(x0) + j ..]      (one FMA per d, j)
//   O^T[d] (lanes) = sum_j P[j] * V^T[d][start(x0) + j ..]
// every computed score is a real (query, key) pair of the window: no union of windows. Outer
// axes are loops over the key rows of the query row's window (any kernel, causal or stride
// there). Blocks at the borders, where start() is clamped or the window is causal-truncated,
// compute the union of their lanes' offsets (at most 2k - 1) and mask the keys a lane does
// not see; padding lanes past the row read zeros and are not stored.
// A work item is one column block (sequence, head, outer coordinate z, x0) for every y. The
// K^T / V^T columns it reads ("chunk": W + nj - 1 columns, rows of 16 floats for k <= 9, so
// each feature is one cache line) of each key row are transposed once into a ring of key
// rows; query rows run in pairs, so each K^T / V^T vector both rows see is loaded once, and
// consecutive pairs share all but two key rows per plane of the ring (L1 resident).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tilefuse/cpu/window_loop.h"

namespace tilefuse::cpu::TF_ISA_NS {
namespace attn_detail {

template <class T>
struct LanesScratch {
  std::vector<T> kr, vr;          // ring of key rows: [slot][D | Dv][wc] (K^T, V^T of the chunk)
  std::vector<index_t> slot_row;  // key row (kz * n1 + ky) held by each slot, -1 if none
  std::vector<T> qt;              // [2][D][W]: Q^T of the block in the pair's two rows
  std::vector<T> s;               // [keys][W] per row: logits, then probabilities
  std::vector<T> ob;              // [2][Dv][W]: output of the block in both rows
  std::vector<T> zeros;           // one zero row (transpose padding)
  std::vector<const T*> rows;     // row pointers for the transposes
  std::vector<T> mask;  // [nj][W]: -inf where a real lane does not see the key, else 0
  std::vector<const T*> kb, vb;     // per key row of the pair: its ring slot (K^T, V^T)
  std::vector<index_t> krel[2];     // per key row each query row sees: bias row offset
  std::vector<int> in;  // per key row of the pair: 1 = row y sees it, 2 = row y + 1, 3 = both
  Prefetcher pf;                    // rows to prefetch for the next pair
  std::vector<index_t> iota;        // 0, 1, 2, ...: token offsets of a run of a row
};

template <class T>
inline T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

/// S[j][W] = c2 * sum_d Q^T[d] * K^T[d][j ..] for NJ window offsets of one query row (K^T
/// rows of the ring: offset j at kb + j, feature d at kb + d * ds). Key rows only one row of
/// a pair sees; lanes_qk2 below runs the ones both see.
template <class T, int NJ>
inline void lanes_qk(index_t D, const T* q, index_t ldq, const T* kb, index_t ds, T* s, T c2) {
  constexpr int W = VecTraits<T>::W;
  vec_t<T> acc[NJ];
#pragma GCC unroll 8
  for (int j = 0; j < NJ; ++j) acc[j] = vec_t<T>{};
  for (index_t d = 0; d < D; ++d) {
    const vec_t<T> qv = loadv(q + d * ldq);
    const T* kp = kb + d * ds;
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) acc[j] += qv * loadv(kp + j);
  }
#pragma GCC unroll 8
  for (int j = 0; j < NJ; ++j) storev(s + j * W, acc[j] * c2);
}

template <class T>
inline void lanes_qk_any(index_t nj, index_t D, const T* q, index_t ldq, const T* kb, index_t ds,
                         T* s, T c2) {
  constexpr int W = VecTraits<T>::W;
  index_t j = 0;
  for (; j + 8 <= nj; j += 8) lanes_qk<T, 8>(D, q, ldq, kb + j, ds, s + j * W, c2);
  const T* kp = kb + j;
  T* sp = s + j * W;
  switch (nj - j) {
    case 1: lanes_qk<T, 1>(D, q, ldq, kp, ds, sp, c2); break;
    case 2: lanes_qk<T, 2>(D, q, ldq, kp, ds, sp, c2); break;
    case 3: lanes_qk<T, 3>(D, q, ldq, kp, ds, sp, c2); break;
    case 4: lanes_qk<T, 4>(D, q, ldq, kp, ds, sp, c2); break;
    case 5: lanes_qk<T, 5>(D, q, ldq, kp, ds, sp, c2); break;
    case 6: lanes_qk<T, 6>(D, q, ldq, kp, ds, sp, c2); break;
    case 7: lanes_qk<T, 7>(D, q, ldq, kp, ds, sp, c2); break;
    default: break;
  }
}

/// Two query rows against one key row: S0[j], S1[j] for NJ offsets, each K^T vector loaded
/// once for both (K^T rows of the ring: offset j at kb + j, feature d at kb + d * ds).
template <class T, int NJ>
inline void lanes_qk2(index_t D, const T* q0, const T* q1, index_t ldq, const T* kb, index_t ds,
                      T* s0, T* s1, T c2) {
  constexpr int W = VecTraits<T>::W;
  vec_t<T> a0[NJ], a1[NJ];
#pragma GCC unroll 8
  for (int j = 0; j < NJ; ++j) a0[j] = a1[j] = vec_t<T>{};
  for (index_t d = 0; d < D; ++d) {
    const vec_t<T> x0 = loadv(q0 + d * ldq), x1 = loadv(q1 + d * ldq);
    const T* kp = kb + d * ds;
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) {
      const vec_t<T> kv = loadv_once(kp + j);
      a0[j] += x0 * kv;
      a1[j] += x1 * kv;
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NJ; ++j) {
    storev(s0 + j * W, a0[j] * c2);
    storev(s1 + j * W, a1[j] * c2);
  }
}

/// The offsets in ceil(nj / 6) near-equal chunks of at most 6 (2 x 6 accumulators + 2 Q
/// + 1 K vectors fit the 16 registers): no short remainder chunk whose few accumulator
/// chains would wait on the FMA latency (k 13: 5 + 4 + 4 rather than 4 + 4 + 4 + 1).
template <class T>
inline void lanes_qk2_any(index_t nj, index_t D, const T* q0, const T* q1, index_t ldq,
                          const T* kb, index_t ds, T* s0, T* s1, T c2) {
  constexpr int W = VecTraits<T>::W;
  const index_t chunks = ceil_div(nj, 6);
  index_t j = 0;
  for (index_t c = 0; c < chunks; ++c) {
    const index_t n = nj / chunks + (c < nj % chunks ? 1 : 0);
    const T* kp = kb + j;
    T* a = s0 + j * W;
    T* b = s1 + j * W;
    switch (n) {
      case 1: lanes_qk2<T, 1>(D, q0, q1, ldq, kp, ds, a, b, c2); break;
      case 2: lanes_qk2<T, 2>(D, q0, q1, ldq, kp, ds, a, b, c2); break;
      case 3: lanes_qk2<T, 3>(D, q0, q1, ldq, kp, ds, a, b, c2); break;
      case 4: lanes_qk2<T, 4>(D, q0, q1, ldq, kp, ds, a, b, c2); break;
      case 5: lanes_qk2<T, 5>(D, q0, q1, ldq, kp, ds, a, b, c2); break;
      default: lanes_qk2<T, 6>(D, q0, q1, ldq, kp, ds, a, b, c2); break;
    }
    j += n;
  }
}

/// O0^T, O1^T features [d0, d0 + NB) of two query rows over the key rows of the pair (in[u]:
/// bit 0 row 0 sees key row u, bit 1 row 1): a V^T vector both rows see is loaded once.
template <class T, int NB>
inline void lanes_pv2(index_t nu, index_t nj, const T* s0, const T* s1, const int* in,
                      const T* const* vb, index_t ds, index_t d0, vec_t<T> inv0, vec_t<T> inv1,
                      T* ob0, T* ob1) {
  constexpr int W = VecTraits<T>::W;
  vec_t<T> a0[NB], a1[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) a0[i] = a1[i] = vec_t<T>{};
  for (index_t u = 0; u < nu; ++u) {
    const T* vrow = vb[u] + d0 * ds;
    if (in[u] == 3) {
      for (index_t j = 0; j < nj; ++j) {
        const vec_t<T> p0 = loadv(s0 + j * W), p1 = loadv(s1 + j * W);
#pragma GCC unroll 8
        for (int i = 0; i < NB; ++i) {
          const vec_t<T> vv = loadv_once(vrow + j + i * ds);
          a0[i] += p0 * vv;
          a1[i] += p1 * vv;
        }
      }
      s0 += nj * W;
      s1 += nj * W;
    } else if (in[u] == 1) {
      for (index_t j = 0; j < nj; ++j) {
        const vec_t<T> p0 = loadv(s0 + j * W);
#pragma GCC unroll 8
        for (int i = 0; i < NB; ++i) a0[i] += p0 * loadv(vrow + j + i * ds);
      }
      s0 += nj * W;
    } else {
      for (index_t j = 0; j < nj; ++j) {
        const vec_t<T> p1 = loadv(s1 + j * W);
#pragma GCC unroll 8
        for (int i = 0; i < NB; ++i) a1[i] += p1 * loadv(vrow + j + i * ds);
      }
      s1 += nj * W;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) {
    storev(ob0 + (d0 + i) * W, a0[i] * inv0);
    storev(ob1 + (d0 + i) * W, a1[i] * inv1);
  }
}

/// Features in ceil(Dv / 6) near-equal chunks of at most 6 (2 x 6 accumulators + 2 P + 1 V).
template <class T>
inline void lanes_pv2_any(index_t Dv, index_t nu, index_t nj, const T* s0, const T* s1,
                          const int* in, const T* const* vb, index_t ds, vec_t<T> inv0,
                          vec_t<T> inv1, T* ob0, T* ob1) {
  const index_t chunks = ceil_div(Dv, 6);
  index_t d = 0;
  for (index_t c = 0; c < chunks; ++c) {
    const index_t n = Dv / chunks + (c < Dv % chunks ? 1 : 0);
    switch (n) {
      case 1: lanes_pv2<T, 1>(nu, nj, s0, s1, in, vb, ds, d, inv0, inv1, ob0, ob1); break;
      case 2: lanes_pv2<T, 2>(nu, nj, s0, s1, in, vb, ds, d, inv0, inv1, ob0, ob1); break;
      case 3: lanes_pv2<T, 3>(nu, nj, s0, s1, in, vb, ds, d, inv0, inv1, ob0, ob1); break;
      case 4: lanes_pv2<T, 4>(nu, nj, s0, s1, in, vb, ds, d, inv0, inv1, ob0, ob1); break;
      case 5: lanes_pv2<T, 5>(nu, nj, s0, s1, in, vb, ds, d, inv0, inv1, ob0, ob1); break;
      default: lanes_pv2<T, 6>(nu, nj, s0, s1, in, vb, ds, d, inv0, inv1, ob0, ob1); break;
    }
    d += n;
  }
}

/// One work item: the block of W queries x0 .. x0 + W - 1 of row z of sequence b, head h,
/// for every y. The K^T / V^T columns the block reads ("chunk": W + nj - 1 columns from
/// x0 + olo) of each key row are transposed once into a ring of key rows, so consecutive
/// query rows, which share all but one key row per plane, find them in L1.
template <class T>
void lanes_item(const AttentionParams<T>& p, const WindowMask& m, const WindowExtras<T>& x,
                index_t b, index_t h, index_t z, index_t x0, LanesScratch<T>& s) {
  constexpr int W = VecTraits<T>::W;
  const index_t D = p.D, Dv = p.Dv, k2 = m.k[2], n1 = m.n[1], n2 = m.n[2];
  const index_t hk = h / (p.H / p.Hkv);
  const index_t qbeg = p.cu_q[b], kbeg = p.cu_k[b];
  const index_t nl = imin(W, n2 - x0);  // real lanes
  // Window offsets (key - query) of the real lanes on the innermost axis.
  index_t olo = 0, ohi = 0, lo, hi;
  for (index_t l = 0; l < nl; ++l) {
    m.window(2, x0 + l, lo, hi);
    olo = l == 0 ? lo - x0 : imin(olo, lo - x0 - l);
    ohi = l == 0 ? hi - 1 - x0 : imax(ohi, hi - 1 - x0 - l);
  }
  const index_t nj = ohi - olo + 1, cb = x0 + olo, wc = round_up(W + nj - 1, 8);
  bool masked = false;
  s.mask.assign(nj * W, T(0));
  for (index_t l = 0; l < nl; ++l) {
    m.window(2, x0 + l, lo, hi);
    for (index_t o = olo; o <= ohi; ++o) {
      const bool out = x0 + l + o < lo || x0 + l + o >= hi;
      if (out) s.mask[(o - olo) * W + l] = kNegInf<T>;
      masked |= out;
    }
  }
  // Key-row ring: the rows of two consecutive query rows' windows never share a slot.
  index_t kz0, kz1;
  m.window(0, z, kz0, kz1);
  index_t k1r = 1;
  for (index_t y = 0; y < n1; ++y) {
    index_t lo1, hi1;
    m.window(1, y, lo, hi);
    m.window(1, imin(y + 1, n1 - 1), lo1, hi1);
    k1r = imax(k1r, hi1 - lo);
  }
  const index_t slots = (kz1 - kz0) * k1r;
  // Chunk rows start on cache lines (wc = 16 floats: one line per feature, and the shifted
  // loads of offsets 0 .. 8 never straddle two lines).
  s.kr.resize(slots * D * wc + 16);
  s.vr.resize(slots * Dv * wc + 16);
  T* const kring = align64(s.kr.data());
  T* const vring = align64(s.vr.data());
  s.slot_row.assign(slots, -1);
  s.rows.resize(imax(imax(wc, W), Dv));
  if (static_cast<index_t>(s.zeros.size()) < imax(D, Dv)) s.zeros.assign(imax(D, Dv), T(0));
  s.qt.resize(2 * D * W);
  if (static_cast<index_t>(s.iota.size()) < wc) {
    s.iota.resize(wc);
    for (index_t c = 0; c < wc; ++c) s.iota[c] = c;
  }
  s.ob.resize(2 * Dv * W);

  const T c2 = p.scale * static_cast<T>(1.4426950408889634);
  const T ln2 = static_cast<T>(0.69314718055994531);
  const index_t Rall = x.R[0] * x.R[1] * x.R[2];
  const T* bias_h = x.bias ? x.bias + h * Rall : nullptr;
  // Query rows in pairs: a key row both rows see is loaded once for both (QK^T and PV).
  for (index_t y = 0; y < n1; y += 2) {
    const int nq = y + 1 < n1 ? 2 : 1;
    index_t sy[2], ey[2];
    m.window(1, y, sy[0], ey[0]);
    m.window(1, y + nq - 1, sy[1], ey[1]);
    s.kb.clear();
    s.vb.clear();
    s.in.clear();
    for (int r = 0; r < 2; ++r) s.krel[r].clear();
    for (index_t kz = kz0; kz < kz1; ++kz)
      for (index_t ky = sy[0]; ky < ey[nq - 1]; ++ky) {
        const bool in0 = ky < ey[0], in1 = nq == 2 && ky >= sy[1];
        if (!in0 && !in1) continue;
        const index_t slot = (kz - kz0) * k1r + ky % k1r, row = kz * n1 + ky;
        T* kd = kring + slot * D * wc;
        T* vd = vring + slot * Dv * wc;
        if (s.slot_row[slot] != row) {
          s.slot_row[slot] = row;
          const index_t t0 = kbeg + m.token(kz, ky, 0);
          for (index_t c = 0; c < wc; ++c)
            s.rows[c] = cb + c >= 0 && cb + c < n2 ? p.k.at(hk, t0 + cb + c) : s.zeros.data();
          transpose_ptrs(s.rows.data(), wc, D, kd, wc);
          for (index_t c = 0; c < wc; ++c)
            s.rows[c] = cb + c >= 0 && cb + c < n2 ? p.v.at(hk, t0 + cb + c) : s.zeros.data();
          transpose_ptrs(s.rows.data(), wc, Dv, vd, wc);
        }
        s.kb.push_back(kd);
        s.vb.push_back(vd);
        s.in.push_back((in0 ? 1 : 0) | (in1 ? 2 : 0));
        for (int r = 0; r < nq; ++r)
          if ((r == 0 && in0) || (r == 1 && in1))
            s.krel[r].push_back((kz - z + m.k[0] - 1) * x.R[1] + (ky - (y + r) + m.k[1] - 1));
      }
    const index_t nu = static_cast<index_t>(s.kb.size());
    index_t nr[2] = {static_cast<index_t>(s.krel[0].size()), static_cast<index_t>(s.krel[1].size())};
    s.s.resize((nr[0] + nr[1]) * nj * W);
    T* S[2] = {s.s.data(), s.s.data() + nr[0] * nj * W};
    // Prefetch the next pair's Q rows and the key rows that enter the ring there (rows
    // H * D apart: their misses are a large part of the forward otherwise), a few lines
    // before each key row's GEMM below rather than in one burst.
    s.pf.clear();
    if (y + 2 < n1) {
      const index_t y2 = imin(y + 3, n1 - 1);
      for (index_t yy = y + 2; yy <= y2; ++yy)
        s.pf.add(p.q.at(h, 0), p.q.row_stride, qbeg + m.token(z, yy, x0), s.iota.data(), nl, D);
      index_t sy2, ey2;
      m.window(1, y2, sy2, ey2);
      const index_t c0 = imax(0, cb), nc = imin(n2, cb + wc) - c0;
      for (index_t kz = kz0; kz < kz1; ++kz)
        for (index_t ky = ey[nq - 1]; ky < ey2; ++ky) {
          const index_t t0 = kbeg + m.token(kz, ky, 0) + c0;
          s.pf.add(p.k.at(hk, 0), p.k.row_stride, t0, s.iota.data(), nc, D);
          s.pf.add(p.v.at(hk, 0), p.v.row_stride, t0, s.iota.data(), nc, Dv);
        }
    }
    const size_t pf_share = s.pf.share(imax(1, nu));
    // Q^T of the block in both rows (lanes past the row read zeros).
    index_t tq[2];
    for (int r = 0; r < nq; ++r) {
      tq[r] = qbeg + m.token(z, y + r, x0);
      for (index_t l = 0; l < W; ++l) s.rows[l] = l < nl ? p.q.at(h, tq[r] + l) : s.zeros.data();
      transpose_ptrs(s.rows.data(), W, D, s.qt.data() + r * D * W, W);
    }
    const T* q0 = s.qt.data();
    const T* q1 = s.qt.data() + D * W;
    // Logits (base 2).
    index_t t[2] = {0, 0};
    for (index_t u = 0; u < nu; ++u) {
      s.pf.issue(pf_share);
      const int in = s.in[u];
      if (in == 3)
        lanes_qk2_any(nj, D, q0, q1, W, s.kb[u], wc, S[0] + t[0] * nj * W, S[1] + t[1] * nj * W, c2);
      else if (in == 1)
        lanes_qk_any(nj, D, q0, W, s.kb[u], wc, S[0] + t[0] * nj * W, c2);
      else
        lanes_qk_any(nj, D, q1, W, s.kb[u], wc, S[1] + t[1] * nj * W, c2);
      t[0] += in & 1;
      t[1] += in >> 1;
    }
    vec_t<T> inv[2];
    T mxs[2][W], sums[2][W];
    for (int r = 0; r < nq; ++r) {
      // Bias, mask.
      for (index_t tt = 0; tt < nr[r]; ++tt) {
        T* st = S[r] + tt * nj * W;
        if (bias_h) {
          const T* br = bias_h + s.krel[r][tt] * x.R[2] + (olo + k2 - 1);
          for (index_t j = 0; j < nj; ++j) storev(st + j * W, loadv(st + j * W) + br[j]);
        }
        if (masked)  // add_mask selects: a NaN logit of an unseen key must not leak
          for (index_t j = 0; j < nj; ++j)
            storev(st + j * W, add_mask<T>(loadv(st + j * W), loadv(s.mask.data() + j * W)));
      }
      // Softmax over the window (four independent maxima and sums: one chain would wait on
      // each add's latency).
      const index_t nkeys = nr[r] * nj;
      T* Sr = S[r];
      vec_t<T> m4[4] = {splatv<T>(kNegInf<T>), splatv<T>(kNegInf<T>), splatv<T>(kNegInf<T>),
                        splatv<T>(kNegInf<T>)};
      index_t e = 0;
      for (; e + 4 <= nkeys; e += 4)
        for (int u = 0; u < 4; ++u) m4[u] = vmax<T>(m4[u], loadv(Sr + (e + u) * W));
      for (; e < nkeys; ++e) m4[0] = vmax<T>(m4[0], loadv(Sr + e * W));
      const vec_t<T> mx = vmax<T>(vmax<T>(m4[0], m4[1]), vmax<T>(m4[2], m4[3]));
      vec_t<T> s4[4] = {};
      for (e = 0; e + 4 <= nkeys; e += 4)
        for (int u = 0; u < 4; ++u) {
          const vec_t<T> pe = exp2v_nonpos(loadv(Sr + (e + u) * W) - mx);
          storev(Sr + (e + u) * W, pe);
          s4[u] += pe;
        }
      for (; e < nkeys; ++e) {
        const vec_t<T> pe = exp2v_nonpos(loadv(Sr + e * W) - mx);
        storev(Sr + e * W, pe);
        s4[0] += pe;
      }
      const vec_t<T> sum = (s4[0] + s4[1]) + (s4[2] + s4[3]);
      inv[r] = splatv<T>(T(1)) / sum;
      storev(mxs[r], mx);
      storev(sums[r], sum);
    }
    // O^T = P V, both rows at once (a lone last row: every key row has in == 1, and row 1's
    // accumulators stay zero and are not stored below).
    if (nq == 1) inv[1] = inv[0];
    lanes_pv2_any(Dv, nu, nj, S[0], S[1], s.in.data(), s.vb.data(), wc, inv[0], inv[1],
                  s.ob.data(), s.ob.data() + Dv * W);
    // Token-major output rows (rows of consecutive lanes are H * Dv apart: 8x8 register
    // transposes straight into them) and LSEs of the real lanes.
    for (int r = 0; r < nq; ++r) {
      T* const o0 = p.o + (tq[r] * p.H + h) * Dv;
      const T* ob = s.ob.data() + r * Dv * W;
      if (Dv % 8 == 0) {
        for (index_t d = 0; d < Dv; ++d) s.rows[d] = ob + d * W;
        transpose_ptrs(s.rows.data(), Dv, nl, o0, p.H * Dv);
      } else {
        for (index_t l = 0; l < nl; ++l)
          for (index_t d = 0; d < Dv; ++d) o0[l * p.H * Dv + d] = ob[d * W + l];
      }
      T lg[W];
      log2_rows<W, T>(sums[r], lg);  // one vector log2 (fp32) instead of a libm call per lane
      for (index_t l = 0; l < nl; ++l) p.lse[(tq[r] + l) * p.H + h] = (mxs[r][l] + lg[l]) * ln2;
    }
  }
}

/// Forward of NA with stride 1 on the innermost axis (na_lanes_applies), all sequences.
template <class T>
void na_fwd_lanes(const AttentionParams<T>& p, const WindowMask::Args& args,
                  const WindowExtras<T>& x, const ParallelRunner& r) {
  constexpr int W = VecTraits<T>::W;
  std::vector<index_t> start(p.B + 1, 0);
  for (index_t b = 0; b < p.B; ++b) {
    const WindowMask m = WindowMask::make(args, b);
    start[b + 1] = start[b] + p.H * m.n[0] * ceil_div(m.n[2], W);
  }
  for_each_item(r, start[p.B], LanesScratch<T>{}, [&](index_t it, LanesScratch<T>& s) {
    index_t b = 0;
    while (start[b + 1] <= it) ++b;
    const WindowMask m = WindowMask::make(args, b);
    const index_t nblk = ceil_div(m.n[2], W);
    index_t rem = it - start[b];
    const index_t i = rem % nblk;
    rem /= nblk;
    const index_t z = rem % m.n[0], h = rem / m.n[0];
    lanes_item(p, m, x, b, h, z, i * W, s);
  });
}

}  // namespace attn_detail
}  // namespace tilefuse::cpu::TF_ISA_NS
