// SPDX-License-Identifier: Apache-2.0
// 4-bit decode helpers shared by the CPU 4-bit kernels (fourbit_kernel.cpp: tiled GEMM,
// fourbit_gemv.cpp: fused GEMV). Included only from kernel translation units, so __AVX2__
// tells which tier is being compiled.
//
// AVX2 decode of 32 codes (16 bytes): a 16-entry fp32 table is held as four byte planes;
// vpshufb looks each plane up with the nibbles (high nibbles = even elements in the low lane,
// low nibbles = odd elements in the high lane), and two rounds of unpack interleave the planes
// back into floats. That yields the 32 weights in a fixed order (0,2,4,6,1,3,5,7, 8,10,...),
// so the activations are permuted the same way once per call (linear_4bit_prepare_x) instead
// of un-permuting every weight. 13 shuffles per 32 weights, exact fp32 table values.
// The GEMV (M <= kGemvMaxM) uses two cheaper variants with their own activation layouts
// (XLayout): 64 codes per 32-byte load for the table formats (one shift for both nibble
// halves, 12.5 shuffles per 32 weights), and for int4 a shuffle-free decode (mask + convert,
// the nibble's power-of-two place value moved into the activations).
#pragma once
#include <cstdint>
#include <cstring>

#include "tilefuse/cpu/lowbit.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace tilefuse::cpu::TF_ISA_NS::lowbit_detail {

// The decoders return several vectors; GCC would otherwise keep some out of line (through
// memory) in the kernels' hot loops.
#define TF_LOWBIT_INLINE inline __attribute__((always_inline))

using lowbit::Fmt4;

inline int log2_pow2(index_t v) {
  int l = 0;
  while ((index_t(1) << l) < v) ++l;
  return l;
}

/// Fast path: every 32-code chunk of a row lies in one block and starts on a byte.
inline bool fast_layout(index_t K) { return K % 32 == 0; }

/// Activation rows up to which linear_4bit runs the fused GEMV (fourbit_gemv.cpp).
constexpr index_t kGemvMaxM = 8;

/// How linear_4bit_prepare_x lays out the activations; it must match the decoder that runs.
enum class XLayout {
  kPlain,    ///< natural order (generic tier, or K % 32 != 0)
  kChunk32,  ///< decode32's order per 32-chunk (tiled GEMM, and GEMV fallback)
  kChunk64,  ///< decode64's order per 64-chunk (GEMV of the table formats)
  kInt4,     ///< decode32_int4's order and place values per 32-chunk (GEMV of int4)
  kInt4x64,  ///< decode64_int4's order and place values per 64-chunk (same, block >= 64)
};

#ifdef __AVX2__
constexpr bool kPermutes = true;

/// Position (within a 32-chunk) of the element the decoder writes to slot i: the table
/// decoders interleave nibbles per 128-bit lane, the int4 decoder converts 8 bytes at a time
/// (high nibbles, then low nibbles).
inline int permuted_source(int i, Fmt4 fmt) {
  if (fmt == Fmt4::kInt4) return 16 * (i / 16) + 2 * (i % 8) + (i / 8) % 2;
  const int g = i / 8, j = i % 8;
  return 8 * g + (j < 4 ? 2 * j : 2 * (j - 4) + 1);
}

/// The table as byte planes. When every table value (times `mult_inv`) is exact in bfloat16
/// (e2m1, int4, and bitsandbytes' fp4 times 12), only the two high bytes are looked up and the
/// low half of each float is zero: 8 shuffles per 32 codes instead of 12. `mult` (= 1 /
/// mult_inv) then goes into the block scale.
struct Planes {
  __m256i p[4];
  int nplanes = 4;  // 4, 2, or 0 = int4 (no table: the code converted to float)
  float mult = 1.0f;
  explicit Planes(Fmt4 fmt) {
    if (fmt == Fmt4::kInt4) nplanes = 0;
    const float mult_inv = fmt == Fmt4::kFP4 ? 12.0f : 1.0f;
    uint32_t bits[16];
    bool bf16_exact = fmt != Fmt4::kNF4;
    for (int c = 0; c < 16; ++c) {
      const float v = lowbit::code4_value(fmt, c) * (bf16_exact ? mult_inv : 1.0f);
      std::memcpy(&bits[c], &v, 4);
      bf16_exact = bf16_exact && (bits[c] & 0xffff) == 0;
    }
    if (!bf16_exact) {  // NF4 (and any table that is not): full fp32 values
      for (int c = 0; c < 16; ++c) {
        const float v = lowbit::code4_value(fmt, c);
        std::memcpy(&bits[c], &v, 4);
      }
    } else if (fmt != Fmt4::kInt4) {
      nplanes = 2;
      mult = 1.0f / mult_inv;
    }
    alignas(32) uint8_t bytes[4][32];
    for (int c = 0; c < 16; ++c)
      for (int k = 0; k < 4; ++k)
        bytes[k][c] = bytes[k][c + 16] = static_cast<uint8_t>(bits[c] >> (8 * k));
    for (int k = 0; k < 4; ++k)
      p[k] = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes[k]));
  }
};

/// The 32 table values of the codes in src[0..16), in the decoder's order, unscaled
/// (times Planes::mult_inv for two-plane tables).
struct Decoded {
  __m256 f[4];
};
template <int NP>
TF_LOWBIT_INLINE Decoded decode32(const Planes& t, const uint8_t* src) {
  if constexpr (NP == 0) {
    // int4: the codes are the values; two conversions per 8 codes beat any table lookup.
    (void)t;
    const __m256i lo = _mm256_set1_epi32(15);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
    const __m256i b1 =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8)));
    Decoded d;
    d.f[0] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    d.f[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, lo));
    d.f[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
    d.f[3] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, lo));
    return d;
  }
  const __m256i raw =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  // Low lane: high nibbles (shift the 32-bit words by 4); high lane: low nibbles.
  const __m256i idx =
      _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_setr_epi32(4, 4, 4, 4, 0, 0, 0, 0)),
                       _mm256_set1_epi8(0x0f));
  const __m256i b2 = _mm256_shuffle_epi8(t.p[2], idx), b3 = _mm256_shuffle_epi8(t.p[3], idx);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  __m256i l01, h01;
  if constexpr (NP == 4) {
    const __m256i b0 = _mm256_shuffle_epi8(t.p[0], idx), b1 = _mm256_shuffle_epi8(t.p[1], idx);
    l01 = _mm256_unpacklo_epi8(b0, b1);
    h01 = _mm256_unpackhi_epi8(b0, b1);
  } else {
    l01 = h01 = _mm256_setzero_si256();
  }
  Decoded d;
  d.f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  d.f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  d.f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  d.f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  return d;
}

/// The 64 table values of the codes in src[0..32), unscaled, in 8 vectors: out[0..4) hold the
/// high nibbles (even elements), out[4..8) the low nibbles; within each, the low lane covers
/// bytes 0..15 and the high lane bytes 16..31 (see perm64_source). One 32-byte load and one
/// shift serve both halves (decode32 shifts per 16 bytes).
template <int NP>
TF_LOWBIT_INLINE void decode64(const Planes& t, const uint8_t* src, __m256 out[8]) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i m = _mm256_set1_epi8(0x0f);
  const __m256i nib[2] = {_mm256_and_si256(_mm256_srli_epi16(raw, 4), m),
                          _mm256_and_si256(raw, m)};
  for (int h = 0; h < 2; ++h) {
    const __m256i idx = nib[h];
    const __m256i b2 = _mm256_shuffle_epi8(t.p[2], idx), b3 = _mm256_shuffle_epi8(t.p[3], idx);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    __m256i l01, h01;
    if constexpr (NP == 4) {
      const __m256i b0 = _mm256_shuffle_epi8(t.p[0], idx), b1 = _mm256_shuffle_epi8(t.p[1], idx);
      l01 = _mm256_unpacklo_epi8(b0, b1);
      h01 = _mm256_unpackhi_epi8(b0, b1);
    } else {
      l01 = h01 = _mm256_setzero_si256();
    }
    out[4 * h + 0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    out[4 * h + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    out[4 * h + 2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    out[4 * h + 3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  }
}

/// Element (within a 64-chunk) that decode64 writes to slot i (vector i / 8, lane, position).
inline int perm64_source(int i) {
  const int v = i / 8, lane = (i % 8) / 4, pos = i % 4;
  return 2 * (16 * lane + 4 * (v % 4) + pos) + (v >= 4 ? 1 : 0);
}

/// int4 codes of src[0..16) as floats without a shuffle: each 32-bit word holds 8 nibbles;
/// masking nibble p in place and converting gives q * 16^(p % 4) exactly (after one 16-bit
/// shift for p >= 4), the low lane taking the even nibble of each pair, the high lane the odd
/// one. The place value 16^(p % 4) is divided out of the activations (int4_slot), so
/// d[j] * x'[slot] is the product q * x rounded once, as with the plain decode.
TF_LOWBIT_INLINE Decoded decode32_int4(const uint8_t* src) {
  const __m256i raw =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m256i r16 = _mm256_srli_epi32(raw, 16);
  const __m256i m0 = _mm256_setr_epi32(0xF, 0xF, 0xF, 0xF, 0xF0, 0xF0, 0xF0, 0xF0);
  const __m256i m1 =
      _mm256_setr_epi32(0xF00, 0xF00, 0xF00, 0xF00, 0xF000, 0xF000, 0xF000, 0xF000);
  Decoded d;
  d.f[0] = _mm256_cvtepi32_ps(_mm256_and_si256(raw, m0));
  d.f[1] = _mm256_cvtepi32_ps(_mm256_and_si256(raw, m1));
  d.f[2] = _mm256_cvtepi32_ps(_mm256_and_si256(r16, m0));
  d.f[3] = _mm256_cvtepi32_ps(_mm256_and_si256(r16, m1));
  return d;
}

/// Slot i of decode32_int4: the source element (within the 32-chunk) and the exponent e of
/// its place value 2^e (the activation is stored times 2^-e, an exact scaling; only
/// activations below 2^-114 in magnitude lose bits, as subnormals).
inline int int4_slot(int i, int* e) {
  const int j = i / 8, lane = (i % 8) / 4, word = i % 4;
  const int p = 2 * j + lane;  // nibble within the 32-bit word, little-endian
  *e = 4 * (p % 4);
  return 8 * word + (p ^ 1);  // the low nibble of a byte is its odd element
}

/// decode32_int4 over 64 codes (src[0..32), eight 32-bit words): vector p holds nibble p of
/// every word (place value 16^(p % 4), p >= 4 after one 16-bit shift).
TF_LOWBIT_INLINE void decode64_int4(const uint8_t* src, __m256 out[8]) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i r16 = _mm256_srli_epi32(raw, 16);
  for (int p = 0; p < 4; ++p) {
    const __m256i m = _mm256_set1_epi32(0xF << (4 * p));
    out[p] = _mm256_cvtepi32_ps(_mm256_and_si256(raw, m));
    out[p + 4] = _mm256_cvtepi32_ps(_mm256_and_si256(r16, m));
  }
}

/// Slot i of decode64_int4: source element within the 64-chunk, place-value exponent in *e.
inline int int4x64_slot(int i, int* e) {
  const int p = i / 8, word = i % 8;
  *e = 4 * (p % 4);
  return 8 * word + (p ^ 1);
}

/// Decodes 32 codes scaled, out = t * s + c, into out[0..32).
inline void decode32_store(const Planes& t, const uint8_t* src, __m256 s, __m256 c, float* out) {
  const Decoded d = t.nplanes == 0 ? decode32<0>(t, src)
                    : (t.nplanes == 2 ? decode32<2>(t, src) : decode32<4>(t, src));
  for (int i = 0; i < 4; ++i) _mm256_store_ps(out + 8 * i, _mm256_fmadd_ps(d.f[i], s, c));
}
/// The activation layout for a call (prepare_x and the kernels agree through this function).
inline XLayout x_layout(index_t M, index_t K, index_t block, Fmt4 fmt) {
  if (!fast_layout(K)) return XLayout::kPlain;
  if (M <= kGemvMaxM) {
    // Every 64-chunk lies in one block: rows start on multiples of 64, blocks are >= 64.
    const bool c64 = K % 64 == 0 && block >= 64;
    if (fmt == Fmt4::kInt4) return c64 ? XLayout::kInt4x64 : XLayout::kInt4;
    if (c64) return XLayout::kChunk64;
  }
  return XLayout::kChunk32;
}
#else
constexpr bool kPermutes = false;
inline XLayout x_layout(index_t, index_t, index_t, Fmt4) { return XLayout::kPlain; }
#endif

}  // namespace tilefuse::cpu::TF_ISA_NS::lowbit_detail
