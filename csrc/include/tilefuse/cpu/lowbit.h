// SPDX-License-Identifier: Apache-2.0
// Entry points of the CPU low-bit kernels (int8 W8A8, 4-bit weight-only), one set per ISA tier
// (csrc/lowbit/cpu/kernels/*.cpp, compiled as generic and avx2). Torch-free: the adapters in
// csrc/lowbit/cpu/ check arguments, allocate, and split work over threads with at::parallel_for
// by calling the kernels on disjoint ranges.
#pragma once
#include <cstdint>

#include "tilefuse/common.h"
#include "tilefuse/lowbit/formats.h"

namespace tilefuse::cpu {

using lowbit::kInt8MaxK;
/// Row padding of the int8 activation buffers (one 32-byte vector).
constexpr index_t kInt8KPad = 32;

/// \brief W8A8 GEMM out[M, N] = (a[M, K] . w[N, K]^T) * a_scale[m] * w_scale[n]
///        + extra[m, n] * w_scale[n] + bias[n], exact int32 dot products.
struct Int8GemmParams {
  const int8_t* a = nullptr;     ///< [M, lda] quantized activations, zero past K
  const float* a_scale = nullptr;///< [M] absmax / 127 (0 for an all-zero row)
  const int8_t* w = nullptr;     ///< [N, K] row-major (the user's qweight, unpadded)
  const float* w_scale = nullptr;///< [N]
  const float* bias = nullptr;   ///< [N] or null
  const float* extra = nullptr;  ///< [M, N] LLM.int8() outlier product x_o . q_o^T, or null
  /// Alternative to `extra` for a few outliers: the epilogue adds x_out[m, t] * w[n, cols[t]]
  /// itself, reading the weight row it just streamed (no separate gather pass over w).
  const int64_t* out_cols = nullptr;
  const float* x_out = nullptr;  ///< [M, n_out]
  index_t n_out = 0;
  float* out = nullptr;          ///< [M, N]
  index_t M = 0, N = 0, K = 0, lda = 0;
  /// Int8QuantParams::neg_sum (required by the AVX2 kernel), and optionally a_abs / a_neg (same
  /// lda): with them the AVX2 kernel takes its packed-panel path for M >= kInt8PanelMinM.
  const int32_t* neg_sum = nullptr;
  const uint8_t* a_abs = nullptr;
  const uint8_t* a_neg = nullptr;
};

/// Rows from which the AVX2 int8 GEMM packs weight panels (below, it streams weight rows).
constexpr index_t kInt8PanelMinM = 16;
/// Up to this many rows, panels are packed one at a time over the whole K (and the epilogue
/// can take LLM.int8() outlier weights from them, `out_cols`); beyond, per K slice.
constexpr index_t kInt8PanelSmallM = 128;

/// \brief One row range of int8 rowwise quantisation: scale[r] = absmax / 127 over the entries
/// with |x| < threshold (all when threshold <= 0), q = round_half_even(x * 127 / absmax);
/// columns with col_mask[k] != 0 are set to 0 (LLM.int8() outliers). q rows have ldq entries,
/// zero padded past K.
struct Int8QuantParams {
  const float* x = nullptr;  ///< [rows, ldx]
  index_t K = 0, ldx = 0, ldq = 0;
  float threshold = 0.0f;
  const uint8_t* col_mask = nullptr;  ///< [K] or null
  int8_t* q = nullptr;
  float* scale = nullptr;
  /// Optional, for the AVX2 int8 GEMM: per row the sum of |q| over the negative entries (the
  /// correction of maddubs(|a|, w ^ neg(a)) = a.w - neg_sum), and for its packed-panel path |q|
  /// (u8) and the masks 0xff where q < 0 else 0.
  int32_t* neg_sum = nullptr;
  uint8_t* a_abs = nullptr;
  uint8_t* a_neg = nullptr;
};

/// \brief A 4-bit weight in bitsandbytes' layout: blocks of `block` (power of two) elements of
/// the flattened [N, K] tensor, nibble pairs with the first element high. Per-block scale is
/// absmax[b], or (nested, double quantisation) code2[qabsmax[b]] * absmax2[b / block2] + offset.
struct Fourbit {
  const uint8_t* packed = nullptr;
  index_t N = 0, K = 0, block = 64;
  lowbit::Fmt4 fmt = lowbit::Fmt4::kNF4;
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  float offset = 0.0f;
  index_t block2 = 256;
  int block2_shift = 8;  ///< log2(block2): a shift, not a division, per block in the kernels
  const uint8_t* zero = nullptr;  ///< int4 zero points [blocks]

  /// Scale of block b (fp32 arithmetic identical to bitsandbytes' dequantize_blockwise).
  TF_HD float scale(index_t b) const {
    if (qabsmax != nullptr)
      return lowbit::mul_add_rn(code2[qabsmax[b]], absmax2[b >> block2_shift], offset);
    return absmax[b];
  }
};

/// Row stride of the prepared activations: Kp values (permuted, for the int4 GEMV also scaled
/// by powers of two; zero padded), then the Kp / 32 sums of each 32-chunk of x itself (used by
/// the int4 zero-point correction).
TF_HD index_t linear_4bit_ldxp(index_t Kp) { return Kp + Kp / 32; }

/// \brief out[M, N] = x[M, K] . dequant(w)^T + bias, fp32 accumulation. xp is x prepared by
/// linear_4bit_prepare_x ([M, ldxp], Kp = round_up(K, 32), ldxp = linear_4bit_ldxp(Kp)).
struct Linear4bitParams {
  Fourbit w;
  const float* xp = nullptr;
  index_t M = 0, Kp = 0, ldxp = 0;
  const float* bias = nullptr;
  float* out = nullptr;
};

/// Output columns per task of linear_4bit (the adapter splits N in multiples of this).
constexpr index_t kLinear4bitTileN = 16;

#define TF_DECLARE_LOWBIT_KERNELS(ns)                                                          \
  namespace ns {                                                                             \
  void int8_quantize_rows(const Int8QuantParams& p, index_t r_begin, index_t r_end);         \
  /* LLM.int8() outlier columns: mask[k] = any_m |x[m, k]| >= thr, for k in [k0, k1). */      \
  void int8_outlier_mask(const float* x, index_t M, index_t ldx, float thr, index_t k0,      \
                         index_t k1, uint8_t* mask);                                         \
  void int8_gemm(const Int8GemmParams& p, index_t n_begin, index_t n_end);                   \
  /* 4-bit: quantise blocks [b_begin, b_end) of the flat x[n]; pairs of blocks share bytes */ \
  /* only at odd block sizes, which are rejected, so ranges of blocks are independent.    */ \
  void quantize_4bit(const float* x, index_t n, index_t block, lowbit::Fmt4 fmt,             \
                     uint8_t* packed, float* absmax, uint8_t* zero, index_t b_begin,          \
                     index_t b_end);                                                         \
  void quantize_blockwise8(const float* x, index_t n, index_t block, const float* code,      \
                           uint8_t* q, float* absmax, index_t b_begin, index_t b_end);       \
  void dequantize_4bit(const Fourbit& w, float* out, index_t e_begin, index_t e_end);        \
  void linear_4bit_prepare_x(const float* x, index_t M, index_t K, index_t ldx, float* xp,   \
                             index_t Kp, lowbit::Fmt4 fmt, index_t block);                   \
  void linear_4bit(const Linear4bitParams& p, index_t n_begin, index_t n_end);               \
  bool linear_4bit_gemv(const Linear4bitParams& p, index_t n_begin, index_t n_end);          \
  }
TF_DECLARE_LOWBIT_KERNELS(generic)
TF_DECLARE_LOWBIT_KERNELS(avx2)
#undef TF_DECLARE_LOWBIT_KERNELS

}  // namespace tilefuse::cpu
