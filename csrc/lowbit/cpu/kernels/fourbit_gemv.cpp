// SPDX-License-Identifier: Apache-2.0
// Fused 4-bit GEMV for up to 8 activation rows (decode, the batch-1..8 case of LLM decoding):
// each weight row is streamed once, decoded into registers and multiplied with the (permuted)
// activation rows; nothing goes through memory. Three loops, one per activation layout
// (XLayout, chosen by x_layout() for prepare_x and here alike):
// - kChunk64 (nf4 / fp4 / e2m1, K % 64 == 0, block >= 64): 64 codes per step (decode64);
//   the 8 products per row are summed as a short tree (multiplies, then FMAs, then adds, so no
//   accumulator chain crosses steps) and folded into the total with one FMA by the block
//   scale. Each step is independent of the previous one except for that fold, which alternates
//   between two totals.
// - kInt4x64 / kInt4: 64 (K % 64 == 0, block >= 64) or 32 codes per step through the
//   shuffle-free int4 decoders, same tree and fold; the zero point becomes
//   -zero * scale * sum(x over the block), added once per row from block sums of x when blocks
//   do not span rows (vectorised over blocks), else per step from chunk sums.
// - kChunk32 (the table formats with block 32 or K % 64 != 0): decode32, unscaled partial sums
//   per block folded when the block ends.
// Software prefetch 1 KiB ahead (rows are consecutive, so it runs into the next rows).
#include "tilefuse/cpu/lowbit_decode.h"

namespace tilefuse::cpu::TF_ISA_NS {

#ifdef __AVX2__
namespace {

using namespace lowbit_detail;

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/// kChunk32 (table formats): out[m0 .. m0 + MR, n] for one weight row n (a block may start in
/// the previous row when K is not a multiple of the block: the block index is taken per
/// 32-chunk).
template <int MR, int NP>
void gemv_row(const Linear4bitParams& p, const Planes& t, index_t n, index_t m0, int lb) {
  const Fourbit& w = p.w;
  // Independent accumulator chains per activation row (FMA latency 4, two ports).
  constexpr int NA = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  const index_t f0 = n * w.K;
  const uint8_t* src = w.packed + (f0 >> 1);
  const float* xr[MR];
  __m256 tot[MR];
  for (int i = 0; i < MR; ++i) {
    xr[i] = p.xp + (m0 + i) * p.ldxp;
    tot[i] = _mm256_setzero_ps();
  }
  // Per block: unscaled partial sums acc, folded into tot with one FMA per accumulator when the
  // block ends (independent chains, no reduction on the critical path).
  __m256 acc[MR][NA], tsum[MR][NA];
  for (int i = 0; i < MR; ++i)
    for (int a = 0; a < NA; ++a) acc[i][a] = tsum[i][a] = _mm256_setzero_ps();
  index_t cur = f0 >> lb;
  for (index_t k = 0; k < w.K; k += 32) {
    const index_t b = (f0 + k) >> lb;
    if (b != cur) {
      const float s = w.scale(cur);
      const __m256 sv = _mm256_set1_ps(s * t.mult);
      for (int i = 0; i < MR; ++i) {
        for (int a = 0; a < NA; ++a) {
          tsum[i][a] = _mm256_fmadd_ps(acc[i][a], sv, tsum[i][a]);
          acc[i][a] = _mm256_setzero_ps();
        }
      }
      cur = b;
    }
    // Rows are consecutive in memory, so this also runs ahead into the next rows.
    if ((k & 127) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(src + (k >> 1)) + 1024, _MM_HINT_T0);
    const Decoded d = decode32<NP>(t, src + (k >> 1));
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j)
        acc[i][j % NA] =
            _mm256_fmadd_ps(d.f[j], _mm256_loadu_ps(xr[i] + k + 8 * j), acc[i][j % NA]);
  }
  {
    const float s = w.scale(cur);
    const __m256 sv = _mm256_set1_ps(s * t.mult);
    for (int i = 0; i < MR; ++i)
      for (int a = 0; a < NA; ++a) tsum[i][a] = _mm256_fmadd_ps(acc[i][a], sv, tsum[i][a]);
  }
  for (int i = 0; i < MR; ++i) {
    tot[i] = tsum[i][0];
    for (int a = 1; a < NA; ++a) tot[i] = _mm256_add_ps(tot[i], tsum[i][a]);
  }
  for (int i = 0; i < MR; ++i) {
    float v = hsum8(tot[i]);
    if (p.bias != nullptr) v += p.bias[n];
    p.out[(m0 + i) * w.N + n] = v;
  }
}

/// Sum of the NA accumulators (a short tree).
template <int NA>
TF_LOWBIT_INLINE __m256 tree_sum(const __m256* a) {
  if constexpr (NA == 1) return a[0];
  else if constexpr (NA == 2) return _mm256_add_ps(a[0], a[1]);
  else return _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
}

/// sum_j d[j] * x[8 j ..] for ND vectors as NA chains (multiply first, then FMAs) and a tree.
template <int ND, int NA>
TF_LOWBIT_INLINE __m256 dot_part(const __m256* d, const float* x) {
  __m256 acc[NA];
  for (int j = 0; j < ND; ++j) {
    const __m256 xv = _mm256_loadu_ps(x + 8 * j);
    if (j < NA) acc[j] = _mm256_mul_ps(d[j], xv);
    else acc[j % NA] = _mm256_fmadd_ps(d[j], xv, acc[j % NA]);
  }
  return tree_sum<NA>(acc);
}

template <int MR>
inline void store_rows(const Linear4bitParams& p, index_t n, index_t m0, const __m256 (*tot)[2],
                       const float* corr) {
  for (int i = 0; i < MR; ++i) {
    float v = hsum8(_mm256_add_ps(tot[i][0], tot[i][1])) + corr[i];
    if (p.bias != nullptr) v += p.bias[n];
    p.out[(m0 + i) * p.w.N + n] = v;
  }
}

/// Scale of block b: absmax[b], or the double-quantised form (kNested). A template parameter
/// rather than Fourbit::scale's run-time test: the test and the scalar load + broadcast it
/// forces cost 3 instructions in every 64-code step (~10 % of the int4 step).
template <bool kNested>
TF_LOWBIT_INLINE __m256 block_scale(const Fourbit& w, index_t b, float mult) {
  if constexpr (kNested) return _mm256_set1_ps(w.scale(b) * mult);
  else return _mm256_mul_ps(_mm256_broadcast_ss(w.absmax + b), _mm256_set1_ps(mult));
}

/// kChunk64: out[m0 .. m0 + MR, n] for the table formats.
template <int MR, int NP, bool kNested>
void gemv64_row(const Linear4bitParams& p, const Planes& t, index_t n, index_t m0, int lb) {
  const Fourbit& w = p.w;
  constexpr int NA = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  const index_t f0 = n * w.K;
  const uint8_t* src = w.packed + (f0 >> 1);
  const float* xr[MR];
  __m256 tot[MR][2];
  float corr[MR];
  for (int i = 0; i < MR; ++i) {
    xr[i] = p.xp + (m0 + i) * p.ldxp;
    tot[i][0] = tot[i][1] = _mm256_setzero_ps();
    corr[i] = 0.0f;
  }
  auto step = [&](index_t k, int h) __attribute__((always_inline)) {
    if ((k & 127) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(src + (k >> 1)) + 1024, _MM_HINT_T0);
    __m256 d[8];
    decode64<NP>(t, src + (k >> 1), d);
    const __m256 sv = block_scale<kNested>(w, (f0 + k) >> lb, t.mult);
    for (int i = 0; i < MR; ++i)
      tot[i][h] = _mm256_fmadd_ps(dot_part<8, NA>(d, xr[i] + k), sv, tot[i][h]);
  };
  index_t k = 0;
  for (; k + 128 <= w.K; k += 128) {
    step(k, 0);
    step(k + 64, 1);
  }
  if (k < w.K) step(k, 0);
  store_rows<MR>(p, n, m0, tot, corr);
}

/// kInt4 (C64 = false) / kInt4x64 (C64 = true): out[m0 .. m0 + MR, n]. kAligned:
/// K % block == 0 (no block spans rows), so the prepared row holds block sums of x instead of
/// chunk sums (see linear_4bit_prepare_x).
template <int MR, bool kAligned, bool C64, bool kNested>
void gemv_int4_row(const Linear4bitParams& p, index_t n, index_t m0, int lb) {
  const Fourbit& w = p.w;
  constexpr int NA = C64 ? (MR == 1 ? 4 : (MR == 2 ? 2 : 1)) : (MR == 1 ? 2 : 1);
  constexpr index_t S = C64 ? 64 : 32;  // codes per step
  const index_t f0 = n * w.K;
  const uint8_t* src = w.packed + (f0 >> 1);
  const float* xr[MR];
  __m256 tot[MR][2];
  float corr[MR];
  for (int i = 0; i < MR; ++i) {
    xr[i] = p.xp + (m0 + i) * p.ldxp;
    tot[i][0] = tot[i][1] = _mm256_setzero_ps();
    corr[i] = 0.0f;
  }
  auto step = [&](index_t k, int h) __attribute__((always_inline)) {
    if ((k & 127) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(src + (k >> 1)) + 1024, _MM_HINT_T0);
    __m256 d[S / 8];
    if constexpr (C64) {
      decode64_int4(src + (k >> 1), d);
    } else {
      const Decoded d32 = decode32_int4(src + (k >> 1));
      for (int j = 0; j < 4; ++j) d[j] = d32.f[j];
    }
    const index_t b = (f0 + k) >> lb;
    const __m256 sv = block_scale<kNested>(w, b, 1.0f);
    for (int i = 0; i < MR; ++i) {
      tot[i][h] = _mm256_fmadd_ps(dot_part<S / 8, NA>(d, xr[i] + k), sv, tot[i][h]);
      if constexpr (!kAligned) {
        // Only the 32-code steps reach here unaligned (C64 needs K % 64 == 0, block >= 64,
        // so its steps are in one block; the chunk sums are then per 32).
        float xs = xr[i][p.Kp + (k >> 5)];
        if constexpr (C64) xs += xr[i][p.Kp + (k >> 5) + 1];
        corr[i] -= static_cast<float>(w.zero[b]) * w.scale(b) * xs;
      }
    }
  };
  index_t k = 0;
  for (; k + 2 * S <= w.K; k += 2 * S) {
    step(k, 0);
    step(k + S, 1);
  }
  if (k < w.K) step(k, 0);
  if constexpr (kAligned) {
    // -sum_b zero[b] * scale[b] * xsum[b] over the row's blocks.
    const index_t nb = w.K >> lb, b0 = f0 >> lb;
    index_t i0 = 0;
    if constexpr (!kNested) {
      __m256 c[MR];
      for (int i = 0; i < MR; ++i) c[i] = _mm256_setzero_ps();
      for (; i0 + 8 <= nb; i0 += 8) {
        const __m256 zs = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.zero + b0 + i0)))),
            _mm256_loadu_ps(w.absmax + b0 + i0));
        for (int i = 0; i < MR; ++i)
          c[i] = _mm256_fmadd_ps(zs, _mm256_loadu_ps(xr[i] + p.Kp + i0), c[i]);
      }
      for (int i = 0; i < MR; ++i) corr[i] -= hsum8(c[i]);
    }
    for (; i0 < nb; ++i0) {
      const float zs = static_cast<float>(w.zero[b0 + i0]) * w.scale(b0 + i0);
      for (int i = 0; i < MR; ++i) corr[i] -= zs * xr[i][p.Kp + i0];
    }
  }
  store_rows<MR>(p, n, m0, tot, corr);
}

template <int NP>
void gemv_rows(const Linear4bitParams& p, const Planes& t, index_t n_begin, index_t n_end, int lb) {
  for (index_t n = n_begin; n < n_end; ++n) {
    // More than 4 rows: the weight row (K / 2 bytes) stays in L1 for the second group.
    for (index_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (imin(4, p.M - m0)) {
        case 1: gemv_row<1, NP>(p, t, n, m0, lb); break;
        case 2: gemv_row<2, NP>(p, t, n, m0, lb); break;
        case 3: gemv_row<3, NP>(p, t, n, m0, lb); break;
        default: gemv_row<4, NP>(p, t, n, m0, lb); break;
      }
    }
  }
}

template <int NP, bool kNested>
void gemv64_rows_t(const Linear4bitParams& p, const Planes& t, index_t n_begin, index_t n_end,
                   int lb) {
  for (index_t n = n_begin; n < n_end; ++n) {
    for (index_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (imin(4, p.M - m0)) {
        case 1: gemv64_row<1, NP, kNested>(p, t, n, m0, lb); break;
        case 2: gemv64_row<2, NP, kNested>(p, t, n, m0, lb); break;
        case 3: gemv64_row<3, NP, kNested>(p, t, n, m0, lb); break;
        default: gemv64_row<4, NP, kNested>(p, t, n, m0, lb); break;
      }
    }
  }
}

template <int NP>
void gemv64_rows(const Linear4bitParams& p, const Planes& t, index_t n_begin, index_t n_end,
                 int lb) {
  if (p.w.qabsmax != nullptr) gemv64_rows_t<NP, true>(p, t, n_begin, n_end, lb);
  else gemv64_rows_t<NP, false>(p, t, n_begin, n_end, lb);
}

template <bool kAligned, bool C64, bool kNested>
void gemv_int4_rows_t(const Linear4bitParams& p, index_t n_begin, index_t n_end, int lb) {
  for (index_t n = n_begin; n < n_end; ++n) {
    for (index_t m0 = 0; m0 < p.M; m0 += 4) {
      switch (imin(4, p.M - m0)) {
        case 1: gemv_int4_row<1, kAligned, C64, kNested>(p, n, m0, lb); break;
        case 2: gemv_int4_row<2, kAligned, C64, kNested>(p, n, m0, lb); break;
        case 3: gemv_int4_row<3, kAligned, C64, kNested>(p, n, m0, lb); break;
        default: gemv_int4_row<4, kAligned, C64, kNested>(p, n, m0, lb); break;
      }
    }
  }
}

template <bool kAligned, bool C64>
void gemv_int4_rows(const Linear4bitParams& p, index_t n_begin, index_t n_end, int lb) {
  if (p.w.qabsmax != nullptr) gemv_int4_rows_t<kAligned, C64, true>(p, n_begin, n_end, lb);
  else gemv_int4_rows_t<kAligned, C64, false>(p, n_begin, n_end, lb);
}

}  // namespace
#endif

bool linear_4bit_gemv(const Linear4bitParams& p, index_t n_begin, index_t n_end) {
#ifdef __AVX2__
  if (p.M > kGemvMaxM) return false;
  const XLayout layout = x_layout(p.M, p.w.K, p.w.block, p.w.fmt);
  const int lb = log2_pow2(p.w.block);
  if (layout == XLayout::kInt4 || layout == XLayout::kInt4x64) {
    const bool aligned = p.w.K % p.w.block == 0;
    if (layout == XLayout::kInt4x64) {
      if (aligned) gemv_int4_rows<true, true>(p, n_begin, n_end, lb);
      else gemv_int4_rows<false, true>(p, n_begin, n_end, lb);
    } else {
      if (aligned) gemv_int4_rows<true, false>(p, n_begin, n_end, lb);
      else gemv_int4_rows<false, false>(p, n_begin, n_end, lb);
    }
    return true;
  }
  if (layout != XLayout::kChunk64 && layout != XLayout::kChunk32) return false;
  const Planes planes(p.w.fmt);
  const bool c64 = layout == XLayout::kChunk64;
  switch (planes.nplanes) {
    case 2:
      if (c64) gemv64_rows<2>(p, planes, n_begin, n_end, lb);
      else gemv_rows<2>(p, planes, n_begin, n_end, lb);
      break;
    default:
      if (c64) gemv64_rows<4>(p, planes, n_begin, n_end, lb);
      else gemv_rows<4>(p, planes, n_begin, n_end, lb);
      break;
  }
  return true;
#else
  (void)p;
  (void)n_begin;
  (void)n_end;
  return false;
#endif
}

}  // namespace tilefuse::cpu::TF_ISA_NS
