// SPDX-License-Identifier: Apache-2.0
// W8A8 GEMM: exact int8 x int8 -> int32 dot products of activation rows with weight rows
// (row-major [N, K], the layout the user and bitsandbytes store), dequantisation, LLM.int8()
// outlier term and bias fused into the epilogue.
//
// AVX2 (no VNNI): a . w over 32 bytes is maddubs(|w|, sign(a, w)) -> 16 x int16, then
// madd(., 1) -> 8 x int32. Exactness: |a|, |w| <= 127 (the quantiser never produces -128), so
// each int16 lane is |a0 w0| + |a1 w1| <= 2 * 127 * 127 = 32258 < 32767: maddubs never
// saturates. (Activations offset to u8, as fbgemm does, would reach 2 * 255 * 127 and saturate;
// hence the sign transfer, which costs one extra instruction per 32 products.)
#include <cstdlib>
#include <cstring>
#include <vector>

#include "tilefuse/cpu/lowbit.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace tilefuse::cpu::TF_ISA_NS {
namespace {

inline void epilogue(const Int8GemmParams& p, index_t m, index_t n, int32_t acc) {
  const float ws = p.w_scale[n];
  float v = static_cast<float>(acc) * (p.a_scale[m] * ws);
  if (p.extra != nullptr) v += p.extra[m * p.N + n] * ws;
  if (p.n_out > 0) {
    const int8_t* w = p.w + n * p.K;
    const float* xo = p.x_out + m * p.n_out;
    float e = 0.0f;
    for (index_t t = 0; t < p.n_out; ++t) e += xo[t] * static_cast<float>(w[p.out_cols[t]]);
    v += e * ws;
  }
  if (p.bias != nullptr) v += p.bias[n];
  p.out[m * p.N + n] = v;
}

#ifdef __AVX2__

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

/// MR activation rows x NR weight rows; one int32x8 accumulator per pair over the 32-byte
/// steps of K, the K % 32 tail in scalar code (no weight row is read past its end).
/// |w| once per weight vector; the sign of w moves onto a (vpsignb also zeroes a where w = 0).
template <int MR, int NR>
void tile(const Int8GemmParams& p, index_t m0, index_t n0) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  const index_t K = p.K, Kmain = K & ~index_t(31);
  const int8_t* ar[MR];
  const int8_t* wr[NR];
  for (int i = 0; i < MR; ++i) ar[i] = p.a + (m0 + i) * p.lda;
  for (int j = 0; j < NR; ++j) wr[j] = p.w + (n0 + j) * K;
  // Two K steps per iteration: GCC then keeps the accumulators in place (one step per
  // iteration compiles to a register copy per accumulator; ~5 % of the M = 32 time).
#pragma GCC unroll 2
  for (index_t k = 0; k < Kmain; k += 32) {
    if constexpr (MR == 1) {
      // GEMV: |a| and the sign mask of a once per step, then per weight vector the xor form of
      // the panel path below (4 ops per 32 products; vpsignb moving the sign of a onto w
      // would turn w = -128 into -128 instead of +128), and the weight stream prefetched ahead.
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[0] + k));
      const __m256i ua = _mm256_abs_epi8(av);
      const __m256i neg = _mm256_cmpgt_epi8(_mm256_setzero_si256(), av);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k) + 512, _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
        const __m256i prod16 = _mm256_maddubs_epi16(ua, _mm256_xor_si256(wv, neg));
        acc[0][j] = _mm256_add_epi32(acc[0][j], _mm256_madd_epi16(prod16, ones));
      }
    } else {
      __m256i wv[NR], uw[NR];
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
        uw[j] = _mm256_abs_epi8(wv[j]);
      }
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[i] + k));
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) {
          const __m256i prod16 = _mm256_maddubs_epi16(uw[j], _mm256_sign_epi8(av, wv[j]));
          acc[i][j] = _mm256_add_epi32(_mm256_madd_epi16(prod16, ones), acc[i][j]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      int32_t v = hsum_epi32(acc[i][j]);
      if constexpr (MR == 1) {
        // The xor form undercounts by sum_{a_k < 0} |a_k| (neg_sum, over the whole row): the
        // tail takes its share out again, so adding neg_sum leaves the exact product.
        for (index_t k = Kmain; k < K; ++k)
          v += int32_t(ar[i][k]) * int32_t(wr[j][k]) + (ar[i][k] < 0 ? int32_t(ar[i][k]) : 0);
        v += p.neg_sum[m0 + i];
      } else {
        for (index_t k = Kmain; k < K; ++k) v += int32_t(ar[i][k]) * int32_t(wr[j][k]);
      }
      epilogue(p, m0 + i, n0 + j, v);
    }
}

// ---- Packed-panel path (M >= kInt8PanelMinM) -------------------------------------------------
// Outer-product form: a panel holds 24 output columns as [k/4][24][4] bytes, so one 32-byte
// vector is 8 columns x 4 consecutive k; an activation row supplies its 4 bytes by broadcast.
// maddubs(|a|, w ^ neg(a)) -> madd(., 1) gives, per column lane, sum |a_k| (w_k ^ neg_k) =
// a.w - sum_{a_k < 0} |a_k| (for a_k < 0, ~w = -w - 1), so the exact product is the lane plus
// the row's neg_sum. Exactness: |a| <= 127 and w ^ neg in [-128, 127] give int16 pair sums of at
// most 2 * 127 * 128 = 32512 < 32767, no saturation. The xor runs on any vector pipe, where
// vpsignb would compete with maddubs / madd for the two multiply pipes (L1-resident loop
// measured here: 2 rows x 32 columns per step ~160 GOP/s per core, ~150 with vpsignb, ~100 for
// the row-dot form above). Tiles of 4 rows x 24 columns (12 accumulators). End to end, one
// thread, cold weights, alternating builds: 3 x 32 was 6-7 % faster than 2 x 32 at M = 32 and
// 23 % at M = N = K = 2048; 4 x 24 is 1-4 % faster than 3 x 32 at M = 32, 11-33 % at 2048,
// -5..+2 % at M = 128.
constexpr index_t kPanelN = 24;    // output columns per panel (kPanelV vectors of 8 lanes)
constexpr int kPanelV = kPanelN / 8;
constexpr int kRowTile = 4;        // activation rows per micro tile
constexpr index_t kPanelKC = 512;  // few rows: k per pass, a 12 KiB panel slice stays in L1
// Many rows: k per packed slice and activation rows per pass over the panels. A 48 KiB panel
// slice and 32 rows x 2048 x 2 bytes of activations share L2; long slices keep the int32
// partial sums (stored in the output between slices) out of the way. Measured at M = N = K =
// 2048, one thread, 2 x 32 tiles: (KC, MC) = (512, 128) 128-132 GOP/s, (1024, 64) 132-146,
// (2048, 32) 120-151 (noisy machine).
constexpr index_t kPanelBigKC = 2048, kPanelBigMC = 32;

inline __m256i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

/// Packs columns [n0, n0 + nv) (nv <= 32, zero columns past nv) and k in [kc, kc + kl) (zero
/// past K) of the row-major [N, K] weight into dst[kl / 4][kPanelN][4].
void pack_panel(const Int8GemmParams& p, index_t n0, index_t nv, index_t kc, index_t kl,
                uint8_t* dst) {
  const index_t K = p.K;
  for (index_t g = 0; g < kPanelN; g += 8) {
    const int8_t* rows[8];
    bool full = true;
    for (int r = 0; r < 8; ++r) {
      const bool live = g + r < nv;
      full = full && live;
      rows[r] = live ? p.w + (n0 + g + r) * K : nullptr;
    }
    index_t k = 0;
    if (full) {
      // 8 rows x 32 bytes = an 8 x 8 matrix of 4-byte groups, transposed in registers.
      for (; k + 32 <= kl && kc + k + 32 <= K; k += 32) {
        __m256i r[8];
        for (int i = 0; i < 8; ++i)
          r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + kc + k));
        __m256i t[8], u[8];
        for (int i = 0; i < 8; i += 2) {
          t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
          t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
          u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
          u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
          u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
          u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        uint8_t* d = dst + (k / 4) * (kPanelN * 4) + g * 4;
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i * kPanelN * 4),
                              _mm256_permute2x128_si256(u[i], u[i + 4], 0x20));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + (i + 4) * kPanelN * 4),
                              _mm256_permute2x128_si256(u[i], u[i + 4], 0x31));
        }
      }
    }
    for (; k < kl; k += 4) {
      uint8_t* d = dst + (k / 4) * (kPanelN * 4) + g * 4;
      for (int r = 0; r < 8; ++r)
        for (int b = 0; b < 4; ++b) {
          const index_t kk = kc + k + b;
          d[r * 4 + b] = rows[r] != nullptr && kk < K ? static_cast<uint8_t>(rows[r][kk]) : 0;
        }
    }
  }
}

/// acc[i][j] += the int32 products of activation rows m..m+MR-1 with the panel columns over
/// `steps` groups of 4 k (ua / ng already offset to the slice's first k).
template <int MR>
inline void panel_micro(const uint8_t* ua, const uint8_t* ng, index_t lda, const uint8_t* pw,
                        index_t steps, __m256i (&acc)[MR][kPanelV]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c[MR][kPanelV];  // local copies: GCC keeps these in registers, not the caller's array
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelV; ++j) c[i][j] = acc[i][j];
  // Two steps per iteration, as in tile() above (one per iteration adds a register copy per
  // accumulator).
#pragma GCC unroll 2
  for (index_t s = 0; s < steps; ++s) {
    const uint8_t* w = pw + s * (kPanelN * 4);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const __m256i u = bcast4(ua + i * lda + 4 * s);
      const __m256i m = bcast4(ng + i * lda + 4 * s);
#pragma GCC unroll 4
      for (int j = 0; j < kPanelV; ++j) {
        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + 32 * j));
        c[i][j] = _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_xor_si256(wv, m)), ones), c[i][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelV; ++j) acc[i][j] = c[i][j];
}

/// Final values of row m, columns [n0, n0 + nv): exact int32 (lanes + neg_sum), then the
/// scale, outlier and bias terms in the scalar epilogue's order; 8 columns per vector except
/// for a panel's last partial vector. Few outlier columns (n_out > 0) come with `wo`, the
/// panel's outlier weights [n_out][kPanelN] taken while packing (without it, the scalar
/// epilogue reads them from the weight rows).
inline void panel_epilogue(const Int8GemmParams& p, index_t m, index_t n0, index_t nv,
                           const __m256i (&acc)[kPanelV], const float* wo) {
  const __m256i ns = _mm256_set1_epi32(p.neg_sum[m]);
  const __m256 as = _mm256_set1_ps(p.a_scale[m]);
  float* out = p.out + m * p.N;
  const float* extra = p.extra != nullptr ? p.extra + m * p.N : nullptr;
  for (int j = 0; j < kPanelV && 8 * j < nv; ++j) {
    const index_t c0 = n0 + 8 * j;
    const __m256i a = _mm256_add_epi32(acc[j], ns);
    if ((p.n_out == 0 || wo != nullptr) && nv - 8 * j >= 8) {
      const __m256 ws = _mm256_loadu_ps(p.w_scale + c0);
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(as, ws));
      if (extra != nullptr) v = _mm256_add_ps(v, _mm256_mul_ps(_mm256_loadu_ps(extra + c0), ws));
      if (p.n_out > 0) {
        __m256 e = _mm256_setzero_ps();
        for (index_t t = 0; t < p.n_out; ++t)
          e = _mm256_fmadd_ps(_mm256_set1_ps(p.x_out[m * p.n_out + t]),
                              _mm256_loadu_ps(wo + t * kPanelN + 8 * j), e);
        v = _mm256_add_ps(v, _mm256_mul_ps(e, ws));
      }
      if (p.bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + c0));
      _mm256_storeu_ps(out + c0, v);
    } else {
      alignas(32) int32_t t[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), a);
      for (index_t l = 0; l < 8 && 8 * j + l < nv; ++l) epilogue(p, m, c0 + l, t[l]);
    }
  }
}

/// Partial sums of a K slice live in the output rows themselves (as int32) until the last slice.
template <int MR>
void panel_rows(const Int8GemmParams& p, index_t m, index_t n0, index_t nv, index_t kc,
                index_t steps, const uint8_t* panel, bool first, bool last,
                const float* wo = nullptr) {
  __m256i acc[MR][kPanelV];
  for (int i = 0; i < MR; ++i) {
    int32_t* c = reinterpret_cast<int32_t*>(p.out + (m + i) * p.N + n0);
    for (int j = 0; j < kPanelV; ++j) {
      if (first) {
        acc[i][j] = _mm256_setzero_si256();
      } else if (nv >= 8 * (j + 1)) {
        acc[i][j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 8 * j));
      } else {
        alignas(32) int32_t t[8] = {};
        for (index_t l = 8 * j; l < nv; ++l) t[l - 8 * j] = c[l];
        acc[i][j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
      }
    }
  }
  panel_micro<MR>(p.a_abs + m * p.lda + kc, p.a_neg + m * p.lda + kc, p.lda, panel, steps, acc);
  for (int i = 0; i < MR; ++i) {
    if (last) {
      panel_epilogue(p, m + i, n0, nv, acc[i], wo);
      continue;
    }
    int32_t* c = reinterpret_cast<int32_t*>(p.out + (m + i) * p.N + n0);
    for (int j = 0; j < kPanelV && 8 * j < nv; ++j) {
      if (nv >= 8 * (j + 1)) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 8 * j), acc[i][j]);
      } else {
        alignas(32) int32_t t[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), acc[i][j]);
        for (index_t l = 8 * j; l < nv; ++l) c[l] = t[l - 8 * j];
      }
    }
  }
}

/// Rows [m, m1) (fewer than kRowTile) of one panel.
void tail_rows(const Int8GemmParams& p, index_t m, index_t m1, index_t n0, index_t nv,
               index_t kc, index_t kl, const uint8_t* panel, bool first, bool last,
               const float* wo = nullptr) {
  for (; m + 2 <= m1; m += 2) panel_rows<2>(p, m, n0, nv, kc, kl / 4, panel, first, last, wo);
  if (m < m1) panel_rows<1>(p, m, n0, nv, kc, kl / 4, panel, first, last, wo);
}

/// False (nothing written) when the panel buffer cannot be allocated; the caller then runs
/// the row path.
bool int8_gemm_panels(const Int8GemmParams& p, index_t n_begin, index_t n_end) {
  const index_t Kp4 = (p.K + 3) & ~index_t(3);
  const index_t np = (n_end - n_begin + kPanelN - 1) / kPanelN;
  auto rows = [&](const uint8_t* panel, index_t n0, index_t nv, index_t kc, index_t kl,
                  index_t m0, index_t m1) {
    const bool first = kc == 0, last = kc + kl >= Kp4;
    index_t m = m0;
    for (; m + kRowTile <= m1; m += kRowTile)
      panel_rows<kRowTile>(p, m, n0, nv, kc, kl / 4, panel, first, last);
    if (m < m1) tail_rows(p, m, m1, n0, nv, kc, kl, panel, first, last);
  };
  if (p.M <= kInt8PanelSmallM) {
    // Few rows: each panel is packed over the whole K (long row reads the prefetcher follows,
    // 96 KiB at K = 4096, in L2), then every row tile runs over it one L1-sized K slice at a
    // time. (Packing K slices of all panels instead reads 512-byte pieces of 32 rows at once,
    // latency-bound: it cost a third of the M = 32 time.) The next panel's weight rows are
    // prefetched into L2 a few lines per row tile meanwhile, so its packing does not wait on
    // DRAM (cold weights, M = 32: packing was ~30 % of the time without this).
    uint8_t* buf = static_cast<uint8_t*>(std::aligned_alloc(64, Kp4 * kPanelN));
    if (buf == nullptr) return false;
    // Few LLM.int8() outlier columns: their weights, per panel, read while the rows are hot.
    std::vector<float> wo_buf(p.n_out * kPanelN);
    float* wo = p.n_out > 0 ? wo_buf.data() : nullptr;
    const index_t line_per_row = (p.K + 63) / 64;
    const index_t ticks = ((Kp4 + kPanelKC - 1) / kPanelKC) * ((p.M + kRowTile - 1) / kRowTile);
    const index_t per_tick = (kPanelN * line_per_row + ticks - 1) / ticks;
    for (index_t q = 0; q < np; ++q) {
      const index_t n0 = n_begin + q * kPanelN, nv = imin(kPanelN, n_end - n0);
      const index_t nn = imin(kPanelN, imax(0, n_end - n0 - kPanelN));  // rows of the next panel
      index_t line = 0;
      pack_panel(p, n0, nv, 0, Kp4, buf);
      for (index_t t = 0; t < p.n_out; ++t)
        for (index_t r = 0; r < kPanelN; ++r)
          wo[t * kPanelN + r] =
              r < nv ? static_cast<float>(p.w[(n0 + r) * p.K + p.out_cols[t]]) : 0.0f;
      for (index_t kc = 0; kc < Kp4; kc += kPanelKC) {
        const index_t kl = imin(kPanelKC, Kp4 - kc);
        const bool first = kc == 0, last = kc + kl >= Kp4;
        for (index_t m = 0; m < p.M; m += kRowTile) {
          const uint8_t* slice = buf + kc * kPanelN;
          if (m + kRowTile <= p.M)
            panel_rows<kRowTile>(p, m, n0, nv, kc, kl / 4, slice, first, last, wo);
          else
            tail_rows(p, m, p.M, n0, nv, kc, kl, slice, first, last, wo);
          for (index_t t = 0; t < per_tick && line < nn * line_per_row; ++t, ++line) {
            const int8_t* r = p.w + (n0 + kPanelN + line / line_per_row) * p.K;
            _mm_prefetch(reinterpret_cast<const char*>(r + (line % line_per_row) * 64),
                         _MM_HINT_T1);
          }
        }
      }
    }
    std::free(buf);
    return true;
  }
  // Many rows: all panel slices of a K slice are packed once and reused by every block of
  // kPanelBigMC rows.
  const index_t slice = kPanelBigKC * kPanelN;
  uint8_t* buf = static_cast<uint8_t*>(std::aligned_alloc(64, np * slice));
  if (buf == nullptr) return false;
  for (index_t kc = 0; kc < Kp4; kc += kPanelBigKC) {
    const index_t kl = imin(kPanelBigKC, Kp4 - kc);
    for (index_t q = 0; q < np; ++q) {
      const index_t n0 = n_begin + q * kPanelN;
      pack_panel(p, n0, imin(kPanelN, n_end - n0), kc, kl, buf + q * slice);
    }
    for (index_t mc = 0; mc < p.M; mc += kPanelBigMC)
      for (index_t q = 0; q < np; ++q) {
        const index_t n0 = n_begin + q * kPanelN;
        rows(buf + q * slice, n0, imin(kPanelN, n_end - n0), kc, kl, mc,
             imin(p.M, mc + kPanelBigMC));
      }
  }
  std::free(buf);
  return true;
}

template <int MR>
void row_tiles(const Int8GemmParams& p, index_t m0, index_t n_begin, index_t n_end) {
  // MR * NR accumulators + NR weight vectors + 4 temporaries fit the 16 ymm registers.
  constexpr int NR = MR == 1 ? 4 : (MR == 2 ? 3 : 2);
  index_t n = n_begin;
  for (; n + NR <= n_end; n += NR) tile<MR, NR>(p, m0, n);
  for (; n < n_end; ++n) tile<MR, 1>(p, m0, n);
}

#endif  // __AVX2__

}  // namespace

void int8_gemm(const Int8GemmParams& p, index_t n_begin, index_t n_end) {
#ifdef __AVX2__
  if (p.a_abs != nullptr && p.M >= kInt8PanelMinM && n_end > n_begin && p.K > 0) {
    if (int8_gemm_panels(p, n_begin, n_end)) return;
  }
  // Weight rows of one n-block stay in L2 (<= ~192 KiB) while every activation tile passes
  // over them, so each weight byte comes from DRAM once.
  const index_t nb = imax(12, imin(96, (192 * 1024) / imax(p.K, 1) / 12 * 12));  // mult. of NR
  for (index_t n0 = n_begin; n0 < n_end; n0 += nb) {
    const index_t n1 = imin(n_end, n0 + nb);
    index_t m = 0;
    for (; m + 3 <= p.M; m += 3) row_tiles<3>(p, m, n0, n1);
    for (; m + 2 <= p.M; m += 2) row_tiles<2>(p, m, n0, n1);
    for (; m < p.M; ++m) row_tiles<1>(p, m, n0, n1);
  }
#else
  for (index_t n = n_begin; n < n_end; ++n) {
    const int8_t* w = p.w + n * p.K;
    for (index_t m = 0; m < p.M; ++m) {
      const int8_t* a = p.a + m * p.lda;
      int32_t acc = 0;
      for (index_t k = 0; k < p.K; ++k) acc += int32_t(a[k]) * int32_t(w[k]);
      epilogue(p, m, n, acc);
    }
  }
#endif
}

}  // namespace tilefuse::cpu::TF_ISA_NS
