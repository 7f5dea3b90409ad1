// SPDX-License-Identifier: Apache-2.0
// Driver 2 of the attention main loop: spatial tiles for the window policy (neighborhood
// attention, Swin windows; tilefuse/attention/window.h). Query tiles are boxes of the token
// grid, key tiles are boxes of the key union of a query tile; both are gathered into small
// contiguous buffers (K^T / V^T transposed there, in L1; one copy of D floats per token,
// ~1/64 of the tile's GEMM work) and run
// through the same tile step as the 1-D policies (fwd_step / bwd_step in attention_loop.h).
// Included by the ISA-tier kernel files only.
#pragma once
#include <cstring>

#include "tilefuse/attention/window.h"
#include "tilefuse/cpu/attention_loop.h"

namespace tilefuse::cpu::TF_ISA_NS {
namespace attn_detail {

/// Sequence-local token index of each position of box b (row-major), -1 for padding keys.
inline index_t box_tokens(const WindowMask& m, const Box& b, index_t* tok) {
  index_t n = 0;
  for (index_t c0 = b.lo[0]; c0 < b.hi[0]; ++c0)
    for (index_t c1 = b.lo[1]; c1 < b.hi[1]; ++c1)
      for (index_t c2 = b.lo[2]; c2 < b.hi[2]; ++c2) tok[n++] = m.token(c0, c1, c2);
  return n;
}

/// dst[0, n) = src[0, n): inline (these copies are a few dozen floats; a libc call per copy
/// costs more than the copy).
template <class T>
inline void copy_short(T* dst, const T* src, index_t n) {
  constexpr int W = VecTraits<T>::W;
  index_t i = 0;
  for (; i + W <= n; i += W) storev(dst + i, loadv(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

/// dst[i * ld + c] = row(tok[i])[c] for c < C, or pad[c] (zeros when pad is null, and past
/// padC) for padding tokens (tok < 0).
template <class T, class Row>
void gather_rows(const index_t* tok, index_t n, index_t C, const Row& row, const T* pad,
                 index_t padC, T* dst, index_t ld) {
  for (index_t i = 0; i < n; ++i) {
    T* d = dst + i * ld;
    if (tok[i] >= 0) {
      copy_short(d, row(tok[i]), C);
    } else {
      std::fill(d, d + C, T(0));
      if (pad) copy_short(d, pad, padC);
    }
  }
}

/// dst[c * ldd + j] = src[j * lds + c] for j < n, c < C: the transposed copy of gathered rows
/// (K^T and V^T of a key tile, built in L1 instead of transposing the whole tensor).
template <class T>
void transpose_rows(const T* src, index_t lds, index_t n, index_t C, T* dst, index_t ldd) {
  constexpr index_t JB = 8;
  for (index_t j0 = 0; j0 < n; j0 += JB) {
    const index_t jn = imin(JB, n - j0);
    for (index_t c = 0; c < C; ++c) {
      T* d = dst + c * ldd + j0;
      const T* s = src + j0 * lds + c;
      for (index_t j = 0; j < jn; ++j) d[j] = s[j * lds];
    }
  }
}

/// Visits, for every query row of box qb, its window intersected with key box kb as runs:
/// fn(i, x, col, a, e, c0, c1) for each key row (c0, c1) of kb starting at column col, where
/// columns [col + a, col + e) are visible and the rest of the row [col, col + w2) is not.
template <class Fn>
void for_each_window_run(const WindowMask& m, const Box& qb, const Box& kb, const Fn& fn) {
  const index_t w2 = kb.extent(2);
  index_t i = 0;
  for (index_t x0 = qb.lo[0]; x0 < qb.hi[0]; ++x0)
    for (index_t x1 = qb.lo[1]; x1 < qb.hi[1]; ++x1)
      for (index_t x2 = qb.lo[2]; x2 < qb.hi[2]; ++x2, ++i) {
        const index_t x[3] = {x0, x1, x2};
        index_t lo[3], hi[3];
        for (int ax = 0; ax < 3; ++ax) m.window(ax, x[ax], lo[ax], hi[ax]);
        index_t col = 0;
        for (index_t c0 = kb.lo[0]; c0 < kb.hi[0]; ++c0)
          for (index_t c1 = kb.lo[1]; c1 < kb.hi[1]; ++c1, col += w2) {
            const bool in = c0 >= lo[0] && c0 < hi[0] && c1 >= lo[1] && c1 < hi[1];
            const index_t a = in ? imin(w2, imax(0, lo[2] - kb.lo[2])) : w2;
            const index_t e = in ? imax(a, imin(w2, hi[2] - kb.lo[2])) : w2;
            fn(i, x, col, a, e, c0, c1);
          }
      }
}

/// Offset into the canonical bias table of key (c0, c1, kb.lo[2] + a) seen from query x.
inline index_t bias_index(const WindowMask& m, const index_t* R, const index_t* x, index_t c0,
                          index_t c1, index_t c2) {
  return ((c0 - x[0] + m.bias_offset(0)) * R[1] + (c1 - x[1] + m.bias_offset(1))) * R[2] +
         (c2 - x[2] + m.bias_offset(2));
}

/// Masks (partial tiles) and biases one logits tile of query box qb against key box kb.
template <class T>
void window_mask_tile(const WindowMask& m, const Box& qb, const Box& kb, int state,
                      const T* bias, const index_t* R, T* S, index_t qm, index_t kn,
                      index_t kn16) {
  if (state == kTilePartial || bias) {
    for_each_window_run(m, qb, kb,
                        [&](index_t i, const index_t* x, index_t col, index_t a, index_t e,
                            index_t c0, index_t c1) {
                          T* row = S + i * BK + col;
                          if (state == kTilePartial) {
                            std::fill(row, row + a, kNegInf<T>);
                            std::fill(row + e, row + kb.extent(2), kNegInf<T>);
                          }
                          if (bias && e > a) {
                            const T* bp = bias + bias_index(m, R, x, c0, c1, kb.lo[2] + a);
                            for (index_t j = a; j < e; ++j) row[j] += bp[j - a];
                          }
                        });
  }
  for (index_t i = 0; i < qm; ++i) std::fill(S + i * BK + kn, S + i * BK + kn16, kNegInf<T>);
}


/// Geometry of a tile pair that fixes its bias tile when the pair is full: the extents of both
/// boxes and their offset (bias depends on key - query only).
inline void tile_key(const Box& qb, const Box& kb, index_t* key) {
  for (int a = 0; a < 3; ++a) {
    key[a] = qb.extent(a);
    key[3 + a] = kb.extent(a);
    key[6 + a] = kb.lo[a] - qb.lo[a];
  }
}
inline bool same_key(const index_t* a, const index_t* b) {
  for (int i = 0; i < 9; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

/// The bias of a full tile pair as a dense [qm, BK] tile (blocked and Swin windows repeat the
/// same geometry across the whole grid, so it is built once per head and reused).
template <class T>
void build_bias_tile(const WindowMask& m, const Box& qb, const Box& kb, const T* bias,
                     const index_t* R, T* tile, index_t qm) {
  std::fill(tile, tile + qm * BK, T(0));
  for_each_window_run(m, qb, kb,
                      [&](index_t i, const index_t* x, index_t col, index_t a, index_t e,
                          index_t c0, index_t c1) {
                        if (e <= a) return;
                        const T* bp = bias + bias_index(m, R, x, c0, c1, kb.lo[2] + a);
                        T* row = tile + i * BK + col;
                        for (index_t j = a; j < e; ++j) row[j] = bp[j - a];
                      });
}

/// S += tile over [qm, kn16) (vectorised).
template <class T>
void add_tile(T* S, const T* tile, index_t qm, index_t kn16) {
  constexpr int W = VecTraits<T>::W;
  for (index_t i = 0; i < qm; ++i)
    for (index_t j = 0; j < kn16; j += W)
      storev(S + i * BK + j, loadv(S + i * BK + j) + loadv(tile + i * BK + j));
}

/// window_mask_tile, with the bias of full tiles taken from a per-head cache.
template <class T, class Scratch>
void window_mask_tile_cached(const WindowMask& m, const Box& qb, const Box& kb, int state,
                             const T* bias, const index_t* R, T* S, index_t qm, index_t kn,
                             index_t kn16, index_t h, index_t H, Scratch& s) {
  if (!bias || state != kTileFull) {
    window_mask_tile(m, qb, kb, state, bias, R, S, qm, kn, kn16);
    return;
  }
  index_t key[9];
  tile_key(qb, kb, key);
  if (s.bias_valid.empty()) {
    s.bias_valid.assign(H, 0);
    s.bias_tiles.resize(H * BQ * BK);
  }
  if (!same_key(key, s.bias_key)) {
    std::fill(s.bias_valid.begin(), s.bias_valid.end(), 0);
    std::copy(key, key + 9, s.bias_key);
  }
  T* tile = s.bias_tiles.data() + h * BQ * BK;
  if (!s.bias_valid[h]) {
    build_bias_tile(m, qb, kb, bias, R, tile, qm);
    s.bias_valid[h] = 1;
  }
  add_tile(S, tile, qm, kn16);
  for (index_t i = 0; i < qm; ++i) std::fill(S + i * BK + kn, S + i * BK + kn16, kNegInf<T>);
}

/// The outermost axis along which box b has more than one position (2 if none): tokens of b
/// with that coordinate in a sub-range form one contiguous run of b's row-major order.
inline int outer_axis(const Box& b) {
  for (int ax = 0; ax < 3; ++ax)
    if (b.extent(ax) > 1) return ax;
  return 2;
}
inline index_t inner_size(const Box& b, int ax) {
  index_t n = 1;
  for (int a = ax + 1; a < 3; ++a) n *= b.extent(a);
  return n;
}
/// Slab thickness along the outer axis: about `target` tokens per slab, at most `cap`.
inline index_t slab_units(index_t per_unit, index_t target, index_t cap) {
  return imax(1, imin(cap / imax(1, per_unit), (target + per_unit / 2) / imax(1, per_unit)));
}

/// Keys of a query tile are visited in slabs along the tile's outer axis; each slab is seen
/// by a contiguous sub-range of the tile's rows (windows are monotone), so the rows that
/// cannot see it are skipped instead of masked: along that axis the work is exact.
constexpr index_t kKeySlabTarget = 32;
constexpr index_t kQuerySlabTarget = 48;

template <class T>
void window_fwd_tile(const AttentionParams<T>& p, const WindowMask::Args& args,
                     const WindowExtras<T>& x, index_t h, index_t b, index_t qt,
                     FwdScratch<T>& s) {
  const index_t hk = h / (p.H / p.Hkv);
  const index_t qbeg = p.cu_q[b], kbeg = p.cu_k[b];
  const WindowMask m = WindowMask::make(args, b);
  const Box qb = m.query_tile(qt);
  index_t *qtok = s.qtok.data(), *ktok = s.ktok.data();
  const index_t qm = box_tokens(m, qb, qtok);
  gather_rows<T>(qtok, qm, p.D, [&](index_t t) { return p.q.at(h, qbeg + t); }, nullptr, 0,
                 s.Qg.data(), p.Dp);
  const T* kpad = x.k_pad ? x.k_pad + hk * p.D : nullptr;
  const T* vpad = x.v_pad ? x.v_pad + hk * p.Dv : nullptr;
  const T* bias = x.bias ? x.bias + h * x.R[0] * x.R[1] * x.R[2] : nullptr;
  fwd_init(qm, p.Dvp, s);
  const Box ku = m.key_union(qb);
  const int ax = outer_axis(qb);
  const index_t q_inner = inner_size(qb, ax), k_inner = inner_size(ku, ax);
  index_t g = slab_units(k_inner, kKeySlabTarget, BK);
  {
    index_t lo0, hi0, lo1, hi1;  // every row sees the same keys along ax: one slab
    m.window(ax, qb.lo[ax], lo0, hi0);
    m.window(ax, qb.hi[ax] - 1, lo1, hi1);
    if (lo0 == lo1 && hi0 == hi1) g = imax(1, BK / k_inner);
  }
  index_t qlo = qb.lo[ax], qhi = qb.lo[ax];
  for (index_t c = ku.lo[ax]; c < ku.hi[ax]; c += g) {
    Box slab = ku;
    slab.lo[ax] = c;
    slab.hi[ax] = imin(c + g, ku.hi[ax]);
    // Rows of the tile whose window meets the slab: [qlo, qhi) along ax (both advance).
    index_t lo, hi;
    for (; qlo < qb.hi[ax]; ++qlo) {
      m.window(ax, qlo, lo, hi);
      if (hi > slab.lo[ax]) break;
    }
    if (qlo == qb.hi[ax]) break;  // cannot happen: the union of monotone windows has no gap
    qhi = imax(qhi, qlo);
    while (qhi < qb.hi[ax]) {
      m.window(ax, qhi, lo, hi);
      if (lo >= slab.hi[ax]) break;
      ++qhi;
    }
    Box qs = qb;
    qs.lo[ax] = qlo;
    qs.hi[ax] = qhi;
    const index_t i0 = (qlo - qb.lo[ax]) * q_inner, qn = (qhi - qlo) * q_inner;
    const BoxSplit split = BoxSplit::make(slab, BK);
    for (index_t t = 0; t < split.count(); ++t) {
      const Box kb = split.piece(t);
      const index_t kn = box_tokens(m, kb, ktok);
      gather_rows<T>(ktok, kn, p.D, [&](index_t j) { return p.k.at(hk, kbeg + j); }, kpad, p.D,
                     s.Kg.data(), p.Dp);
      transpose_rows(s.Kg.data(), p.Dp, kn, p.D, s.KTg.data(), BK);
      gather_rows<T>(ktok, kn, p.Dvp, [&](index_t j) { return p.v.at(hk, kbeg + j); }, vpad,
                     p.Dv, s.Vg.data(), p.Dvp);
      const int state = m.tile(qs, kb);
      fwd_step(p, s.Qg.data() + i0 * p.Dp, p.Dp, i0, qn, s.KTg.data(), BK, s.Vg.data(), p.Dvp,
               kn, s, [&](T* S, index_t kn_, index_t kn16) {
                 window_mask_tile_cached(m, qs, kb, state, bias, x.R, S, qn, kn_, kn16, h, p.H, s);
               });
    }
  }
  for (index_t i = 0; i < qm; ++i) fwd_write_row(p, s, i, h, qbeg + qtok[i]);
}

/// Prefetches, for every head, the rows of the tokens of box b in operand x: one tile is
/// processed for all heads in a row, and the heads of a token are neighbours in memory
/// ([B, *spatial, H, D]), so the later heads' gathers then hit the cache.
template <class T>
void prefetch_box(const WindowMask& m, const Box& b, const Operand<T>& x, index_t base,
                  index_t heads, index_t C) {
  for (index_t c0 = b.lo[0]; c0 < b.hi[0]; ++c0)
    for (index_t c1 = b.lo[1]; c1 < b.hi[1]; ++c1)
      for (index_t c2 = b.lo[2]; c2 < b.hi[2]; ++c2) {
        const index_t t = m.token(c0, c1, c2);
        if (t < 0) continue;
        for (index_t h = 0; h < heads; ++h) {
          const char* r = reinterpret_cast<const char*>(x.at(h, base + t));
          for (index_t o = 0; o < C * index_t(sizeof(T)); o += 64) __builtin_prefetch(r + o);
        }
      }
}

template <class T>
void window_fwd(const AttentionParams<T>& p, const WindowMask::Args& args,
                const WindowExtras<T>& x, const ParallelRunner& r) {
  std::vector<index_t> tile_start(p.B + 1, 0);
  for (index_t b = 0; b < p.B; ++b)
    tile_start[b + 1] = tile_start[b] + WindowMask::make(args, b).num_query_tiles();
  const index_t tiles = tile_start[p.B];
  const FwdScratch<T> proto = fwd_scratch(p, true);
  // An item is one query tile for all heads (see prefetch_box).
  for_each_item(r, tiles, proto, [&](index_t t, FwdScratch<T>& s) {
    index_t b = 0;
    while (tile_start[b + 1] <= t) ++b;
    const WindowMask m = WindowMask::make(args, b);
    const Box qb = m.query_tile(t - tile_start[b]);
    const Box ku = m.key_union(qb);
    prefetch_box(m, qb, p.q, p.cu_q[b], p.H, p.D);
    prefetch_box(m, ku, p.k, p.cu_k[b], p.Hkv, p.D);
    prefetch_box(m, ku, p.v, p.cu_k[b], p.Hkv, p.Dv);
    for (index_t h = 0; h < p.H; ++h) window_fwd_tile(p, args, x, h, b, t - tile_start[b], s);
  });
}

/// Scatters the pending dS sum of full tiles into the item's partial bias gradient.
template <class T>
void flush_dbias(const WindowMask& m, BwdScratch<T>& s, const index_t* R, T* dbias) {
  const T* d = s.dbias_tile.data();
  const Box& kb = s.dbias_kb;
  for_each_window_run(m, s.dbias_qb, kb,
                      [&](index_t i, const index_t* xq, index_t col, index_t a, index_t e,
                          index_t c0, index_t c1) {
                        if (e <= a) return;
                        T* gb = dbias + bias_index(m, R, xq, c0, c1, kb.lo[2] + a);
                        for (index_t j = a; j < e; ++j) gb[j - a] += d[i * BK + col + j];
                      });
  s.dbias_pending = false;
}

template <class T>
void window_bwd_item(const AttentionParams<T>& p, const WindowMask::Args& args,
                     const WindowExtras<T>& x, index_t h, index_t b, index_t chunk, index_t item,
                     BwdScratch<T>& s) {
  const index_t hk = h / (p.H / p.Hkv);
  const index_t qbeg = p.cu_q[b], kbeg = p.cu_k[b];
  const WindowMask m = WindowMask::make(args, b);
  const index_t nkt = m.num_key_tiles();
  const index_t kt_begin = chunk * nkt / p.n_kv_chunks, kt_end = (chunk + 1) * nkt / p.n_kv_chunks;
  const T* kpad = x.k_pad ? x.k_pad + hk * p.D : nullptr;
  const T* vpad = x.v_pad ? x.v_pad + hk * p.Dv : nullptr;
  const index_t Rn = x.R[0] * x.R[1] * x.R[2];
  const T* bias = x.bias ? x.bias + h * Rn : nullptr;
  T* dbias = x.dbias ? x.dbias + item * Rn : nullptr;
  T* dkpad = x.dk_pad ? x.dk_pad + item * p.D : nullptr;
  T* dvpad = x.dv_pad ? x.dv_pad + item * p.Dv : nullptr;
  T* dQ = p.dq + ((chunk * p.H + h) * p.Tq + qbeg) * p.Dp;
  T *dK = s.dK.data(), *dV = s.dV.data(), *lse2 = s.lse.data(), *delta = s.delta.data();
  index_t *qtok = s.qtok.data(), *ktok = s.ktok.data();

  for (index_t kt = kt_begin; kt < kt_end; ++kt) {
    const Box kb = m.key_tile(kt);
    Box qu;
    if (!m.query_union(kb, qu)) continue;  // keys nobody sees: gradients stay 0
    const index_t kn = box_tokens(m, kb, ktok);
    gather_rows<T>(ktok, kn, p.Dp, [&](index_t j) { return p.k.at(hk, kbeg + j); }, kpad, p.D,
                   s.Kg.data(), p.Dp);
    transpose_rows(s.Kg.data(), p.Dp, kn, p.D, s.KTg.data(), BK);
    gather_rows<T>(ktok, kn, p.Dv, [&](index_t j) { return p.v.at(hk, kbeg + j); }, vpad, p.Dv,
                   s.Vg.data(), p.Dvp);
    transpose_rows(s.Vg.data(), p.Dvp, kn, p.Dv, s.VTg.data(), BK);
    std::fill(dK, dK + kn * p.Dp, T(0));
    std::fill(dV, dV + kn * p.Dvp, T(0));
    // Query slabs along the key tile's outer axis; each sees a contiguous sub-range of the
    // key tile's columns (the mirror image of the forward's key slabs).
    const int ax = outer_axis(kb);
    const index_t k_inner = inner_size(kb, ax), q_inner = inner_size(qu, ax);
    index_t g = slab_units(q_inner, kQuerySlabTarget, BQ);
    {
      index_t lo0, hi0, lo1, hi1;
      m.window(ax, qu.hi[ax] - 1, lo0, hi0);
      m.window(ax, qu.lo[ax], lo1, hi1);
      if (lo0 <= kb.lo[ax] && hi1 >= kb.hi[ax]) g = imax(1, BQ / q_inner);  // all see all
    }
    for (index_t x0 = qu.lo[ax]; x0 < qu.hi[ax]; x0 += g) {
      Box slab = qu;
      slab.lo[ax] = x0;
      slab.hi[ax] = imin(x0 + g, qu.hi[ax]);
      index_t wlo, whi, wlo2, whi2;
      m.window(ax, slab.lo[ax], wlo, whi);
      m.window(ax, slab.hi[ax] - 1, wlo2, whi2);
      Box kc = kb;
      kc.lo[ax] = imax(kb.lo[ax], wlo);
      kc.hi[ax] = imin(kb.hi[ax], whi2);
      if (kc.hi[ax] <= kc.lo[ax]) continue;
      const index_t j0 = (kc.lo[ax] - kb.lo[ax]) * k_inner, kcn = kc.size();
      const BoxSplit split = BoxSplit::make(slab, BQ);
      for (index_t t = 0; t < split.count(); ++t) {
        const Box qb = split.piece(t);
        const index_t qm = box_tokens(m, qb, qtok);
        gather_rows<T>(qtok, qm, p.Dp, [&](index_t i) { return p.q.at(h, qbeg + i); }, nullptr,
                       0, s.Qg.data(), p.Dp);
        gather_rows<T>(qtok, qm, p.Dvp, [&](index_t i) { return p.dout.at(h, qbeg + i); },
                       nullptr, 0, s.dOg.data(), p.Dvp);
        for (index_t i = 0; i < qm; ++i) {
          const index_t gi = (qbeg + qtok[i]) * p.H + h;
          const T lse = p.lse_in[gi];
          lse2[i] = lse_base2(lse);
          delta[i] = p.delta[gi];
        }
        const int state = m.tile(qb, kc);
        bwd_step<false>(
            p, s.Qg.data(), p.Dp, s.dOg.data(), p.Dvp, qm, lse2, delta, s.KTg.data() + j0, BK,
            s.VTg.data() + j0, BK, s.Kg.data() + j0 * p.Dp, p.Dp, kcn, dK + j0 * p.Dp,
            dV + j0 * p.Dvp, s.dQg.data(), p.Dp, s,
            [&](T* S, index_t kn_, index_t kn16) {
              window_mask_tile_cached(m, qb, kc, state, bias, x.R, S, qm, kn_, kn16, h, p.H, s);
            },
            [&](const T* dS) {
              if (!dbias) return;
              if (state == kTileFull) {  // sum dS per geometry, scatter into the table once
                index_t key[9];
                tile_key(qb, kc, key);
                if (s.dbias_pending && !same_key(key, s.dbias_key)) flush_dbias(m, s, x.R, dbias);
                if (!s.dbias_pending) {
                  s.dbias_tile.assign(BQ * BK, T(0));
                  std::copy(key, key + 9, s.dbias_key);
                  s.dbias_qb = qb;
                  s.dbias_kb = kc;
                  s.dbias_pending = true;
                }
                add_tile(s.dbias_tile.data(), dS, qm, round_up(kcn, 16));
                return;
              }
              for_each_window_run(m, qb, kc,
                                  [&](index_t i, const index_t* xq, index_t col, index_t a,
                                      index_t e, index_t c0, index_t c1) {
                                    if (e <= a) return;
                                    T* gb = dbias + bias_index(m, x.R, xq, c0, c1, kc.lo[2] + a);
                                    const T* d = dS + i * BK + col;
                                    for (index_t j = a; j < e; ++j) gb[j - a] += d[j];
                                  });
            });
        for (index_t i = 0; i < qm; ++i) {
          T* dst = dQ + qtok[i] * p.Dp;
          const T* src = s.dQg.data() + i * p.Dp;
          for (index_t c = 0; c < p.D; ++c) dst[c] += src[c];
        }
      }
    }
    for (index_t c = 0; c < kn; ++c) {
      const T* dk = dK + c * p.Dp;
      const T* dv = dV + c * p.Dvp;
      if (ktok[c] >= 0) {
        T* dKo = p.dk + (h * p.Tk + kbeg + ktok[c]) * p.Dp;
        T* dVo = p.dv + (h * p.Tk + kbeg + ktok[c]) * p.Dvp;
        for (index_t d = 0; d < p.D; ++d) dKo[d] = dk[d] * p.scale;
        std::copy(dv, dv + p.Dv, dVo);
      } else {
        if (dkpad)
          for (index_t d = 0; d < p.D; ++d) dkpad[d] += dk[d] * p.scale;
        if (dvpad)
          for (index_t d = 0; d < p.Dv; ++d) dvpad[d] += dv[d];
      }
    }
  }
  if (s.dbias_pending) flush_dbias(m, s, x.R, dbias);
}

template <class T>
void window_bwd(const AttentionParams<T>& p, const WindowMask::Args& args,
                const WindowExtras<T>& x, const ParallelRunner& r) {
  const BwdScratch<T> proto = bwd_scratch(p, true);
  const index_t per_head = p.B * p.n_kv_chunks;
  for_each_item(r, p.H * per_head, proto, [&](index_t it, BwdScratch<T>& s) {
    const index_t h = it / per_head, rest = it % per_head;
    window_bwd_item(p, args, x, h, rest / p.n_kv_chunks, rest % p.n_kv_chunks, it, s);
  });
}

}  // namespace attn_detail
}  // namespace tilefuse::cpu::TF_ISA_NS
