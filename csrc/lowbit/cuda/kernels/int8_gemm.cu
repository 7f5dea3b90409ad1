// SPDX-License-Identifier: Apache-2.0
// CUDA int8 W8A8: rowwise activation / weight quantisation (bit-identical to the CPU quantiser,
// csrc/lowbit/cpu/kernels/quant_kernel.cpp) and the int8 x int8 -> int32 GEMM on tensor cores
// (nvcuda::wmma, signed char 16x16x16 fragments, int32 accumulation) with the dequantisation,
// LLM.int8() outlier term and bias fused into the epilogue. Torch-free.
//
// GEMM: CTA tile 128 (M) x 128 (N) x 32 (K), 8 warps as 2 x 4, each warp 64 x 32 = 4 x 2
// accumulator fragments. Each K step of 32 is held in shared memory as two 16-column halves,
// each [128 rows][16 bytes] contiguous, so that every 16x16 operand fragment is 256
// contiguous, 256-bit aligned bytes (ldm = 16). Activations (A, [M, lda]) are row-major
// matrix_a; weights (W, [N, K] row-major, the user's layout) are col-major matrix_b, so the
// product is A . W^T with no repacking. Double-buffered: the next K step is loaded into
// registers while the current one is multiplied, then stored to the other buffer (one
// __syncthreads per K step). Loads past M, N or K read zeros, so any shape works; the weight
// rows are read 16 bytes at a time when K % 16 == 0 (and w is 16-byte aligned), byte by byte
// otherwise. Exactness: |a|, |w| <= 127 and K <= 131072 keep the int32 sums exact.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "tilefuse/cuda/float_convert.cuh"
#include "tilefuse/cuda/lowbit.h"

namespace tilefuse::cuda {
namespace {

using namespace nvcuda;

// ------------------------------------------------------------------------------ quantisation

constexpr int kQuantThreads = 256;

/// One CTA per row. Same fp32 operations as the CPU quantiser: the max ignores NaN like its
/// `a > amax ? a : amax`, IEEE division for the scale and its reciprocal, one rounded multiply,
/// rint (ties to even) and clamp to [-127, 127].
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) int8_quantize_rows_kernel(Int8QuantArgs p) {
  __shared__ float warp_max[kQuantThreads / 32];
  const index_t r = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + r * p.ldx;
  const bool thr = p.threshold > 0.0f;
  float amax = 0.0f;
  for (index_t k = threadIdx.x; k < p.K; k += kQuantThreads) {
    const float a = fabsf(to_float(x[k]));
    // LLM.int8(): row statistics over the non-outlier entries only.
    if (!(thr && a >= p.threshold)) amax = a > amax ? a : amax;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, amax, o);
    amax = v > amax ? v : amax;
  }
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = warp_max[0];
  for (int w = 1; w < kQuantThreads / 32; ++w) amax = warp_max[w] > amax ? warp_max[w] : amax;
  if (threadIdx.x == 0) p.scale[r] = __fdiv_rn(amax, 127.0f);
  // An all-zero (or all-outlier) row gets scale 0 and zero codes (as the CPU kernel).
  const float inv = amax > 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
  int8_t* q = p.q + r * p.ldq;
  for (index_t k = threadIdx.x; k < p.ldq; k += kQuantThreads) {
    float v = 0.0f;
    if (k < p.K) {
      const float xv = to_float(x[k]);
      v = rintf(__fmul_rn(xv, inv));
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      if (p.col_mask != nullptr && p.col_mask[k]) v = 0.0f;
      if (thr && fabsf(xv) >= p.threshold) v = 0.0f;
    }
    q[k] = static_cast<int8_t>(static_cast<int>(v));
  }
}

// ------------------------------------------------------------------------------------ GEMM

constexpr int kBM = 128, kBN = 128, kBK = 32, kGemmThreads = 256;
constexpr int kWarpM = 64, kWarpN = 32;  // 2 x 4 warps
constexpr int kFragM = kWarpM / 16, kFragN = kWarpN / 16;

/// 16 bytes of activation row m starting at column kc (a multiple of 16), zeros past M or K.
/// The buffer rows are padded to lda (a multiple of 16, zero past K), so a piece that starts
/// before K never reads past its row.
__device__ __forceinline__ uint4 load_a(const Int8GemmArgs& p, index_t m, index_t kc) {
  if (m < p.M && kc < p.K) return __ldg(reinterpret_cast<const uint4*>(p.a + m * p.lda + kc));
  return make_uint4(0u, 0u, 0u, 0u);
}

/// 16 bytes of weight row n starting at column kc, zeros past N or K (rows are unpadded).
template <bool kVecW>
__device__ __forceinline__ uint4 load_w(const Int8GemmArgs& p, index_t n, index_t kc) {
  if (n >= p.N || kc >= p.K) return make_uint4(0u, 0u, 0u, 0u);
  const int8_t* src = p.w + n * p.K + kc;
  if constexpr (kVecW) {
    return __ldg(reinterpret_cast<const uint4*>(src));
  } else {
    const index_t left = p.K - kc;
    uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (i < left) words[i >> 2] |= uint32_t(uint8_t(src[i])) << (8 * (i & 3));
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
}

/// out[m, n] from the exact int32 dot product: the CPU epilogue's fp32 operations.
template <typename OutT>
__device__ __forceinline__ void store_out(const Int8GemmArgs& p, index_t m, index_t n,
                                          int32_t acc) {
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
  static_cast<OutT*>(p.out)[m * p.N + n] = from_float<OutT>(v);
}

template <typename OutT, bool kVecW>
__global__ void __launch_bounds__(kGemmThreads) int8_gemm_kernel(Int8GemmArgs p) {
  // [stage][k half][row * 16 + k]: every 16x16 fragment is 256 contiguous bytes.
  __shared__ __align__(128) int8_t As[2][2][kBM * 16];
  __shared__ __align__(128) int8_t Bs[2][2][kBN * 16];
  // Per-warp staging of one accumulator fragment for the epilogue.
  __shared__ __align__(128) int32_t Cs[kGemmThreads / 32][16 * 16];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int warp_m = warp / (kBN / kWarpN), warp_n = warp % (kBN / kWarpN);
  // Loader mapping: each thread moves 16 bytes of A and 16 bytes of W per K step.
  const int lrow = tid >> 1, lhalf = tid & 1;
  const index_t m0 = index_t(blockIdx.x) * kBM;
  const index_t am = m0 + lrow;
  const index_t nk = (p.K + kBK - 1) / kBK;
  const index_t tiles_n = (p.N + kBN - 1) / kBN;

  for (index_t tn = blockIdx.y; tn < tiles_n; tn += gridDim.y) {
    const index_t n0 = tn * kBN;
    const index_t wn = n0 + lrow;

    wmma::fragment<wmma::accumulator, 16, 16, 16, int32_t> acc[kFragM][kFragN];
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
      for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0);

    uint4 ra = make_uint4(0u, 0u, 0u, 0u), rb = make_uint4(0u, 0u, 0u, 0u);
    if (nk > 0) {
      ra = load_a(p, am, lhalf * 16);
      rb = load_w<kVecW>(p, wn, lhalf * 16);
      *reinterpret_cast<uint4*>(&As[0][lhalf][lrow * 16]) = ra;
      *reinterpret_cast<uint4*>(&Bs[0][lhalf][lrow * 16]) = rb;
    }
    __syncthreads();

    for (index_t kt = 0; kt < nk; ++kt) {
      const int cur = int(kt & 1);
      const bool more = kt + 1 < nk;
      if (more) {
        const index_t kc = (kt + 1) * kBK + lhalf * 16;
        ra = load_a(p, am, kc);
        rb = load_w<kVecW>(p, wn, kc);
      }
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[kFragM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[kFragN];
#pragma unroll
        for (int i = 0; i < kFragM; ++i)
          wmma::load_matrix_sync(fa[i], &As[cur][kk][(warp_m * kWarpM + i * 16) * 16], 16);
#pragma unroll
        for (int j = 0; j < kFragN; ++j)
          wmma::load_matrix_sync(fb[j], &Bs[cur][kk][(warp_n * kWarpN + j * 16) * 16], 16);
#pragma unroll
        for (int i = 0; i < kFragM; ++i)
#pragma unroll
          for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      // The other buffer was last read in step kt - 1, which every warp has finished (the
      // __syncthreads that ended it), so it can be overwritten now.
      if (more) {
        *reinterpret_cast<uint4*>(&As[cur ^ 1][lhalf][lrow * 16]) = ra;
        *reinterpret_cast<uint4*>(&Bs[cur ^ 1][lhalf][lrow * 16]) = rb;
      }
      __syncthreads();
    }

    // Epilogue: each fragment goes through the warp's staging tile, then every lane writes 8
    // of its 256 elements (two rows of 16 consecutive columns per 32 lanes).
    int32_t* cs = Cs[warp];
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        wmma::store_matrix_sync(cs, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        // Not unrolled: 64 inlined epilogues would hoist their loads and spill registers.
#pragma unroll 1
        for (int t = 0; t < 8; ++t) {
          const int e = lane + 32 * t, r = e >> 4, c = e & 15;
          const index_t m = m0 + warp_m * kWarpM + i * 16 + r;
          const index_t n = n0 + warp_n * kWarpN + j * 16 + c;
          if (m < p.M && n < p.N) store_out<OutT>(p, m, n, cs[e]);
        }
        __syncwarp();
      }
  }
}

template <typename OutT>
void launch_gemm(const Int8GemmArgs& p, bool vec_w, dim3 grid, cudaStream_t stream) {
  if (vec_w) int8_gemm_kernel<OutT, true><<<grid, kGemmThreads, 0, stream>>>(p);
  else int8_gemm_kernel<OutT, false><<<grid, kGemmThreads, 0, stream>>>(p);
}

}  // namespace

void int8_quantize_rows(const Int8QuantArgs& p, cudaStream_t stream) {
  if (p.rows <= 0) return;
  const dim3 grid(static_cast<unsigned>(p.rows));
  switch (p.x_dtype) {
    case LowbitDtype::kFloat16:
      int8_quantize_rows_kernel<__half><<<grid, kQuantThreads, 0, stream>>>(p);
      break;
    case LowbitDtype::kBFloat16:
      int8_quantize_rows_kernel<__nv_bfloat16><<<grid, kQuantThreads, 0, stream>>>(p);
      break;
    default: int8_quantize_rows_kernel<float><<<grid, kQuantThreads, 0, stream>>>(p); break;
  }
}

void int8_gemm(const Int8GemmArgs& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return;
  const bool vec_w = p.K % 16 == 0 && reinterpret_cast<uintptr_t>(p.w) % 16 == 0;
  // M tiles on x (up to 2^31 - 1), N tiles on y (at most 65535; the kernel loops over more).
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kBM)),
                  static_cast<unsigned>(imin(ceil_div(p.N, kBN), 65535)));
  switch (p.out_dtype) {
    case LowbitDtype::kFloat16: launch_gemm<__half>(p, vec_w, grid, stream); break;
    case LowbitDtype::kBFloat16: launch_gemm<__nv_bfloat16>(p, vec_w, grid, stream); break;
    default: launch_gemm<float>(p, vec_w, grid, stream); break;
  }
}

}  // namespace tilefuse::cuda
