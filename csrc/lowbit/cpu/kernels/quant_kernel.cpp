// SPDX-License-Identifier: Apache-2.0
// Quantisation and dequantisation kernels (int8 rowwise, 4-bit blockwise, 8-bit dynamic code
// for double quantisation). Plain loops: they run once per weight (or once per call over the
// activations, which are small next to the weights), and the compiler vectorises them per tier.
#include <cmath>
#include <cstring>

#include "tilefuse/cpu/lowbit.h"

namespace tilefuse::cpu::TF_ISA_NS {

using lowbit::Fmt4;

void int8_quantize_rows(const Int8QuantParams& p, index_t r_begin, index_t r_end) {
  const bool thr = p.threshold > 0.0f;
  for (index_t r = r_begin; r < r_end; ++r) {
    const float* x = p.x + r * p.ldx;
    float amax = 0.0f;
    for (index_t k = 0; k < p.K; ++k) {
      const float a = std::fabs(x[k]);
      // LLM.int8(): row statistics over the non-outlier entries only (bitsandbytes zeroes
      // |x| >= threshold before taking the row max).
      if (!(thr && a >= p.threshold)) amax = a > amax ? a : amax;
    }
    int8_t* q = p.q + r * p.ldq;
    p.scale[r] = amax / 127.0f;
    // An all-zero (or all-outlier) row has no scale: bitsandbytes would produce NaN here; we
    // produce zeros, which is what the exact product of that row is.
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (index_t k = 0; k < p.K; ++k) {
      float v = std::nearbyint(x[k] * inv);  // round half to even (default rounding mode)
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      if (p.col_mask != nullptr && p.col_mask[k]) v = 0.0f;
      if (thr && std::fabs(x[k]) >= p.threshold) v = 0.0f;
      q[k] = static_cast<int8_t>(v);
    }
    for (index_t k = p.K; k < p.ldq; ++k) q[k] = 0;
    if (p.neg_sum != nullptr) {
      int32_t ns = 0;
      for (index_t k = 0; k < p.K; ++k) ns += q[k] < 0 ? -q[k] : 0;
      p.neg_sum[r] = ns;
    }
    if (p.a_abs != nullptr) {
      uint8_t* ua = p.a_abs + r * p.ldq;
      uint8_t* neg = p.a_neg + r * p.ldq;
      for (index_t k = 0; k < p.ldq; ++k) {
        const int v = q[k];
        ua[k] = static_cast<uint8_t>(v < 0 ? -v : v);
        neg[k] = v < 0 ? 0xff : 0;
      }
    }
  }
}

void int8_outlier_mask(const float* x, index_t M, index_t ldx, float thr, index_t k0,
                       index_t k1, uint8_t* mask) {
  // Column block k0..k1 over all rows, as a running max of |x| per column (one pass, no
  // temporaries; NaN compares false, as in the ATen expression this replaces).
  constexpr index_t kB = 256;
  float amax[kB];
  for (index_t kb = k0; kb < k1; kb += kB) {
    const index_t n = imin(kB, k1 - kb);
    for (index_t k = 0; k < n; ++k) amax[k] = 0.0f;
    for (index_t m = 0; m < M; ++m) {
      const float* r = x + m * ldx + kb;
      for (index_t k = 0; k < n; ++k) {
        const float a = std::fabs(r[k]);
        amax[k] = a > amax[k] ? a : amax[k];
      }
    }
    for (index_t k = 0; k < n; ++k) mask[kb + k] = amax[k] >= thr ? 1 : 0;
  }
}

namespace {

inline int quantize_code(Fmt4 fmt, float y) {
  switch (fmt) {
    case Fmt4::kNF4: return lowbit::nf4_quantize(y);
    case Fmt4::kFP4: return lowbit::fp4_quantize(y);
    default: return lowbit::e2m1_quantize(y);
  }
}

}  // namespace

void quantize_4bit(const float* x, index_t n, index_t block, Fmt4 fmt, uint8_t* packed,
                   float* absmax, uint8_t* zero, index_t b_begin, index_t b_end) {
  for (index_t b = b_begin; b < b_end; ++b) {
    const index_t e0 = b * block, e1 = imin(n, e0 + block);
    float amax = 0.0f, mn = 0.0f, mx = 0.0f;
    for (index_t e = e0; e < e1; ++e) {
      // Comparisons rather than std::fmax (a libm call here); both ignore NaN.
      const float v = x[e], a = std::fabs(v);
      amax = a > amax ? a : amax;
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
    float inv = 0.0f, scale = 0.0f;
    int zp = 0;
    if (fmt == Fmt4::kInt4) {
      // Range widened to include 0 so that 0 is exact and zero lies in [0, 15].
      scale = (mx - mn) / 15.0f;
      if (scale > 0.0f) {
        zp = static_cast<int>(std::nearbyint(-mn / scale));
        zp = zp < 0 ? 0 : (zp > 15 ? 15 : zp);
      }
      absmax[b] = scale;
      zero[b] = static_cast<uint8_t>(zp);
    } else if (fmt == Fmt4::kE2M1) {
      scale = lowbit::exp2_int(lowbit::e2m1_block_exponent(amax));
      absmax[b] = scale;
    } else {
      absmax[b] = amax;
      // bitsandbytes' CUDA kernel multiplies by the fp32 reciprocal; we do the same so that
      // codes match it bit for bit.
      inv = amax > 0.0f ? 1.0f / amax : 0.0f;
    }
    auto code_of = [&](float v) -> int {
      switch (fmt) {
        case Fmt4::kInt4: {
          if (!(scale > 0.0f)) return 0;
          float q = std::nearbyint(v / scale) + static_cast<float>(zp);
          q = q < 0.0f ? 0.0f : (q > 15.0f ? 15.0f : q);
          return static_cast<int>(q);
        }
        case Fmt4::kE2M1: return lowbit::e2m1_quantize(v / scale);
        default: return quantize_code(fmt, v * inv);
      }
    };
    for (index_t e = e0; e < e1; e += 2) {
      const int hi = code_of(x[e]);
      // An odd total length pads the last byte with the code of 0.0 (as bitsandbytes).
      const int lo = e + 1 < e1 ? code_of(x[e + 1]) : code_of(0.0f);
      packed[e >> 1] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

void quantize_blockwise8(const float* x, index_t n, index_t block, const float* code, uint8_t* q,
                         float* absmax, index_t b_begin, index_t b_end) {
  for (index_t b = b_begin; b < b_end; ++b) {
    const index_t e0 = b * block, e1 = imin(n, e0 + block);
    float amax = 0.0f;
    for (index_t e = e0; e < e1; ++e) {
      const float a = std::fabs(x[e]);
      amax = a > amax ? a : amax;
    }
    absmax[b] = amax;
    const float inv = amax > 0.0f ? 1.0f / amax : 0.0f;
    for (index_t e = e0; e < e1; ++e)
      q[e] = static_cast<uint8_t>(lowbit::dynamic8_quantize(code, x[e] * inv));
  }
}

void dequantize_4bit(const Fourbit& w, float* out, index_t e_begin, index_t e_end) {
  float tab[16];
  for (int c = 0; c < 16; ++c) tab[c] = lowbit::code4_value(w.fmt, c);
  int lb = 0;  // block sizes are powers of two (checked by the adapter)
  while ((index_t(1) << lb) < w.block) ++lb;
  index_t cur = -1;
  float s = 0.0f, z = 0.0f;
  for (index_t e = e_begin; e < e_end; ++e) {
    const index_t b = e >> lb;
    if (b != cur) {
      cur = b;
      s = w.scale(b);
      z = w.zero != nullptr ? static_cast<float>(w.zero[b]) : 0.0f;
    }
    const uint8_t byte = w.packed[e >> 1];
    const int q = (e & 1) ? (byte & 15) : (byte >> 4);
    // int4: (q - zero) is a small exact integer, so this is one rounding, like the tables.
    out[e] = w.fmt == Fmt4::kInt4 ? (tab[q] - z) * s : tab[q] * s;
  }
}

}  // namespace tilefuse::cpu::TF_ISA_NS
