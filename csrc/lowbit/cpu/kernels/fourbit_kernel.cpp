// SPDX-License-Identifier: Apache-2.0
// 4-bit weight-only linear (nf4 / fp4 / e2m1 / int4) with dequantisation fused into the GEMM
// (M > 8, or any M when K % 32 != 0; fourbit_gemv.cpp has the GEMV): for each tile of kTileN
// weight rows and kChunkK columns the codes are decoded (and scaled) into an L1-resident panel,
// transposed k-major, and the register-blocked fp32 micro-kernel of tilefuse/cpu/gemm.h runs
// every activation row over it (6 x 16 tile, activations broadcast, no horizontal sums).
// fp32 accumulation throughout. The weights are read in bitsandbytes' layout as stored.
// The AVX2 decoder is in tilefuse/cpu/lowbit_decode.h.
#include <cmath>
#include <cstring>
#include <vector>

#include "tilefuse/cpu/gemm.h"
#include "tilefuse/cpu/lowbit_decode.h"

namespace tilefuse::cpu::TF_ISA_NS {
namespace {

using lowbit::Fmt4;
using namespace lowbit_detail;
constexpr index_t kTileN = kLinear4bitTileN;
constexpr index_t kChunkK = 256;  // kTileN * kChunkK * 4 bytes = 16 KiB per panel

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
      decode32_store(t, w.packed + (f >> 1), _mm256_set1_ps(s * t.mult), _mm256_set1_ps(c),
                     dst + k);
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

/// wt[k][j] = wrow[j][k] for k < kcp (a multiple of 8), j < kTileN: the decoded rows turned
/// into the k-major panel the GEMM micro-kernel broadcasts activations against.
void transpose_panel(const float* wrow, index_t kcp, float* wt) {
#ifdef __AVX2__
  for (index_t k = 0; k < kcp; k += 8) {
    for (index_t jb = 0; jb < kTileN; jb += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_load_ps(wrow + (jb + j) * kChunkK + k);
      __m256 t[8], u[8];
      for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
      }
      for (int h = 0; h < 8; h += 4) {
        u[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
        u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xee);
        u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
        u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xee);
      }
      for (int q = 0; q < 4; ++q) {
        _mm256_store_ps(wt + (k + q) * kTileN + jb, _mm256_permute2f128_ps(u[q], u[q + 4], 0x20));
        _mm256_store_ps(wt + (k + q + 4) * kTileN + jb,
                        _mm256_permute2f128_ps(u[q], u[q + 4], 0x31));
      }
    }
  }
#else
  for (index_t k = 0; k < kcp; ++k)
    for (index_t j = 0; j < kTileN; ++j) wt[k * kTileN + j] = wrow[j * kChunkK + k];
#endif
}

}  // namespace

void linear_4bit_prepare_x(const float* x, index_t M, index_t K, index_t ldx, float* xp,
                           index_t Kp, lowbit::Fmt4 fmt, index_t block) {
  const index_t ldxp = linear_4bit_ldxp(Kp);
  const XLayout layout = x_layout(M, K, block, fmt);
  for (index_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    float* dst = xp + m * ldxp;
    switch (layout) {
#ifdef __AVX2__
      case XLayout::kChunk32:
        for (index_t k = 0; k < K; k += 32)
          for (int i = 0; i < 32; ++i) dst[k + i] = src[k + permuted_source(i, fmt)];
        break;
      case XLayout::kChunk64:
        for (index_t k = 0; k < K; k += 64)
          for (int i = 0; i < 64; ++i) dst[k + i] = src[k + perm64_source(i)];
        break;
      case XLayout::kInt4:
        for (index_t k = 0; k < K; k += 32)
          for (int i = 0; i < 32; ++i) {
            int e = 0;
            const int j = int4_slot(i, &e);
            dst[k + i] = std::ldexp(src[k + j], -e);
          }
        break;
      case XLayout::kInt4x64:
        for (index_t k = 0; k < K; k += 64)
          for (int i = 0; i < 64; ++i) {
            int e = 0;
            const int j = int4x64_slot(i, &e);
            dst[k + i] = std::ldexp(src[k + j], -e);
          }
        break;
#endif
      default:
        std::memcpy(dst, src, static_cast<size_t>(K) * sizeof(float));
        break;
    }
    for (index_t k = K; k < Kp; ++k) dst[k] = 0.0f;
    // Sums of x itself (not of the scaled kInt4 values) per 32-chunk, or per block for the int4
    // GEMV when no block spans rows (its zero-point term is then one dot product per row).
    const bool int4 = layout == XLayout::kInt4 || layout == XLayout::kInt4x64;
    const index_t seg = int4 && K % block == 0 ? block : 32;
    for (index_t c = 0; c < Kp / 32; ++c) dst[Kp + c] = 0.0f;
    for (index_t c = 0; c * seg < K; ++c) {
      float sum = 0.0f;
      for (index_t i = seg * c; i < imin(K, seg * c + seg); ++i) sum += src[i];
      dst[Kp + c] = sum;
    }
  }
  (void)fmt;
}

void linear_4bit(const Linear4bitParams& p, index_t n_begin, index_t n_end) {
  const Fourbit& w = p.w;
  const int lb = log2_pow2(w.block);
  alignas(64) float wrow[kTileN * kChunkK];  // decoded rows (16 KiB)
  alignas(64) float wt[kChunkK * kTileN];    // the same, k-major (16 KiB)
  std::vector<float> ctail;                  // output of a last tile narrower than kTileN
#ifdef __AVX2__
  const Planes planes(w.fmt);
  const void* pl = &planes;
#else
  const void* pl = nullptr;
#endif
  for (index_t n0 = n_begin; n0 < n_end; n0 += kTileN) {
    const index_t nb = imin(kTileN, n_end - n0);
    float* c = p.out + n0;
    index_t ldc = w.N;
    if (nb < kTileN) {
      ctail.assign(static_cast<size_t>(p.M * kTileN), 0.0f);
      c = ctail.data();
      ldc = kTileN;
    }
    for (index_t m = 0; m < p.M; ++m)
      for (index_t j = 0; j < kTileN; ++j)
        c[m * ldc + j] = p.bias && j < nb ? p.bias[n0 + j] : 0.0f;
    for (index_t k0 = 0; k0 < w.K; k0 += kChunkK) {
      const index_t kc = imin(kChunkK, w.K - k0), kcp = round_up(kc, 8);
      for (index_t j = 0; j < nb; ++j) decode_row(w, n0 + j, k0, kc, wrow + j * kChunkK, lb, pl);
      for (index_t j = nb; j < kTileN; ++j) std::memset(wrow + j * kChunkK, 0, sizeof(float) * kcp);
      prefetch_next(w, n0, nb, k0, n_end);
      transpose_panel(wrow, kcp, wt);
      gemm<GemmOut::kAccumulate, float>(p.M, kTileN, kcp, p.xp + k0, p.ldxp, 1, wt, kTileN, c,
                                        ldc);
    }
    if (nb < kTileN)
      for (index_t m = 0; m < p.M; ++m)
        std::memcpy(p.out + m * w.N + n0, c + m * kTileN, sizeof(float) * nb);
  }
}

}  // namespace tilefuse::cpu::TF_ISA_NS
