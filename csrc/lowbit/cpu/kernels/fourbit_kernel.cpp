// SPDX-License-Identifier: Apache-2.0
// 4-bit weight-only linear (nf4 / fp4 / e2m1 / int4) with dequantisation fused into the GEMM:
// for each tile of kTileN weight rows and kChunkK columns the codes are decoded (and scaled)
// into a 32 KiB fp32 buffer that stays in L1, then every activation row is dotted with it.
// fp32 accumulation throughout. The weights are read in bitsandbytes' layout as stored.
// The AVX2 decoder is in tilefuse/cpu/lowbit_decode.h.
#include <cmath>
#include <cstring>

#include "tilefuse/cpu/lowbit_decode.h"
#include "tilefuse/cpu/vec.h"

namespace tilefuse::cpu::TF_ISA_NS {
namespace {

using lowbit::Fmt4;
using namespace lowbit_detail;
constexpr index_t kTileN = kLinear4bitTileN;
constexpr index_t kChunkK = 1024;  // kTileN * kChunkK * 4 bytes = 32 KiB


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
      decode32_store(t, w.packed + (f >> 1), _mm256_set1_ps(s * t.mult), _mm256_set1_ps(c), dst + k);
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

/// Requests the packed bytes of the next chunk (same rows, or the next tile's first chunk)
/// while the current one is multiplied: rows are visited in 256-byte pieces, a pattern the
/// hardware prefetchers do not follow on their own.
inline void prefetch_next(const Fourbit& w, index_t n0, index_t nb, index_t k0, index_t n_end) {
  index_t nk = k0 + kChunkK, nn0 = n0, nnb = nb;
  if (nk >= w.K) {
    nk = 0;
    nn0 = n0 + kTileN;
    nnb = imin(kTileN, n_end - nn0);
  }
  const index_t bytes = imin(kChunkK, w.K - nk) / 2 + 1;
  for (index_t j = 0; j < nnb; ++j) {
    const char* src = reinterpret_cast<const char*>(w.packed) + ((nn0 + j) * w.K + nk) / 2;
    for (index_t o = 0; o < bytes; o += 64) __builtin_prefetch(src + o, 0, 3);
  }
}

/// out[m0 + i, n0 + j] += sum_k xp[m0 + i, k0 + k] * wbuf[j, k], k < kcp (multiple of 8).
template <int MR, int NR>
void dot_tile(const Linear4bitParams& p, index_t m0, index_t n0, index_t j0, index_t k0,
              index_t kcp, const float* wbuf) {
  using V = vec_t<float>;
  V acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = V{};
  const float* xr = p.xp + m0 * p.ldxp + k0;
  const float* wr = wbuf + j0 * kChunkK;
  for (index_t k = 0; k < kcp; k += 8) {
    V wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = loadv(wr + j * kChunkK + k);
    for (int i = 0; i < MR; ++i) {
      const V xv = loadv(xr + i * p.ldxp + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) p.out[(m0 + i) * p.w.N + n0 + j0 + j] += hsum<float>(acc[i][j]);
}

template <int MR>
void dot_rows(const Linear4bitParams& p, index_t m0, index_t n0, index_t nb, index_t k0,
              index_t kcp, const float* wbuf) {
  // NR divides kTileN; few activation rows get more weight rows, so that there are always
  // >= 8 independent accumulator chains (FMA latency 4 x 2 ports).
  constexpr int NR = MR == 1 ? 8 : (MR == 2 ? 4 : 2);
  index_t j = 0;
  for (; j + NR <= nb; j += NR) dot_tile<MR, NR>(p, m0, n0, j, k0, kcp, wbuf);
  for (; j < nb; ++j) dot_tile<MR, 1>(p, m0, n0, j, k0, kcp, wbuf);
}

}  // namespace

void linear_4bit_prepare_x(const float* x, index_t M, index_t K, index_t ldx, float* xp,
                           index_t Kp, lowbit::Fmt4 fmt) {
  const index_t ldxp = linear_4bit_ldxp(Kp);
  for (index_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    float* dst = xp + m * ldxp;
    if (kPermutes && fast_layout(K)) {
#ifdef __AVX2__
      for (index_t k = 0; k < K; k += 32)
        for (int i = 0; i < 32; ++i) dst[k + i] = src[k + permuted_source(i, fmt)];
#endif
    } else {
      (void)fmt;
      std::memcpy(dst, src, static_cast<size_t>(K) * sizeof(float));
    }
    for (index_t k = K; k < Kp; ++k) dst[k] = 0.0f;
    for (index_t c = 0; c < Kp / 32; ++c) {
      float sum = 0.0f;
      for (int i = 0; i < 32; ++i) sum += dst[32 * c + i];
      dst[Kp + c] = sum;
    }
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
      prefetch_next(w, n0, nb, k0, n_end);
      index_t m = 0;
      for (; m + 4 <= p.M; m += 4) dot_rows<4>(p, m, n0, nb, k0, kcp, wbuf);
      for (; m + 2 <= p.M; m += 2) dot_rows<2>(p, m, n0, nb, k0, kcp, wbuf);
      for (; m < p.M; ++m) dot_rows<1>(p, m, n0, nb, k0, kcp, wbuf);
    }
  }
}

}  // namespace tilefuse::cpu::TF_ISA_NS
