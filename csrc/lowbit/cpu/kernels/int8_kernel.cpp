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
#include <cstring>

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
      // GEMV: |a| once, the sign of a moved onto each weight vector (4 instead of 5 ops per
      // 32 products), and the weight stream prefetched ahead.
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[0] + k));
      const __m256i ua = _mm256_abs_epi8(av);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k) + 512, _MM_HINT_T0);
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[j] + k));
        const __m256i prod16 = _mm256_maddubs_epi16(ua, _mm256_sign_epi8(wv, av));
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
      for (index_t k = Kmain; k < K; ++k) v += int32_t(ar[i][k]) * int32_t(wr[j][k]);
      epilogue(p, m0 + i, n0 + j, v);
    }
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
