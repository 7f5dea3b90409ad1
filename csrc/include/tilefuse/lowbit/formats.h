// SPDX-License-Identifier: Apache-2.0
// Low-bit number formats, written once for the CPU kernels (g++) and later CUDA kernels (nvcc).
//
// 4-bit codes (one nibble per weight; bitsandbytes' layout: blocks of `block` elements of the
// flattened [N, K] weight, element 2i in the high nibble of byte i):
//   nf4   bitsandbytes' NormalFloat4 table, value = table[q] * absmax[block]
//   fp4   bitsandbytes' "FP4" table (NOT OCP E2M1: permuted codes, subnormal 0.0625/12)
//   e2m1  OCP MX FP4 (S EE M, bias 1): 0, .5, 1, 1.5, 2, 3, 4, 6; scale = power of two (E8M0)
//   int4  asymmetric: value = (q - zero[block]) * scale[block], q and zero in [0, 15]
// The tables are switch statements (not arrays) so that device code can use them without
// __constant__ memory.
#pragma once
#include <cstdint>

#include "tilefuse/common.h"

namespace tilefuse::lowbit {

enum class Fmt4 : int { kNF4 = 0, kFP4 = 1, kE2M1 = 2, kInt4 = 3 };

/// Largest K for which int8 x int8 -> int32 cannot overflow: 127 * 127 * K < 2^31.
constexpr index_t kInt8MaxK = 131072;

/// \brief a * b + c with two roundings, never fused into an FMA (the kernels are built with
/// -ffp-contract=fast), so that double-quantised scales match bitsandbytes bit for bit.
TF_HD float mul_add_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  float t = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(t));  // the product must be rounded to float before the add
#endif
  return t + c;
#endif
}

/// \brief bitsandbytes NF4 table (functional.get_4bit_type("nf4")), index = 4-bit code.
TF_HD float nf4_value(int q) {
  switch (q & 15) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

/// \brief bitsandbytes "FP4" table: [0, .0625, 8, 12, 4, 6, 2, 3] / 12, bit 3 = sign.
TF_HD float fp4_value(int q) {
  float m;
  switch (q & 7) {
    case 0: m = 0.0f; break;
    case 1: m = 0.0625f / 12.0f; break;
    case 2: m = 8.0f / 12.0f; break;
    case 3: m = 1.0f; break;
    case 4: m = 4.0f / 12.0f; break;
    case 5: m = 0.5f; break;
    case 6: m = 2.0f / 12.0f; break;
    default: m = 0.25f; break;
  }
  return (q & 8) ? -m : m;
}

/// \brief OCP E2M1 value of a code (sign bit 3; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6).
TF_HD float e2m1_value(int q) {
  const int mag = q & 7, e = mag >> 1, m = mag & 1;
  const float v = e == 0 ? 0.5f * m : float(1 << (e - 1)) * (1.0f + 0.5f * m);
  return (q & 8) ? -v : v;
}

/// \brief Table value of code q; for int4 the table is the integer q itself.
TF_HD float code4_value(Fmt4 f, int q) {
  switch (f) {
    case Fmt4::kNF4: return nf4_value(q);
    case Fmt4::kFP4: return fp4_value(q);
    case Fmt4::kE2M1: return e2m1_value(q);
    default: return float(q & 15);
  }
}

/// \brief NF4 code of y = x / absmax: the number of bitsandbytes' thresholds (fp32 midpoints
/// of the table) strictly below y, so ties go to the lower code (as dQuantizeNF4).
TF_HD int nf4_quantize(float y) {
  // Midpoints as the float literals bitsandbytes compares against.
  const float t[15] = {-0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,
                       -0.33967943489551544f, -0.23460740596055984f, -0.13791173323988914f,
                       -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,
                       0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
                       0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
  int q = 0;
  for (int i = 0; i < 15; ++i) q += y > t[i] ? 1 : 0;
  return q;
}

/// \brief bitsandbytes FP4 code of y = x / absmax: sign bit iff y < 0, magnitude by its
/// thresholds on |y| with strict comparisons (the float literals of dQuantizeFP4).
TF_HD int fp4_quantize(float y) {
  const int sign = y < 0.0f ? 8 : 0;
  const float a = y < 0.0f ? -y : y;
  int mag;
  if (a > 0.29166667f) {
    if (a > 0.583333f) mag = a > 0.8333333f ? 3 : 2;
    else mag = a > 0.4166667f ? 5 : 4;
  } else if (a > 0.0859375f) {
    mag = a > 0.20833333f ? 7 : 6;
  } else {
    mag = a > 0.00260417f ? 1 : 0;
  }
  return sign | mag;
}

/// \brief E2M1 code of y (already divided by the block scale): round to nearest, ties to the
/// even code (even mantissa), saturating at +-6; sign bit iff y < 0.
TF_HD int e2m1_quantize(float y) {
  const int sign = y < 0.0f ? 8 : 0;
  const float a = y < 0.0f ? -y : y;
  // Midpoints between magnitude codes i and i + 1; a tie rounds up only when i + 1 is even.
  const float mid[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  int mag = 0;
  for (int i = 0; i < 7; ++i) mag += (a > mid[i] || (a == mid[i] && (i & 1))) ? 1 : 0;
  return sign | mag;
}

/// \brief E8M0 exponent of an MX block: floor(log2(amax)) - 2 (E2M1's largest power is 2^2),
/// clamped to [-127, 127]; amax == 0 gives -127. Exact: read from the float's bits.
TF_HD int e2m1_block_exponent(float amax) {
  if (!(amax > 0.0f)) return -127;
  union {
    float f;
    uint32_t u;
  } v{amax};
  int e = int((v.u >> 23) & 0xff);
  if (e == 0) {  // subnormal: floor(log2) from the leading mantissa bit
    uint32_t m = v.u & 0x7fffff;
    e = -126;
    while (!(m & 0x400000)) {
      m <<= 1;
      --e;
    }
    e -= 1;
  } else {
    e -= 127;
  }
  e -= 2;
  return e < -127 ? -127 : (e > 127 ? 127 : e);
}

/// \brief 2^e as a float for e in [-127, 127] (2^-127 is a subnormal, still exact).
TF_HD float exp2_int(int e) {
  union {
    uint32_t u;
    float f;
  } v{e >= -126 ? uint32_t(e + 127) << 23 : uint32_t(1) << (e + 149)};
  return v.f;
}

/// \brief bitsandbytes' 8-bit blockwise code search (dQuantize<0>): a 7-step binary search
/// over the sorted 256-entry code followed by a midpoint test against the neighbour on the
/// side the search ended. Reproduced step by step because its result is not always the
/// exact nearest code, and double-quantised states must match it byte for byte.
TF_HD int dynamic8_quantize(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return x > midpoint ? upper_pivot : pivot;
  }
  const float midpoint = (lower + val) * 0.5f;
  return x < midpoint ? lower_pivot : pivot;
}

}  // namespace tilefuse::lowbit
