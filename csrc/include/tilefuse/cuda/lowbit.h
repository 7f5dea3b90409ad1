// SPDX-License-Identifier: Apache-2.0
// Entry points of the CUDA low-bit kernels (int8 W8A8, 4-bit weight-only):
// csrc/lowbit/cuda/kernels/{int8_gemm,fourbit}.cu. Torch-free: plain structs of device
// pointers and sizes; the ATen adapter (csrc/lowbit/cuda/lowbit_cuda.cu) checks arguments,
// allocates, and calls these on the current stream. Semantics are those of the CPU kernels
// (tilefuse/cpu/lowbit.h, docs/lowbit.md); quantisers are bit-identical to them.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "tilefuse/common.h"
#include "tilefuse/lowbit/formats.h"

namespace tilefuse::cuda {

/// Element type of activations / outputs (the kernels are instantiated for these three).
enum class LowbitDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

using lowbit::kInt8MaxK;
/// Row padding of the int8 activation buffer (the GEMM loads 16-byte pieces of its rows).
constexpr index_t kInt8KPad = 16;

/// \brief Rowwise symmetric int8 quantisation (identical to cpu::int8_quantize_rows):
/// scale[r] = absmax / 127 over the entries with |x| < threshold (all when threshold <= 0),
/// q = round_half_even(x * (127 / absmax)) clamped to [-127, 127]; columns with col_mask[k]
/// and entries with |x| >= threshold become 0; q rows have ldq entries, zero past K.
struct Int8QuantArgs {
  const void* x = nullptr;  ///< [rows, ldx] of x_dtype
  LowbitDtype x_dtype = LowbitDtype::kFloat32;
  index_t rows = 0, K = 0, ldx = 0, ldq = 0;
  float threshold = 0.0f;
  const uint8_t* col_mask = nullptr;  ///< [K] or null
  int8_t* q = nullptr;                ///< [rows, ldq]
  float* scale = nullptr;             ///< [rows]
};

/// \brief W8A8 GEMM on tensor cores: out[M, N] = (a . w^T) * a_scale[m] * w_scale[n]
/// + (extra[m, n] + sum_t x_out[m, t] * w[n, out_cols[t]]) * w_scale[n] + bias[n],
/// exact int32 dot products, fp32 epilogue, written in out_dtype.
struct Int8GemmArgs {
  const int8_t* a = nullptr;       ///< [M, lda] quantized activations, lda % 16 == 0, zero past K
  const float* a_scale = nullptr;  ///< [M]
  const int8_t* w = nullptr;       ///< [N, K] row-major, unpadded (the user's qweight)
  const float* w_scale = nullptr;  ///< [N]
  const float* bias = nullptr;     ///< [N] fp32 or null
  const float* extra = nullptr;    ///< [M, N] LLM.int8() outlier product x_o . q_o^T, or null
  /// Alternative to `extra` for a few outlier columns: the epilogue adds them itself.
  const int64_t* out_cols = nullptr;  ///< [n_out]
  const float* x_out = nullptr;       ///< [M, n_out]
  index_t n_out = 0;
  void* out = nullptr;  ///< [M, N] of out_dtype
  LowbitDtype out_dtype = LowbitDtype::kFloat32;
  index_t M = 0, N = 0, K = 0, lda = 0;
};

/// \brief A 4-bit weight in bitsandbytes' layout (see cpu::Fourbit), device pointers. The
/// double-quantisation offset stays on the device (`offset` points at one float), so that no
/// call synchronises to read it.
struct Fourbit4 {
  const uint8_t* packed = nullptr;
  index_t N = 0, K = 0, block = 64;
  int block_shift = 6;  ///< log2(block)
  lowbit::Fmt4 fmt = lowbit::Fmt4::kNF4;
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  const float* offset = nullptr;
  int block2_shift = 8;           ///< log2(nested block size)
  const uint8_t* zero = nullptr;  ///< int4 zero points [blocks]

  /// Scale of block b: the same fp32 operations as cpu::Fourbit::scale (two roundings).
  TF_HD float scale(index_t b) const {
    if (qabsmax != nullptr)
      return lowbit::mul_add_rn(code2[qabsmax[b]], absmax2[b >> block2_shift], *offset);
    return absmax[b];
  }
};

/// \brief Fused dequantise-GEMV for 1 <= M <= kLinear4bitGemvMaxM activation rows:
/// out[M, N] = x[M, K] . dequant(w)^T + bias, fp32 accumulation, x and out of dtype `dtype`.
struct Linear4bitGemvArgs {
  Fourbit4 w;
  const void* x = nullptr;  ///< [M, ldx] of dtype
  index_t M = 0, ldx = 0;
  const float* bias = nullptr;  ///< [N] fp32 or null
  void* out = nullptr;          ///< [M, N] of dtype
  LowbitDtype dtype = LowbitDtype::kFloat32;
};
constexpr index_t kLinear4bitGemvMaxM = 8;

void int8_quantize_rows(const Int8QuantArgs& p, cudaStream_t stream);
void int8_gemm(const Int8GemmArgs& p, cudaStream_t stream);

/// Blockwise 4-bit quantisation of the flat x[n] (identical to cpu::quantize_4bit);
/// block is a power of two >= 32, zero is written for int4 only.
void quantize_4bit(const float* x, index_t n, index_t block, lowbit::Fmt4 fmt, uint8_t* packed,
                   float* absmax, uint8_t* zero, cudaStream_t stream);
/// bitsandbytes' blockwise 8-bit quantisation with a 256-entry code (cpu::quantize_blockwise8).
void quantize_blockwise8(const float* x, index_t n, index_t block, const float* code, uint8_t* q,
                         float* absmax, cudaStream_t stream);
/// out[N * K] = dequant(w), in out_dtype (computed in fp32, rounded once).
void dequantize_4bit(const Fourbit4& w, void* out, LowbitDtype out_dtype, cudaStream_t stream);
void linear_4bit_gemv(const Linear4bitGemvArgs& p, cudaStream_t stream);
/// Fused dequantise-GEMM for any M, fp16 / bf16 activations only (dtype kFloat16 / kBFloat16;
/// other dtypes launch nothing): the same arguments as the GEMV, x rows ldx apart, out [M, N].
/// Weights are dequantised in fp32 and rounded once to the activation dtype per tile.
void linear_4bit_gemm(const Linear4bitGemvArgs& p, cudaStream_t stream);

}  // namespace tilefuse::cuda
