// SPDX-License-Identifier: Apache-2.0
// Driver 2 of the attention main loop: spatial tiles for the window policy (neighborhood
// attention, Swin windows; tilefuse/attention/window.h). Query tiles are boxes of the token
// grid, key tiles are boxes of the key union of a query tile; both are gathered into small
// contiguous buffers (K^T / V^T transposed there, in L1; one copy of D floats per token,
// ~1/64 of the tile's GEMM work) and run
// through the same tile step as the 1-D policies (fwd_step / bwd_step in attention_loop.h).
// Included by the ISA-tier kernel files only.
#pragma once
#include <atomic>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

/// dst[c * ldd + j] = row_ptr[j][c] for j < n8 (n8 a multiple of 8; rows past the real ones
/// point at zeros), c < C: K^T / V^T of a key tile built straight from the token rows, with
/// 8x8 register transposes in the avx2 tier (fp32).
template <class T>
void transpose_ptrs(const T* const* rows, index_t n8, index_t C, T* dst, index_t ldd) {
  index_t c0 = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; c0 + 8 <= C; c0 += 8)
      for (index_t j0 = 0; j0 < n8; j0 += 8) {
        const T* const* r = rows + j0;
        const __m256 r0 = _mm256_loadu_ps(r[0] + c0), r1 = _mm256_loadu_ps(r[1] + c0);
        const __m256 r2 = _mm256_loadu_ps(r[2] + c0), r3 = _mm256_loadu_ps(r[3] + c0);
        const __m256 r4 = _mm256_loadu_ps(r[4] + c0), r5 = _mm256_loadu_ps(r[5] + c0);
        const __m256 r6 = _mm256_loadu_ps(r[6] + c0), r7 = _mm256_loadu_ps(r[7] + c0);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
        const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        T* d = dst + c0 * ldd + j0;
        _mm256_storeu_ps(d + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(d + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
      }
  }
#endif
  for (index_t c = c0; c < C; ++c) {
    T* d = dst + c * ldd;
    for (index_t j = 0; j < n8; ++j) d[j] = rows[j][c];
  }
}


/// Points rows[j] at the K (or V) row of key token ktok[j] of kv head hk, at `pad` for padding
/// keys and at zeros for j in [kn, n).
template <class T>
void key_row_ptrs(const Operand<T>& op, index_t hk, index_t kbeg, const index_t* ktok,
                  index_t kn, index_t n, const T* pad, const T* zeros, const T** rows) {
  for (index_t j = 0; j < kn; ++j) rows[j] = ktok[j] >= 0 ? op.at(hk, kbeg + ktok[j]) : pad;
  for (index_t j = kn; j < n; ++j) rows[j] = zeros;
}

/// C[m, W cols] = sc * A B (or without sc): one-vector-wide micro-kernel for the last W
/// columns of a tile whose width is a multiple of W but not of 2W (gemm.h works in 2W).
template <class T, int MR, bool kScaled>
inline void gemm_tail_block(index_t k, const T* a, index_t a_rs, index_t a_cs, const T* b,
                            index_t ldb, T* c, index_t ldc, T sc) {
  vec_t<T> acc[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i] = vec_t<T>{};
  for (index_t p = 0; p < k; ++p) {
    const vec_t<T> b0 = loadv(b + p * ldb);
    const T* ap = a + p * a_cs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i] += ap[i * a_rs] * b0;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) storev(c + i * ldc, kScaled ? acc[i] * sc : acc[i]);
}

/// C[m, n] = sc * A B (kScaled) or A B, n a multiple of W (not of 2W as gemm.h needs): tiles
/// of 49 keys are 56 columns wide instead of 64.
template <bool kScaled, class T>
void gemm_store_w(index_t m, index_t n, index_t k, const T* a, index_t a_rs, index_t a_cs,
                  const T* b, index_t ldb, T* c, index_t ldc, T sc) {
  constexpr int W = VecTraits<T>::W;
  const index_t n2 = n / (2 * W) * (2 * W);
  if (n2 > 0) {
    if constexpr (kScaled)
      gemm<GemmOut::kStoreScaled>(m, n2, k, a, a_rs, a_cs, b, ldb, c, ldc, &sc);
    else
      gemm<GemmOut::kStore>(m, n2, k, a, a_rs, a_cs, b, ldb, c, ldc);
  }
  for (index_t j = n2; j < n; j += W) {
    index_t i = 0;
    for (; i + 8 <= m; i += 8)
      gemm_tail_block<T, 8, kScaled>(k, a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j, ldc, sc);
    const T* ai = a + i * a_rs;
    T* ci = c + i * ldc + j;
    switch (m - i) {
      case 7: gemm_tail_block<T, 7, kScaled>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, sc); break;
      case 6: gemm_tail_block<T, 6, kScaled>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, sc); break;
      case 5: gemm_tail_block<T, 5, kScaled>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, sc); break;
      case 4: gemm_tail_block<T, 4, kScaled>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, sc); break;
      case 3: gemm_tail_block<T, 3, kScaled>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, sc); break;
      case 2: gemm_tail_block<T, 2, kScaled>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, sc); break;
      case 1: gemm_tail_block<T, 1, kScaled>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, sc); break;
      default: break;
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


/// Geometry of a tile pair that fixes its bias when the pair is full: the extents of both boxes
/// and their offset (bias depends on key - query only); keys the backward's dS sums.
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

/// S += tile over [qm, kn16) (vectorised).
template <class T>
void add_tile(T* S, const T* tile, index_t qm, index_t kn16) {
  constexpr int W = VecTraits<T>::W;
  for (index_t i = 0; i < qm; ++i)
    for (index_t j = 0; j < kn16; j += W)
      storev(S + i * BK + j, loadv(S + i * BK + j) + loadv(tile + i * BK + j));
}

/// s + t where the mask + bias tile t is finite, -inf where it masks: a select rather than an
/// add, so that a NaN logit of a key the query does not see (a NaN in that key) stays out of
/// the row (NaN + -inf is NaN).
template <class T>
inline vec_t<T> add_mask(vec_t<T> s, vec_t<T> t) {
  return t == splatv<T>(kNegInf<T>) ? t : s + t;
}

/// Everything the mask and bias of a tile pair depend on: per axis the extents, the key box's
/// offset from the query box (bias: key - query) and each query coordinate's window clipped to
/// the key box (relative).
inline void tile_signature(const WindowMask& m, const Box& qb, const Box& kb,
                           std::vector<index_t>& sig) {
  sig.clear();
  for (int ax = 0; ax < 3; ++ax) {
    const index_t ke = kb.extent(ax);
    sig.push_back(qb.extent(ax));
    sig.push_back(ke);
    sig.push_back(kb.lo[ax] - qb.lo[ax]);
    for (index_t xx = qb.lo[ax]; xx < qb.hi[ax]; ++xx) {
      index_t lo, hi;
      m.window(ax, xx, lo, hi);
      sig.push_back(imin(ke, imax(0, lo - kb.lo[ax])));
      sig.push_back(imin(ke, imax(0, hi - kb.lo[ax])));
    }
  }
}

/// Per-thread cache of dense mask + bias tiles [qm, ld] (ld = kn rounded up to 8; -inf where
/// a key is not visible and in the ragged columns, the bias (or 0) where it is), one per
/// signature and head, built on first use. The backward also sums dS per entry and head
/// (bias gradient) and scatters the sums into the table when the entry is flushed.
template <class T>
struct MaskCache {
  struct Entry {
    std::vector<index_t> sig;
    index_t qm = 0, kn = 0, ld = 0, seq = 0;
    Box qb{}, kb{};
    std::vector<T> tiles, dsum;
    std::vector<char> built, dsum_used;
  };
  std::vector<Entry> entries;
  std::vector<index_t> sig;
  static constexpr size_t kMaxEntries = 64;
};

template <class T>
void build_mask_tile(const WindowMask& m, const Box& qb, const Box& kb, const T* bias,
                     const index_t* R, T* tile, index_t ld, index_t qm) {
  std::fill(tile, tile + qm * ld, kNegInf<T>);
  for_each_window_run(m, qb, kb,
                      [&](index_t i, const index_t* x, index_t col, index_t a, index_t e,
                          index_t c0, index_t c1) {
                        if (e <= a) return;
                        T* row = tile + i * ld + col;
                        if (bias) {
                          const T* bp = bias + bias_index(m, R, x, c0, c1, kb.lo[2] + a);
                          for (index_t j = a; j < e; ++j) row[j] = bp[j - a];
                        } else {
                          std::fill(row + a, row + e, T(0));
                        }
                      });
}

/// The cache entry of tile pair (qb, kb) of sequence b (inserted when new; a full cache is
/// emptied first through `flush`, which the backward uses to scatter pending dS sums).
template <class T, class Flush>
typename MaskCache<T>::Entry& mask_entry(MaskCache<T>& c, const WindowMask& m, index_t b,
                                         const Box& qb, const Box& kb, index_t qm, index_t kn,
                                         index_t H, const Flush& flush, index_t align = 8) {
  tile_signature(m, qb, kb, c.sig);
  for (auto& e : c.entries)
    if (e.sig == c.sig) return e;
  if (c.entries.size() >= MaskCache<T>::kMaxEntries) {
    for (auto& e : c.entries) flush(e);
    c.entries.clear();
  }
  auto& e = c.entries.emplace_back();
  e.sig = c.sig;
  e.qm = qm;
  e.kn = kn;
  e.ld = round_up(kn, align);
  e.seq = b;
  e.qb = qb;
  e.kb = kb;
  e.tiles.resize(H * qm * e.ld);
  e.built.assign(H, 0);
  return e;
}

template <class T>
const T* mask_tile_of(typename MaskCache<T>::Entry& e, const WindowMask& m, const T* bias,
                      const index_t* R, index_t h) {
  T* t = e.tiles.data() + h * e.qm * e.ld;
  if (!e.built[h]) {
    build_mask_tile(m, e.qb, e.kb, bias, R, t, e.ld, e.qm);
    e.built[h] = 1;
  }
  return t;
}

/// window_mask_tile through a per-worker cache of dense mask + bias tiles keyed by the tile
/// pair's signature (MaskCache, as in the single-block path): partial tiles of sliding windows
/// repeat a few geometries across the grid, so the per-row window runs are walked once per
/// geometry (and head, with a bias) and each step only adds a cached [qm, kn16] tile.
template <class T, class Scratch>
void window_mask_tile_cached(const WindowMask& m, index_t b, const Box& qb, const Box& kb,
                             int state, const T* bias, const index_t* R, T* S, index_t qm,
                             index_t kn, index_t kn16, index_t h, index_t H, Scratch& s) {
  constexpr int W = VecTraits<T>::W;
  if (state != kTilePartial && !bias) {  // full tile: only the ragged columns
    for (index_t i = 0; i < qm; ++i) std::fill(S + i * BK + kn, S + i * BK + kn16, kNegInf<T>);
    return;
  }
  auto& e = mask_entry(s.cache, m, b, qb, kb, qm, kn, bias ? H : 1, [](auto&) {}, 16);
  const T* tile = mask_tile_of<T>(e, m, bias, R, bias ? h : 0);
  for (index_t i = 0; i < qm; ++i) {
    T* row = S + i * BK;
    const T* t = tile + i * e.ld;
    for (index_t j = 0; j < kn16; j += W) storev(row + j, add_mask<T>(loadv(row + j), loadv(t + j)));
  }
}

/// Scratch of the general (multi-tile) window loops: the tile step's scratch and the cache.
template <class T>
struct WinFwdScratch : FwdScratch<T> {
  MaskCache<T> cache;
  std::vector<const T*> rows;  // key row pointers of a tile (transpose_ptrs)
  std::vector<T> zeros;
};
template <class T>
struct WinBwdScratch : BwdScratch<T> {
  MaskCache<T> cache;
  std::vector<const T*> rows;
  std::vector<T> zeros;
};

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
constexpr index_t kQuerySlabTarget = 28;

template <class T>
void window_fwd_tile(const AttentionParams<T>& p, const WindowMask::Args& args,
                     const WindowExtras<T>& x, index_t h, index_t b, index_t qt,
                     WinFwdScratch<T>& s) {
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
      // K^T straight from the token rows (8x8 register transposes; no row gather).
      key_row_ptrs(p.k, hk, kbeg, ktok, kn, round_up(kn, 8), kpad ? kpad : s.zeros.data(),
                   s.zeros.data(), s.rows.data());
      transpose_ptrs(s.rows.data(), round_up(kn, 8), p.D, s.KTg.data(), BK);
      gather_rows<T>(ktok, kn, p.Dvp, [&](index_t j) { return p.v.at(hk, kbeg + j); }, vpad,
                     p.Dv, s.Vg.data(), p.Dvp);
      const int state = m.tile(qs, kb);
      fwd_step(p, s.Qg.data() + i0 * p.Dp, p.Dp, i0, qn, s.KTg.data(), BK, s.Vg.data(), p.Dvp,
               kn, s, [&](T* S, index_t kn_, index_t kn16) {
                 window_mask_tile_cached(m, b, qs, kb, state, bias, x.R, S, qn, kn_, kn16, h, p.H, s);
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

// ---------------------------------------------------------------------------------------
// Single-block windows: disjoint windows (Swin, blocked NA) of at most BQ tokens. A query tile
// is one whole window and its keys fit one key block, so a (window, head) pair is one pass
// (no online softmax), and the mask + bias of a tile, which depends only on the tile's
// geometry, is a cached dense tile added in the softmax pass.

/// True when every query tile of the window tilers is one whole window of at most BQ tokens
/// whose key union is one key block (disjoint windows; NA: stride == kernel on every axis).
inline bool single_block_windows(const WindowMask::Args& a) {
  if (!disjoint_windows(a)) return false;
  index_t n = 1;
  for (int ax = 0; ax < 3; ++ax) {
    if (a.q_tile[ax] < a.window[ax]) return false;
    n *= a.window[ax];
  }
  return n <= BQ;
}

/// C block [MR, NV * W] of A * B handed to epi(acc) instead of being stored: the single-block
/// kernels fuse the softmax / gradient elementwise work into the GEMM epilogues (no extra pass
/// over the logits tile). A is addressed as a[i * a_rs + p * a_cs], B row-major (ldb).
template <int MR, int NV, class T, class Epi>
inline __attribute__((always_inline)) void ukernel(index_t k, const T* a, index_t a_rs,
                                                   index_t a_cs, const T* b, index_t ldb,
                                                   const Epi& epi) {
  constexpr int W = VecTraits<T>::W;
  vec_t<T> acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[i][v] = vec_t<T>{};
  index_t p = 0;
  if constexpr (NV == 1) {
    // One vector wide: MR <= 6 accumulator chains cannot hide the FMA latency; a second set
    // for odd p doubles them.
    vec_t<T> acc2[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc2[i] = vec_t<T>{};
    for (; p + 2 <= k; p += 2) {
      const vec_t<T> b0 = loadv(b + p * ldb), b1 = loadv(b + (p + 1) * ldb);
      const T* ap = a + p * a_cs;
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        acc[i][0] += ap[i * a_rs] * b0;
        acc2[i] += ap[i * a_rs + a_cs] * b1;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) acc[i][0] += acc2[i];
  }
  for (; p < k; ++p) {
    vec_t<T> bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = loadv(b + p * ldb + v * W);
    const T* ap = a + p * a_cs;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T sc = ap[i * a_rs];
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] += sc * bv[v];
    }
  }
  epi(acc);
}

/// Calls f(i0, std::integral_constant<int, MR>) over row blocks covering [0, m): blocks of 6
/// (12 accumulators + 2 B vectors + 1 broadcast), the rest as blocks of 3 to 5 rows rather
/// than a lone row (a 1-row block is bound by the FMA latency: it costs about as much as a
/// full one), e.g. 49 = 7 x 6 + 4 + 3.
template <class F>
inline __attribute__((always_inline)) void row_blocks(index_t m, const F& f) {
  using I6 = std::integral_constant<int, 6>;
  using I5 = std::integral_constant<int, 5>;
  using I4 = std::integral_constant<int, 4>;
  using I3 = std::integral_constant<int, 3>;
  using I2 = std::integral_constant<int, 2>;
  using I1 = std::integral_constant<int, 1>;
  index_t full = m / 6;
  if (m % 6 == 1 && full > 0) --full;
  index_t i = 0;
  for (; full > 0; --full, i += 6) f(i, I6{});
  switch (m - i) {
    case 7: f(i, I4{}); f(i + 4, I3{}); break;
    case 5: f(i, I5{}); break;
    case 4: f(i, I4{}); break;
    case 3: f(i, I3{}); break;
    case 2: f(i, I2{}); break;
    case 1: f(i, I1{}); break;
    default: break;
  }
}

/// Column blocks of a row block: f(j, std::integral_constant<int, NV>) over [0, n), n a
/// multiple of W: pairs of vectors, and one single vector at the end when n / W is odd.
template <class T, class F>
inline __attribute__((always_inline)) void col_blocks(index_t n, const F& f) {
  constexpr int W = VecTraits<T>::W;
  index_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) f(j, std::integral_constant<int, 2>{});
  if (j < n) f(j, std::integral_constant<int, 1>{});
}

/// log2 of 8 positive normal floats (|error| < 1e-7 for x in [1, 2^20]; the forward's row sums
/// lie in [1, keys]): one vector for a row block's LSEs instead of a libm call per row.
inline vec_t<float> log2v_pos(vec_t<float> x) {
  typedef int32_t v8i __attribute__((vector_size(32)));
  v8i xi;
  std::memcpy(&xi, &x, sizeof(xi));
  const v8i e = (xi - 0x3f3504f3) >> 23;  // exponent of x / sqrt(1/2): m in [sqrt(1/2), sqrt(2))
  const v8i mi = xi - (e << 23);
  vec_t<float> m;
  std::memcpy(&m, &mi, sizeof(m));
  const vec_t<float> t = (m - 1.f) / (m + 1.f), t2 = t * t;  // ln m = 2 atanh(t)
  vec_t<float> q = splatv(2.f / 9.f);
  q = q * t2 + 2.f / 7.f;
  q = q * t2 + 2.f / 5.f;
  q = q * t2 + 2.f / 3.f;
  q = q * t2 + 2.f;
  return __builtin_convertvector(e, vec_t<float>) + (q * t) * float(kLog2ed);
}

/// log2(l[i]) for i < MR (l[i] > 0; 0 where l[i] == 0).
template <int MR, class T>
inline void log2_rows(const T* l, T* out) {
  static_assert(MR <= 8, "one vector");
  if constexpr (std::is_same_v<T, float>) {
    vec_t<float> v = splatv(1.f);
    for (int i = 0; i < MR; ++i) v[i] = l[i] > 0 ? l[i] : 1.f;
    v = log2v_pos(v);
    for (int i = 0; i < MR; ++i) out[i] = v[i];
  } else {
    for (int i = 0; i < MR; ++i) out[i] = l[i] > 0 ? std::log2(l[i]) : T(0);
  }
}

/// row[c, c + W) = y, clipped to the row's n columns (feature dims padded to 16 in the
/// kernels, not in the results).
template <class T>
inline void store_cols(T* row, index_t c, index_t n, vec_t<T> y) {
  if (c + VecTraits<T>::W <= n) {
    storev(row + c, y);
  } else {
    for (index_t u = 0; c + u < n; ++u) row[c + u] = y[u];
  }
}
/// row[c, c + W) += y, clipped to n columns.
template <class T>
inline void add_cols(T* row, index_t c, index_t n, vec_t<T> y) {
  for (index_t u = 0; u < VecTraits<T>::W && c + u < n; ++u) row[c + u] += y[u];
}

/// Software prefetches of the next window's rows, issued a few at a time between micro-kernel
/// calls so that they overlap the arithmetic (a burst of them fills the miss buffers and
/// stalls about as long as the misses it saves). The queue is a list of row sets (rows of
/// `bytes` at base + (off + tok[i]) * stride for the tokens tok[i] >= 0), walked by a cursor:
/// queuing a window costs a few descriptors, not one entry per cache line.
struct Prefetcher {
  struct Rows {
    const char* base;
    index_t stride, off, bytes;
    const index_t* tok;
    index_t n;
    bool write;
  };
  static constexpr int kMaxRows = 64;
  Rows rows[kMaxRows];
  int nrows = 0, r = 0;  // cursor: row set r, token i
  index_t i = 0;
  size_t total = 0;  // rows queued
  void clear() {
    nrows = r = 0;
    i = 0;
    total = 0;
  }
  template <class T>
  void add(const T* base, index_t stride, index_t off, const index_t* tok, index_t n, index_t len,
           bool write = false) {
    if (nrows == kMaxRows || n <= 0 || len <= 0) return;
    rows[nrows++] = {reinterpret_cast<const char*>(base), stride * index_t(sizeof(T)), off,
                     len * index_t(sizeof(T)), tok, n, write};
    total += size_t(n);
  }
  /// Issues the prefetches of the next n rows (every cache line of each).
  void issue(size_t n) {
    while (n > 0 && r < nrows) {
      const Rows& q = rows[r];
      const index_t end = imin(q.n, i + index_t(n));
      n -= size_t(end - i);
      for (; i < end; ++i) {
        if (q.tok[i] < 0) continue;
        const uintptr_t a = reinterpret_cast<uintptr_t>(q.base + (q.off + q.tok[i]) * q.stride);
        const uintptr_t e = a + uintptr_t(q.bytes);
        if (q.write)
          for (uintptr_t l = a & ~uintptr_t(63); l < e; l += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(l), 1, 3);
        else
          for (uintptr_t l = a & ~uintptr_t(63); l < e; l += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(l), 0, 3);
      }
      if (i == q.n) {
        ++r;
        i = 0;
      }
    }
  }
  /// Per-call share (rows) when the queue is spread over `calls` issue points.
  size_t share(index_t calls) const { return (total + calls - 1) / imax(1, calls); }
};

template <class T>
struct SingleFwdScratch {
  std::vector<T> S, O, Qg, KT, Vg, l, mx, zeros;
  std::vector<index_t> qtok, ktok;
  std::vector<const T*> rows;
  std::vector<index_t> ntok, nktok;  // tokens of the next window (prefetch)
  Prefetcher pf;
  MaskCache<T> cache;
};

template <class T>
SingleFwdScratch<T> single_fwd_scratch(const AttentionParams<T>& p) {
  SingleFwdScratch<T> s;
  s.S.resize(BQ * BK);
  s.O.resize(BQ * p.Dvp);
  s.Qg.resize(BQ * p.Dp);
  s.KT.assign(p.Dp * BK, T(0));
  s.Vg.resize(BK * p.Dvp);
  s.l.resize(BQ);
  s.mx.resize(BQ);
  s.zeros.assign(imax(p.Dp, p.Dvp), T(0));
  s.qtok.resize(BQ);
  s.ktok.resize(BK);
  s.rows.resize(BK);
  s.ntok.resize(BQ);
  s.nktok.resize(BK);
  return s;
}

/// Tokens of window nq of sequence nb (queries, and keys with -1 for padding): what the
/// single-block kernels prefetch for the next window.
inline void window_tokens(const WindowMask::Args& args, index_t nb, index_t nq, index_t* ntok,
                          index_t* nktok, index_t& qm, index_t& kn) {
  const WindowMask m = WindowMask::make(args, nb);
  const Box qb = m.query_tile(nq);
  qm = box_tokens(m, qb, ntok);
  kn = box_tokens(m, m.key_union(qb), nktok);
}

/// One window (query tile qt of sequence b), every head.
template <class T>
void single_fwd_tile(const AttentionParams<T>& p, const WindowMask::Args& args,
                     const WindowExtras<T>& x, index_t b, index_t qt, index_t nb, index_t nq,
                     SingleFwdScratch<T>& s) {
  constexpr int W = VecTraits<T>::W;
  s.pf.clear();
  if (nb >= 0) {  // the next window's output rows (written) and q / k / v rows (all heads)
    index_t nqm, nkn;
    const index_t *nt = s.ntok.data(), *nk = s.nktok.data();
    window_tokens(args, nb, nq, s.ntok.data(), s.nktok.data(), nqm, nkn);
    const index_t q0 = p.cu_q[nb], k0 = p.cu_k[nb];
    s.pf.add(p.o, p.H * p.Dv, q0, nt, nqm, p.H * p.Dv, true);
    for (index_t h = 0; h < p.H; ++h) {  // in the order the next window reads them
      s.pf.add(p.q.at(h, 0), p.q.row_stride, q0, nt, nqm, p.D);
      if (h % (p.H / p.Hkv) != 0) continue;
      const index_t hk = h / (p.H / p.Hkv);
      s.pf.add(p.k.at(hk, 0), p.k.row_stride, k0, nk, nkn, p.D);
      s.pf.add(p.v.at(hk, 0), p.v.row_stride, k0, nk, nkn, p.Dv);
    }
  }
  const index_t qbeg = p.cu_q[b], kbeg = p.cu_k[b];
  const WindowMask m = WindowMask::make(args, b);
  const Box qb = m.query_tile(qt), kb = m.key_union(qb);
  index_t *qtok = s.qtok.data(), *ktok = s.ktok.data();
  const index_t qm = box_tokens(m, qb, qtok), kn = box_tokens(m, kb, ktok);
  auto& e = mask_entry(s.cache, m, b, qb, kb, qm, kn, p.H, [](auto&) {});
  const index_t ld = e.ld;
  const T c2 = p.scale * T(kLog2ed);
  const index_t Rn = x.R[0] * x.R[1] * x.R[2];
  const size_t kPrefetchPerCall = s.pf.share(48 * p.H);  // ~6 micro-kernel calls per row block
  for (index_t h = 0; h < p.H; ++h) {
    const index_t hk = h / (p.H / p.Hkv);
    for (index_t i = 0; i < qm; ++i) copy_short(s.Qg.data() + i * p.Dp, p.q.at(h, qbeg + qtok[i]), p.D);
    const T* kpad = x.k_pad ? x.k_pad + hk * p.D : s.zeros.data();
    key_row_ptrs(p.k, hk, kbeg, ktok, kn, ld, kpad, s.zeros.data(), s.rows.data());
    transpose_ptrs(s.rows.data(), ld, p.D, s.KT.data(), ld);
    const T* vpad = x.v_pad ? x.v_pad + hk * p.Dv : nullptr;
    gather_rows<T>(ktok, kn, p.Dvp, [&](index_t j) { return p.v.at(hk, kbeg + j); }, vpad, p.Dv,
                   s.Vg.data(), p.Dvp);
    T* S = s.S.data();
    const T* tile = mask_tile_of<T>(e, m, x.bias ? x.bias + h * Rn : nullptr, x.R, h);
    // Per row block: S = c2 Q K^T + tile with the row maxima (GEMM epilogue), P = exp2(S -
    // max) and row sums while the rows are in L1, then O = P V normalised into the output.
    row_blocks(qm, [&](index_t i0, auto mr) {
      constexpr int MR = decltype(mr)::value;
      vec_t<T> mxv[MR];
      for (int i = 0; i < MR; ++i) mxv[i] = splatv(kNegInf<T>);
      col_blocks<T>(ld, [&](index_t j, auto nv) {
        constexpr int NV = decltype(nv)::value;
        s.pf.issue(kPrefetchPerCall);
        ukernel<MR, NV>(p.D, s.Qg.data() + i0 * p.Dp, p.Dp, 1, s.KT.data() + j, ld,
                        [&](vec_t<T>(&acc)[MR][NV]) {
#pragma GCC unroll 8
                          for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
                            for (int v = 0; v < NV; ++v) {
                              const index_t o = (i0 + i) * ld + j + v * W;
                              const vec_t<T> y = add_mask<T>(acc[i][v] * c2, loadv(tile + o));
                              storev(S + o, y);
                              mxv[i] = vmax<T>(mxv[i], y);
                            }
                        });
      });
      T mx[MR], l[MR];
      for (int i = 0; i < MR; ++i) {
        mx[i] = hmax<T>(mxv[i]);
        const T m0 = mx[i] == kNegInf<T> ? T(0) : mx[i];
        T* r0 = S + (i0 + i) * ld;
        vec_t<T> s0{};
        for (index_t j = 0; j < ld; j += W) {
          const vec_t<T> e0 = exp2v_nonpos(loadv(r0 + j) - m0);
          storev(r0 + j, e0);
          s0 += e0;
        }
        l[i] = hsum<T>(s0);
        // A row without a visible key is all -inf: exp2 gives exact zeros (P = 0, l = 0).
      }
      T inv[MR], lg[MR];
      T* orow[MR];
      log2_rows<MR>(l, lg);
      for (int i = 0; i < MR; ++i) {
        const index_t t = qbeg + qtok[i0 + i];
        orow[i] = p.o + (t * p.H + h) * p.Dv;
        inv[i] = l[i] == 0 ? T(0) : T(1) / l[i];  // no visible key: output 0, LSE -inf
        p.lse[t * p.H + h] = l[i] == 0 ? kNegInf<T> : (mx[i] + lg[i]) * T(kLn2d);
      }
      col_blocks<T>(p.Dvp, [&](index_t j, auto nv) {
        constexpr int NV = decltype(nv)::value;
        s.pf.issue(kPrefetchPerCall);
        ukernel<MR, NV>(kn, S + i0 * ld, ld, 1, s.Vg.data() + j, p.Dvp,
                        [&](vec_t<T>(&acc)[MR][NV]) {
#pragma GCC unroll 8
                          for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
                            for (int v = 0; v < NV; ++v) {
                              const index_t c = j + v * W;
                              // l = 0 (no visible key): exact zeros even for inf / NaN in V
                              const vec_t<T> y = l[i] == 0 ? vec_t<T>{} : acc[i][v] * inv[i];
                              if (c + W <= p.Dv) {
                                storev(orow[i] + c, y);
                              } else {
                                for (index_t u = 0; c + u < p.Dv; ++u) orow[i][c + u] = y[u];
                              }
                            }
                        });
      });
    });
  }
}

/// Like for_each_item, but each worker claims its next item before running the current one:
/// work(it, next, s) with next = -1 past the end, so that an item can prefetch what the next
/// one reads.
template <class Scratch, class Work>
void for_each_item_ahead(const ParallelRunner& r, index_t n, const Scratch& proto,
                         const Work& work) {
  std::atomic<index_t> next{0};
  const index_t workers = imax(1, imin(r.num_threads, n));
  r.run(workers, [&](index_t) {
    Scratch s = proto;
    index_t it = next.fetch_add(1);
    while (it < n) {
      const index_t nx = next.fetch_add(1);
      work(it, nx < n ? nx : -1, s);
      it = nx;
    }
  });
}

template <class T>
void window_fwd(const AttentionParams<T>& p, const WindowMask::Args& args,
                const WindowExtras<T>& x, const ParallelRunner& r) {
  if (single_block_windows(args)) {
    std::vector<index_t> tile_start(p.B + 1, 0);
    for (index_t b = 0; b < p.B; ++b)
      tile_start[b + 1] = tile_start[b] + WindowMask::make(args, b).num_query_tiles();
    const SingleFwdScratch<T> proto = single_fwd_scratch(p);
    auto seq_of = [&](index_t t) {
      index_t b = 0;
      while (tile_start[b + 1] <= t) ++b;
      return b;
    };
    for_each_item_ahead(r, tile_start[p.B], proto,
                        [&](index_t t, index_t nt, SingleFwdScratch<T>& s) {
                          const index_t b = seq_of(t), nb = nt >= 0 ? seq_of(nt) : -1;
                          single_fwd_tile(p, args, x, b, t - tile_start[b], nb,
                                          nt >= 0 ? nt - tile_start[nb] : -1, s);
                        });
    return;
  }
  std::vector<index_t> tile_start(p.B + 1, 0);
  for (index_t b = 0; b < p.B; ++b)
    tile_start[b + 1] = tile_start[b] + WindowMask::make(args, b).num_query_tiles();
  const index_t tiles = tile_start[p.B];
  const WinFwdScratch<T> proto{fwd_scratch(p, true), {}, std::vector<const T*>(BK),
                                 std::vector<T>(imax(p.Dp, p.Dvp), T(0))};
  // An item is one query tile for all heads (see prefetch_box).
  for_each_item(r, tiles, proto, [&](index_t t, WinFwdScratch<T>& s) {
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
                     WinBwdScratch<T>& s) {
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
  // Token-major results (p.grads_token_major): dQ rows of head h are accumulated, scaled, into
  // the caller's [Tq, H, D] output (zeroed here: the item owns them), dK / dV rows stored.
  const bool tok = p.grads_token_major;
  const index_t lddq = tok ? p.H * p.D : p.Dp;
  T* dQ = tok ? p.dq + qbeg * lddq + h * p.D : p.dq + ((chunk * p.H + h) * p.Tq + qbeg) * p.Dp;
  T *dK = s.dK.data(), *dV = s.dV.data(), *lse2 = s.lse.data(), *delta = s.delta.data();
  index_t *qtok = s.qtok.data(), *ktok = s.ktok.data();
  auto dk_row = [&](index_t t) {  // t: sequence-local key token
    return tok ? p.dk + ((kbeg + t) * p.H + h) * p.D : p.dk + (h * p.Tk + kbeg + t) * p.Dp;
  };
  auto dv_row = [&](index_t t) {
    return tok ? p.dv + ((kbeg + t) * p.H + h) * p.Dv : p.dv + (h * p.Tk + kbeg + t) * p.Dvp;
  };
  if (tok)
    for (index_t i = 0, n = p.cu_q[b + 1] - qbeg; i < n; ++i)
      std::fill(dQ + i * lddq, dQ + i * lddq + p.D, T(0));

  for (index_t kt = kt_begin; kt < kt_end; ++kt) {
    const Box kb = m.key_tile(kt);
    Box qu;
    if (!m.query_union(kb, qu)) {  // keys nobody sees: zero gradients
      if (tok) {
        const index_t kn = box_tokens(m, kb, ktok);
        for (index_t c = 0; c < kn; ++c) {
          if (ktok[c] < 0) continue;
          std::fill(dk_row(ktok[c]), dk_row(ktok[c]) + p.D, T(0));
          std::fill(dv_row(ktok[c]), dv_row(ktok[c]) + p.Dv, T(0));
        }
      }
      continue;
    }
    const index_t kn = box_tokens(m, kb, ktok);
    gather_rows<T>(ktok, kn, p.Dp, [&](index_t j) { return p.k.at(hk, kbeg + j); }, kpad, p.D,
                   s.Kg.data(), p.Dp);
    // K^T from the gathered rows and V^T straight from the token rows (8x8 register
    // transposes; V itself is not needed row-major here).
    const index_t kn8 = round_up(kn, 8);
    for (index_t j = 0; j < kn8; ++j) s.rows[j] = j < kn ? s.Kg.data() + j * p.Dp : s.zeros.data();
    transpose_ptrs(s.rows.data(), kn8, p.D, s.KTg.data(), BK);
    key_row_ptrs(p.v, hk, kbeg, ktok, kn, kn8, vpad ? vpad : s.zeros.data(), s.zeros.data(),
                 s.rows.data());
    transpose_ptrs(s.rows.data(), kn8, p.Dv, s.VTg.data(), BK);
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
              window_mask_tile_cached(m, b, qb, kc, state, bias, x.R, S, qm, kn_, kn16, h, p.H, s);
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
          T* dst = dQ + qtok[i] * lddq;
          const T* src = s.dQg.data() + i * p.Dp;
          if (tok)
            for (index_t c = 0; c < p.D; ++c) dst[c] += src[c] * p.scale;
          else
            for (index_t c = 0; c < p.D; ++c) dst[c] += src[c];
        }
      }
    }
    for (index_t c = 0; c < kn; ++c) {
      const T* dk = dK + c * p.Dp;
      const T* dv = dV + c * p.Dvp;
      if (ktok[c] >= 0) {
        T* dKo = dk_row(ktok[c]);
        T* dVo = dv_row(ktok[c]);
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
  const WinBwdScratch<T> proto{bwd_scratch(p, true), {}, std::vector<const T*>(BK),
                                 std::vector<T>(imax(p.Dp, p.Dvp), T(0))};
  const index_t per_head = p.B * p.n_kv_chunks;
  for_each_item(r, p.H * per_head, proto, [&](index_t it, WinBwdScratch<T>& s) {
    const index_t h = it / per_head, rest = it % per_head;
    window_bwd_item(p, args, x, h, rest / p.n_kv_chunks, rest % p.n_kv_chunks, it, s);
  });
}

// ---------------------------------------------------------------------------------------
// Backward of single-block windows that partition the key grid (Swin; blocked NA whose axes
// are multiples of the kernel): every query and every key belongs to exactly one window, so
// dQ, dK and dV rows are written once, straight into token-major [T, H, C] results (scaled,
// no zero fill, no per-chunk dQ partials, no layout pass afterwards), and Delta = rowsum(dO *
// O) - dLSE is computed from the gathered rows. Work items are fixed runs of windows (for
// every head), each with its own partial bias / padding gradients: deterministic.
//
// Operands: p.q, p.k, p.v, p.dout token views (any row stride, unpadded), p.o the forward
// output [Tq, H, Dv] (read), p.lse_in [Tq, H], p.delta dLSE [Tq, H] or null; results p.dq
// [Tq, H, D], p.dk [Tk, H, D] and p.dv [Tk, H, Dv] per query head; x.dbias [chunks, H, Rn],
// x.dk_pad [chunks, H, D], x.dv_pad [chunks, H, Dv] (zeroed by the caller).

template <class T>
struct SingleBwdScratch {
  std::vector<T> S, dP, Qg, dOg, Kg, KT, VT, dQg, dKg, dVg, lse2, delta, zeros;
  std::vector<index_t> qtok, ktok, ntok, nktok;
  std::vector<const T*> rows;
  Prefetcher pf;
  MaskCache<T> cache;
};

template <class T>
SingleBwdScratch<T> single_bwd_scratch(const AttentionParams<T>& p) {
  SingleBwdScratch<T> s;
  s.S.resize(BQ * BK);
  s.dP.resize(BQ * BK);
  s.Qg.assign(BQ * p.Dp, T(0));
  s.dOg.assign(BQ * p.Dvp, T(0));
  s.Kg.assign(BK * p.Dp, T(0));
  s.KT.assign(p.Dp * BK, T(0));
  s.VT.assign(p.Dvp * BK, T(0));
  s.dQg.resize(BQ * p.Dp);
  s.dKg.resize(BK * p.Dp);
  s.dVg.resize(BK * p.Dvp);
  s.lse2.resize(BQ);
  s.delta.resize(BQ);
  s.zeros.assign(imax(p.Dp, p.Dvp), T(0));
  s.qtok.resize(BQ);
  s.ktok.resize(BK);
  s.rows.resize(BK);
  s.ntok.resize(BQ);
  s.nktok.resize(BK);
  return s;
}

/// Scatters an entry's pending dS sums (per head) into the chunk's partial bias gradient.
template <class T>
void flush_dsum(const WindowMask::Args& args, typename MaskCache<T>::Entry& e, const index_t* R,
                T* dbias, index_t H) {
  if (e.dsum_used.empty()) return;
  const WindowMask m = WindowMask::make(args, e.seq);
  const index_t Rn = R[0] * R[1] * R[2];
  for (index_t h = 0; h < H; ++h) {
    if (!e.dsum_used[h]) continue;
    const T* d = e.dsum.data() + h * e.qm * e.ld;
    T* gb = dbias + h * Rn;
    for_each_window_run(m, e.qb, e.kb,
                        [&](index_t i, const index_t* xq, index_t col, index_t a, index_t en,
                            index_t c0, index_t c1) {
                          if (en <= a) return;
                          T* g = gb + bias_index(m, R, xq, c0, c1, e.kb.lo[2] + a);
                          const T* dr = d + i * e.ld + col;
                          for (index_t j = a; j < en; ++j) g[j - a] += dr[j];
                        });
    e.dsum_used[h] = 0;
    std::fill(e.dsum.begin() + h * e.qm * e.ld, e.dsum.begin() + (h + 1) * e.qm * e.ld, T(0));
  }
}

template <class T>
void single_bwd_tile(const AttentionParams<T>& p, const WindowMask::Args& args,
                     const WindowExtras<T>& x, index_t b, index_t qt, index_t nb, index_t nq,
                     index_t chunk, SingleBwdScratch<T>& s) {
  constexpr int W = VecTraits<T>::W;
  s.pf.clear();
  if (nb >= 0) {  // the next window's rows, in the order it reads and writes them
    index_t nqm, nkn;
    const index_t *nt = s.ntok.data(), *nk = s.nktok.data();
    window_tokens(args, nb, nq, s.ntok.data(), s.nktok.data(), nqm, nkn);
    const index_t q0 = p.cu_q[nb], k0 = p.cu_k[nb];
    s.pf.add(p.o, p.H * p.Dv, q0, nt, nqm, p.H * p.Dv);
    for (index_t h = 0; h < p.H; ++h) {
      s.pf.add(p.q.at(h, 0), p.q.row_stride, q0, nt, nqm, p.D);
      s.pf.add(p.dout.at(h, 0), p.dout.row_stride, q0, nt, nqm, p.Dv);
      if (h % (p.H / p.Hkv) != 0) continue;
      const index_t hk = h / (p.H / p.Hkv);
      s.pf.add(p.k.at(hk, 0), p.k.row_stride, k0, nk, nkn, p.D);
      s.pf.add(p.v.at(hk, 0), p.v.row_stride, k0, nk, nkn, p.Dv);
    }
    s.pf.add(p.dq, p.H * p.D, q0, nt, nqm, p.H * p.D, true);
    s.pf.add(p.dk, p.H * p.D, k0, nk, nkn, p.H * p.D, true);
    s.pf.add(p.dv, p.H * p.Dv, k0, nk, nkn, p.H * p.Dv, true);
  }
  const size_t per_call = s.pf.share(120 * p.H);  // ~13 micro-kernel calls per row block
  const index_t qbeg = p.cu_q[b], kbeg = p.cu_k[b];
  const WindowMask m = WindowMask::make(args, b);
  const Box qb = m.query_tile(qt), kb = m.key_union(qb);
  index_t *qtok = s.qtok.data(), *ktok = s.ktok.data();
  const index_t qm = box_tokens(m, qb, qtok), kn = box_tokens(m, kb, ktok);
  const index_t Rn = x.R[0] * x.R[1] * x.R[2];
  T* dbias = x.dbias ? x.dbias + chunk * p.H * Rn : nullptr;
  auto& e = mask_entry(s.cache, m, b, qb, kb, qm, kn, p.H, [&](typename MaskCache<T>::Entry& f) {
    if (dbias) flush_dsum(args, f, x.R, dbias, p.H);
  });
  if (dbias && e.dsum_used.empty()) {
    e.dsum.assign(p.H * qm * e.ld, T(0));
    e.dsum_used.assign(p.H, 0);
  }
  const index_t ld = e.ld;
  const T c2 = p.scale * T(kLog2ed);
  T *S = s.S.data(), *dP = s.dP.data();
  for (index_t h = 0; h < p.H; ++h) {
    const index_t hk = h / (p.H / p.Hkv);
    for (index_t i = 0; i < qm; ++i) {
      const index_t t = qbeg + qtok[i];
      T* qd = s.Qg.data() + i * p.Dp;
      T* od = s.dOg.data() + i * p.Dvp;
      copy_short(qd, p.q.at(h, t), p.D);
      copy_short(od, p.dout.at(h, t), p.Dv);
      const T* orow = p.o + (t * p.H + h) * p.Dv;
      vec_t<T> dv{};  // rowsum(dO * O) in vectors (a scalar float sum does not vectorise)
      index_t c = 0;
      for (; c + W <= p.Dv; c += W) dv += loadv(od + c) * loadv(orow + c);
      T dlt = hsum<T>(dv);
      for (; c < p.Dv; ++c) dlt += od[c] * orow[c];
      s.delta[i] = dlt - (p.delta ? p.delta[t * p.H + h] : T(0));
      s.lse2[i] = lse_base2(p.lse_in[t * p.H + h]);
    }
    const T* kpad = x.k_pad ? x.k_pad + hk * p.D : s.zeros.data();
    for (index_t j = 0; j < kn; ++j) {
      copy_short(s.Kg.data() + j * p.Dp, ktok[j] >= 0 ? p.k.at(hk, kbeg + ktok[j]) : kpad, p.D);
      s.rows[j] = s.Kg.data() + j * p.Dp;
    }
    for (index_t j = kn; j < ld; ++j) s.rows[j] = s.zeros.data();
    transpose_ptrs(s.rows.data(), ld, p.D, s.KT.data(), ld);
    const T* vpad = x.v_pad ? x.v_pad + hk * p.Dv : s.zeros.data();
    key_row_ptrs(p.v, hk, kbeg, ktok, kn, ld, vpad, s.zeros.data(), s.rows.data());
    transpose_ptrs(s.rows.data(), ld, p.Dv, s.VT.data(), ld);

    const T* tile = mask_tile_of<T>(e, m, x.bias ? x.bias + h * Rn : nullptr, x.R, h);
    T* dsum = dbias ? e.dsum.data() + h * qm * ld : nullptr;
    if (dbias) e.dsum_used[h] = 1;
    // Per row block, in GEMM epilogues: P = exp2(c2 Q K^T + tile - lse2), dS = P (dO V^T -
    // Delta) (summed into the bias gradient), dQ = scale dS K written to the result rows.
    row_blocks(qm, [&](index_t i0, auto mr) {
      constexpr int MR = decltype(mr)::value;
      col_blocks<T>(ld, [&](index_t j, auto nv) {
        constexpr int NV = decltype(nv)::value;
        s.pf.issue(per_call);
        ukernel<MR, NV>(p.D, s.Qg.data() + i0 * p.Dp, p.Dp, 1, s.KT.data() + j, ld,
                        [&](vec_t<T>(&acc)[MR][NV]) {
#pragma GCC unroll 8
                          for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
                            for (int v = 0; v < NV; ++v) {
                              const index_t o = (i0 + i) * ld + j + v * W;
                              storev(S + o, exp2v_nonpos(acc[i][v] * c2 + loadv(tile + o) -
                                                         s.lse2[i0 + i]));
                            }
                        });
      });
      col_blocks<T>(ld, [&](index_t j, auto nv) {
        constexpr int NV = decltype(nv)::value;
        s.pf.issue(per_call);
        ukernel<MR, NV>(p.Dv, s.dOg.data() + i0 * p.Dvp, p.Dvp, 1, s.VT.data() + j, ld,
                        [&](vec_t<T>(&acc)[MR][NV]) {
#pragma GCC unroll 8
                          for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
                            for (int v = 0; v < NV; ++v) {
                              const index_t o = (i0 + i) * ld + j + v * W;
                              const vec_t<T> ds = loadv(S + o) * (acc[i][v] - s.delta[i0 + i]);
                              storev(dP + o, ds);
                              if (dsum) storev(dsum + o, loadv(dsum + o) + ds);
                            }
                        });
      });
      T* dq[MR];
      for (int i = 0; i < MR; ++i) dq[i] = p.dq + ((qbeg + qtok[i0 + i]) * p.H + h) * p.D;
      col_blocks<T>(p.Dp, [&](index_t j, auto nv) {
        constexpr int NV = decltype(nv)::value;
        s.pf.issue(per_call);
        ukernel<MR, NV>(kn, dP + i0 * ld, ld, 1, s.Kg.data() + j, p.Dp,
                        [&](vec_t<T>(&acc)[MR][NV]) {
#pragma GCC unroll 8
                          for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
                            for (int v = 0; v < NV; ++v)
                              store_cols(dq[i], j + v * W, p.D, acc[i][v] * p.scale);
                        });
      });
    });
    // dV = P^T dO and dK = scale dS^T Q per key row block, written to the result rows
    // (padding keys: summed into the pad gradients).
    T* dkpad = x.dk_pad ? x.dk_pad + (chunk * p.H + h) * p.D : nullptr;
    T* dvpad = x.dv_pad ? x.dv_pad + (chunk * p.H + h) * p.Dv : nullptr;
    row_blocks(kn, [&](index_t j0, auto mr) {
      constexpr int MR = decltype(mr)::value;
      T *dv[MR], *dk[MR];
      for (int i = 0; i < MR; ++i) {
        const index_t t = ktok[j0 + i];
        dv[i] = t >= 0 ? p.dv + ((kbeg + t) * p.H + h) * p.Dv : dvpad;
        dk[i] = t >= 0 ? p.dk + ((kbeg + t) * p.H + h) * p.D : dkpad;
      }
      col_blocks<T>(p.Dvp, [&](index_t c, auto nv) {
        constexpr int NV = decltype(nv)::value;
        s.pf.issue(per_call);
        ukernel<MR, NV>(qm, S + j0, 1, ld, s.dOg.data() + c, p.Dvp,
                        [&](vec_t<T>(&acc)[MR][NV]) {
#pragma GCC unroll 8
                          for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
                            for (int v = 0; v < NV; ++v) {
                              if (ktok[j0 + i] >= 0)
                                store_cols(dv[i], c + v * W, p.Dv, acc[i][v]);
                              else if (dv[i])
                                add_cols(dv[i], c + v * W, p.Dv, acc[i][v]);
                            }
                        });
      });
      col_blocks<T>(p.Dp, [&](index_t c, auto nv) {
        constexpr int NV = decltype(nv)::value;
        s.pf.issue(per_call);
        ukernel<MR, NV>(qm, dP + j0, 1, ld, s.Qg.data() + c, p.Dp,
                        [&](vec_t<T>(&acc)[MR][NV]) {
#pragma GCC unroll 8
                          for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
                            for (int v = 0; v < NV; ++v) {
                              if (ktok[j0 + i] >= 0)
                                store_cols(dk[i], c + v * W, p.D, acc[i][v] * p.scale);
                              else if (dk[i])
                                add_cols(dk[i], c + v * W, p.D, acc[i][v] * p.scale);
                            }
                        });
      });
    });
  }
}

template <class T>
void window_bwd_direct(const AttentionParams<T>& p, const WindowMask::Args& args,
                       const WindowExtras<T>& x, index_t n_chunks, const ParallelRunner& r) {
  std::vector<index_t> tile_start(p.B + 1, 0);
  for (index_t b = 0; b < p.B; ++b)
    tile_start[b + 1] = tile_start[b] + WindowMask::make(args, b).num_query_tiles();
  const index_t tiles = tile_start[p.B];
  const SingleBwdScratch<T> proto = single_bwd_scratch(p);
  for_each_item(r, n_chunks, proto, [&](index_t c, SingleBwdScratch<T>& s) {
    const index_t t0 = c * tiles / n_chunks, t1 = (c + 1) * tiles / n_chunks;
    auto seq_of = [&](index_t t) {
      index_t b = 0;
      while (tile_start[b + 1] <= t) ++b;
      return b;
    };
    for (index_t t = t0; t < t1; ++t) {
      const index_t b = seq_of(t), nb = t + 1 < t1 ? seq_of(t + 1) : -1;
      single_bwd_tile(p, args, x, b, t - tile_start[b], nb, nb >= 0 ? t + 1 - tile_start[nb] : -1,
                      c, s);
    }
    if (x.dbias) {
      T* dbias = x.dbias + c * p.H * x.R[0] * x.R[1] * x.R[2];
      for (auto& e : s.cache.entries) flush_dsum(args, e, x.R, dbias, p.H);
    }
    s.cache.entries.clear();  // the next item's sums start from zero
  });
}

}  // namespace attn_detail
}  // namespace tilefuse::cpu::TF_ISA_NS
