// SPDX-License-Identifier: Apache-2.0
// Fused 4-bit GEMV for up to 8 activation rows (decode, the batch-1..8 case of LLM decoding):
// each weight row is streamed once, decoded 32 codes at a time into registers and multiplied
// with the (permuted) activation rows; nothing goes through memory. Each block's unscaled
// partial sums are folded into the totals with one FMA per accumulator when the block ends
// (scaling every decoded weight instead costs one more multiply per 8 weights on the ports
// the decoder's shuffles share; reducing the partial sums first puts adds on the critical
// path), and int4's zero point becomes -zero * scale * sum(x over the block), from the chunk
// sums that linear_4bit_prepare_x stores after each activation row.
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

/// out[m0 .. m0 + MR, n] for one weight row n (a block may start in the previous row when K is
/// not a multiple of the block: the block index is taken per 32-chunk).
template <int MR, int NP>
void gemv_row(const Linear4bitParams& p, const Planes& t, index_t n, index_t m0, int lb) {
  const Fourbit& w = p.w;
  const bool int4 = w.fmt == Fmt4::kInt4;
  // Independent accumulator chains per activation row (FMA latency 4, two ports).
  constexpr int NA = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  const index_t f0 = n * w.K;
  const uint8_t* src = w.packed + (f0 >> 1);
  const float* xr[MR];
  __m256 tot[MR];
  float corr[MR];
  for (int i = 0; i < MR; ++i) {
    xr[i] = p.xp + (m0 + i) * p.ldxp;
    tot[i] = _mm256_setzero_ps();
    corr[i] = 0.0f;
  }
  // Per block: unscaled partial sums acc, folded into tot with one FMA per accumulator when the
  // block ends (independent chains, no reduction on the critical path).
  __m256 acc[MR][NA], tsum[MR][NA];
  for (int i = 0; i < MR; ++i)
    for (int a = 0; a < NA; ++a) acc[i][a] = tsum[i][a] = _mm256_setzero_ps();
  float xseg[MR];
  for (int i = 0; i < MR; ++i) xseg[i] = 0.0f;
  index_t cur = f0 >> lb;
  for (index_t k = 0; k < w.K; k += 32) {
    const index_t b = (f0 + k) >> lb;
    if (b != cur) {
      const float s = w.scale(cur);
      const __m256 sv = _mm256_set1_ps(s * t.mult);
      const float zs = int4 ? -static_cast<float>(w.zero[cur]) * s : 0.0f;
      for (int i = 0; i < MR; ++i) {
        for (int a = 0; a < NA; ++a) {
          tsum[i][a] = _mm256_fmadd_ps(acc[i][a], sv, tsum[i][a]);
          acc[i][a] = _mm256_setzero_ps();
        }
        corr[i] += zs * xseg[i];
        xseg[i] = 0.0f;
      }
      cur = b;
    }
    // Rows are consecutive in memory, so this also runs ahead into the next rows.
    if ((k & 127) == 0)
      _mm_prefetch(reinterpret_cast<const char*>(src + (k >> 1)) + 1024, _MM_HINT_T0);
    const Decoded d = decode32<NP>(t, src + (k >> 1));
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < 4; ++j)
        acc[i][j % NA] =
            _mm256_fmadd_ps(d.f[j], _mm256_loadu_ps(xr[i] + k + 8 * j), acc[i][j % NA]);
      if (int4) xseg[i] += xr[i][p.Kp + (k >> 5)];
    }
  }
  {
    const float s = w.scale(cur);
    const __m256 sv = _mm256_set1_ps(s * t.mult);
    const float zs = int4 ? -static_cast<float>(w.zero[cur]) * s : 0.0f;
    for (int i = 0; i < MR; ++i) {
      for (int a = 0; a < NA; ++a) tsum[i][a] = _mm256_fmadd_ps(acc[i][a], sv, tsum[i][a]);
      corr[i] += zs * xseg[i];
    }
  }
  for (int i = 0; i < MR; ++i) {
    tot[i] = tsum[i][0];
    for (int a = 1; a < NA; ++a) tot[i] = _mm256_add_ps(tot[i], tsum[i][a]);
  }
  for (int i = 0; i < MR; ++i) {
    float v = hsum8(tot[i]) + corr[i];
    if (p.bias != nullptr) v += p.bias[n];
    p.out[(m0 + i) * w.N + n] = v;
  }
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

}  // namespace
#endif

bool linear_4bit_gemv(const Linear4bitParams& p, index_t n_begin, index_t n_end) {
#ifdef __AVX2__
  if (p.M > 8 || !fast_layout(p.w.K)) return false;
  const Planes planes(p.w.fmt);
  const int lb = log2_pow2(p.w.block);
  switch (planes.nplanes) {
    case 0: gemv_rows<0>(p, planes, n_begin, n_end, lb); break;
    case 2: gemv_rows<2>(p, planes, n_begin, n_end, lb); break;
    default: gemv_rows<4>(p, planes, n_begin, n_end, lb); break;
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
