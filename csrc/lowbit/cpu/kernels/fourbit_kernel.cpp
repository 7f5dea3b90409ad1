// SPDX-License-Identifier: Apache-2.0
// 4-bit weight-only linear (nf4 / fp4 / e2m1 / int4) with dequantisation fused into the GEMM:
// for each tile of kTileN weight rows and kChunkK columns the codes are decoded (and scaled)
// into a 32 KiB fp32 buffer that stays in L1, then every activation row is dotted with it.
// fp32 accumulation throughout. The weights are read in bitsandbytes' layout as stored.
//
// AVX2 decode of 32 codes (16 bytes): a 16-entry fp32 table is held as four byte planes;
// vpshufb looks each plane up with the nibbles (high nibbles = even elements in the low lane,
// low nibbles = odd elements in the high lane), and two rounds of unpack interleave the planes
// back into floats. That yields the 32 weights in a fixed order (0,2,4,6,1,3,5,7, 8,10,...),
// so the activations are permuted the same way once per call (linear_4bit_prepare_x) instead
// of un-permuting every weight.
#include <cmath>
#include <cstring>

#include "tilefuse/cpu/lowbit.h"
#include "tilefuse/cpu/vec.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace tilefuse::cpu::TF_ISA_NS {
namespace {

using lowbit::Fmt4;
constexpr index_t kTileN = kLinear4bitTileN;
constexpr index_t kChunkK = 512;  // kTileN * kChunkK * 4 bytes = 32 KiB

inline int log2_pow2(index_t v) {
  int l = 0;
  while ((index_t(1) << l) < v) ++l;
  return l;
}

/// Fast path: every 32-code chunk of a row lies in one block and starts on a byte.
inline bool fast_layout(index_t K) { return K % 32 == 0; }

#ifdef __AVX2__
constexpr bool kPermutes = true;

/// Position (within a 32-chunk) of the element the decoder writes to slot i.
inline int permuted_source(int i) {
  const int g = i / 8, j = i % 8;
  return 8 * g + (j < 4 ? 2 * j : 2 * (j - 4) + 1);
}

struct Planes {
  __m256i p[4];
  explicit Planes(Fmt4 fmt) {
    alignas(32) uint8_t bytes[4][32];
    for (int c = 0; c < 16; ++c) {
      const float v = lowbit::code4_value(fmt, c);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      for (int k = 0; k < 4; ++k) bytes[k][c] = bytes[k][c + 16] = static_cast<uint8_t>(u >> (8 * k));
    }
    for (int k = 0; k < 4; ++k) p[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[k]));
  }
};

/// Decodes the 32 codes in src[0..16) to table values, scaled: out = t * s + c.
inline void decode32(const Planes& t, const uint8_t* src, __m256 s, __m256 c, float* out) {
  const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  // Low lane: high nibbles (shift the 32-bit words by 4); high lane: low nibbles.
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                                       _mm256_set1_epi8(0x0f));
  const __m256i b0 = _mm256_shuffle_epi8(t.p[0], idx), b1 = _mm256_shuffle_epi8(t.p[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.p[2], idx), b3 = _mm256_shuffle_epi8(t.p[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), l23 = _mm256_unpacklo_epi8(b2, b3);
  const __m256i h01 = _mm256_unpackhi_epi8(b0, b1), h23 = _mm256_unpackhi_epi8(b2, b3);
  const __m256 f0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  const __m256 f1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  const __m256 f3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  _mm256_store_ps(out, _mm256_fmadd_ps(f0, s, c));
  _mm256_store_ps(out + 8, _mm256_fmadd_ps(f1, s, c));
  _mm256_store_ps(out + 16, _mm256_fmadd_ps(f2, s, c));
  _mm256_store_ps(out + 24, _mm256_fmadd_ps(f3, s, c));
}
#else
constexpr bool kPermutes = false;
#endif

/// Decodes weight row n, columns [k0, k0 + kc), into dst (natural order, or the AVX2 order on
/// the fast path), zero-filling up to kc rounded to 8.
void decode_row(const Fourbit& w, index_t n, index_t k0, index_t kc, float* dst, int lb,
                const void* planes) {
  const index_t base = n * w.K + k0;
  const bool int4 = w.fmt == Fmt4::kInt4;
#ifdef __AVX2__
  if (fast_layout(w.K)) {
    const Planes& t = *static_cast<const Planes*>(planes);
    for (index_t k = 0; k < kc; k += 32) {
      const index_t f = base + k, b = f >> lb;
      const float s = w.scale(b);
      const float c = int4 ? -static_cast<float>(w.zero[b]) * s : 0.0f;
      decode32(t, w.packed + (f >> 1), _mm256_set1_ps(s), _mm256_set1_ps(c), dst + k);
    }
    return;
  }
#endif
  (void)planes;
  float tab[16];
  for (int q = 0; q < 16; ++q) tab[q] = lowbit::code4_value(w.fmt, q);
  index_t cur = -1;
  float s = 0.0f, c = 0.0f;
  for (index_t k = 0; k < kc; ++k) {
    const index_t f = base + k, b = f >> lb;
    if (b != cur) {
      cur = b;
      s = w.scale(b);
      c = int4 ? -static_cast<float>(w.zero[b]) * s : 0.0f;
    }
    const uint8_t byte = w.packed[f >> 1];
    const int q = (f & 1) ? (byte & 15) : (byte >> 4);
    dst[k] = std::fma(tab[q], s, c);
  }
  for (index_t k = kc; k < round_up(kc, 8); ++k) dst[k] = 0.0f;
}

/// out[m0 + i, n0 + j] += sum_k xp[m0 + i, k0 + k] * wbuf[j, k], k < kcp (multiple of 8).
template <int MR, int NR>
void dot_tile(const Linear4bitParams& p, index_t m0, index_t n0, index_t j0, index_t k0,
              index_t kcp, const float* wbuf) {
  using V = vec_t<float>;
  V acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V{};
  const float* xr = p.xp + m0 * p.Kp + k0;
  const float* wr = wbuf + j0 * kChunkK;
  for (index_t k = 0; k < kcp; k += 8) {
    V wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = loadv(wr + j * kChunkK + k);
    for (int i = 0; i < MR; ++i) {
      const V xv = loadv(xr + i * p.Kp + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) p.out[(m0 + i) * p.w.N + n0 + j0 + j] += hsum<float>(acc[i][j]);
}

template <int MR>
void dot_rows(const Linear4bitParams& p, index_t m0, index_t n0, index_t nb, index_t k0,
              index_t kcp, const float* wbuf) {
  // One activation row (GEMV): more weight rows per pass for independent accumulators.
  constexpr int NR = MR == 1 ? 6 : 3;
  index_t j = 0;
  for (; j + NR <= nb; j += NR) dot_tile<MR, NR>(p, m0, n0, j, k0, kcp, wbuf);
  for (; j < nb; ++j) dot_tile<MR, 1>(p, m0, n0, j, k0, kcp, wbuf);
}

}  // namespace

void linear_4bit_prepare_x(const float* x, index_t M, index_t K, index_t ldx, float* xp,
                           index_t Kp) {
  for (index_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    float* dst = xp + m * Kp;
    if (kPermutes && fast_layout(K)) {
#ifdef __AVX2__
      for (index_t k = 0; k < K; k += 32)
        for (int i = 0; i < 32; ++i) dst[k + i] = src[k + permuted_source(i)];
#endif
    } else {
      std::memcpy(dst, src, static_cast<size_t>(K) * sizeof(float));
    }
    for (index_t k = K; k < Kp; ++k) dst[k] = 0.0f;
  }
}

void linear_4bit(const Linear4bitParams& p, index_t n_begin, index_t n_end) {
  const Fourbit& w = p.w;
  const int lb = log2_pow2(w.block);
  alignas(64) float wbuf[kTileN * kChunkK];
#ifdef __AVX2__
  const Planes planes(w.fmt);
  const void* pl = &planes;
#else
  const void* pl = nullptr;
#endif
  for (index_t n0 = n_begin; n0 < n_end; n0 += kTileN) {
    const index_t nb = imin(kTileN, n_end - n0);
    for (index_t m = 0; m < p.M; ++m)
      for (index_t j = 0; j < nb; ++j) p.out[m * w.N + n0 + j] = p.bias ? p.bias[n0 + j] : 0.0f;
    for (index_t k0 = 0; k0 < w.K; k0 += kChunkK) {
      const index_t kc = imin(kChunkK, w.K - k0), kcp = round_up(kc, 8);
      for (index_t j = 0; j < nb; ++j) decode_row(w, n0 + j, k0, kc, wbuf + j * kChunkK, lb, pl);
      index_t m = 0;
      for (; m + 4 <= p.M; m += 4) dot_rows<4>(p, m, n0, nb, k0, kcp, wbuf);
      for (; m + 2 <= p.M; m += 2) dot_rows<2>(p, m, n0, nb, k0, kcp, wbuf);
      for (; m < p.M; ++m) dot_rows<1>(p, m, n0, nb, k0, kcp, wbuf);
    }
  }
}

}  // namespace tilefuse::cpu::TF_ISA_NS
