// SPDX-License-Identifier: Apache-2.0
// CUDA 4-bit kernels (nf4 / fp4 / e2m1 / int4, bitsandbytes' layout): blockwise quantisation,
// the 8-bit blockwise quantiser of double quantisation, dequantisation, and the fused
// dequantise-GEMV of linear_4bit for up to 8 activation rows, and the fused dequantise-GEMM for
// more rows with fp16 / bf16 activations. Torch-free.
//
// Quantisers are bit-identical to the CPU ones (csrc/lowbit/cpu/kernels/quant_kernel.cpp): the
// same fp32 operations, written with _rn intrinsics so that no FMA contraction or fast-math
// flag can change a rounding, and order-independent reductions (max / min ignoring NaN).
// Dequantisation uses the same expressions as the CPU (table[q] * s, (q - zero) * s, and the
// two-rounding nested scale of formats.h), so it is bit-identical too.
//
// GEMV (M <= 8): one warp per two output rows (8 warps, 16 rows per CTA). Fast path (K % 32 ==
// 0, 16-byte aligned packed weights and activations): lane l reads the 16-byte pieces l,
// l + 32, ... of each row (coalesced 512-byte warp loads, both rows' pieces in flight
// together); a piece is 32 codes of one quantisation block (blocks are >= 32 and 32-aligned),
// so one scale per piece. Nibbles are decoded through the 16-entry table held in shared memory
// (16 words in 16 distinct banks: conflict-free), the 32 products with each activation row are
// summed in fp32 and scaled once per piece (int4: (q - zero) is an exact small integer), and the
// lanes' partial sums are reduced with warp shuffles. The activations are read straight from
// global memory (16-byte loads, L1-resident across the CTA's warps). Any other shape (K % 32 !=
// 0, blocks that start mid-byte, unaligned pointers) takes the element-wise path: lane l
// handles columns l, l + 32, ... with the block index and scale taken per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "tilefuse/cuda/float_convert.cuh"
#include "tilefuse/cuda/lowbit.h"

namespace tilefuse::cuda {
namespace {

using lowbit::Fmt4;

constexpr int kThreads = 256, kWarps = kThreads / 32;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u < v ? u : v;
  }
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// The code of v in its block, as the CPU quantiser's code_of: nf4 / fp4 quantise v times the
/// fp32 reciprocal of the absmax, e2m1 v divided by the power-of-two scale, int4
/// clamp(rint(v / scale) + zero, 0, 15).
__device__ __forceinline__ int code_of(Fmt4 fmt, float v, float inv, float scale, int zp) {
  switch (fmt) {
    case Fmt4::kInt4: {
      if (!(scale > 0.0f)) return 0;
      float q = __fadd_rn(rintf(__fdiv_rn(v, scale)), static_cast<float>(zp));
      q = q < 0.0f ? 0.0f : (q > 15.0f ? 15.0f : q);
      return static_cast<int>(q);
    }
    case Fmt4::kE2M1: return lowbit::e2m1_quantize(__fdiv_rn(v, scale));
    case Fmt4::kNF4: return lowbit::nf4_quantize(__fmul_rn(v, inv));
    default: return lowbit::fp4_quantize(__fmul_rn(v, inv));
  }
}

/// One warp per quantisation block.
__global__ void __launch_bounds__(kThreads)
    quantize_4bit_kernel(const float* __restrict__ x, index_t n, int lb, Fmt4 fmt,
                         uint8_t* __restrict__ packed, float* __restrict__ absmax,
                         uint8_t* __restrict__ zero, index_t nblocks) {
  const index_t b = index_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (b >= nblocks) return;  // whole warps: b is the same for all 32 lanes
  const index_t e0 = b << lb, e1 = imin(n, e0 + (index_t(1) << lb));
  float amax = 0.0f, mn = 0.0f, mx = 0.0f;
  for (index_t e = e0 + lane; e < e1; e += 32) {
    const float v = x[e], a = fabsf(v);
    amax = a > amax ? a : amax;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  amax = warp_max(amax);
  mn = warp_min(mn);
  mx = warp_max(mx);
  float inv = 0.0f, scale = 0.0f;
  int zp = 0;
  if (fmt == Fmt4::kInt4) {
    // Range widened to include 0 so that 0 is exact and zero lies in [0, 15].
    scale = __fdiv_rn(__fsub_rn(mx, mn), 15.0f);
    if (scale > 0.0f) {
      zp = static_cast<int>(rintf(__fdiv_rn(-mn, scale)));
      zp = zp < 0 ? 0 : (zp > 15 ? 15 : zp);
    }
    if (lane == 0) {
      absmax[b] = scale;
      zero[b] = static_cast<uint8_t>(zp);
    }
  } else if (fmt == Fmt4::kE2M1) {
    scale = lowbit::exp2_int(lowbit::e2m1_block_exponent(amax));
    if (lane == 0) absmax[b] = scale;
  } else {
    if (lane == 0) absmax[b] = amax;
    inv = amax > 0.0f ? __fdiv_rn(1.0f, amax) : 0.0f;
  }
  // Byte jb holds elements 2 jb (high nibble) and 2 jb + 1; e0 is even (block >= 32).
  for (index_t jb = (e0 >> 1) + lane; 2 * jb < e1; jb += 32) {
    const index_t e = 2 * jb;
    const int hi = code_of(fmt, x[e], inv, scale, zp);
    // An odd total length pads the last byte with the code of 0.0 (as the CPU / bitsandbytes).
    const int lo = code_of(fmt, e + 1 < e1 ? x[e + 1] : 0.0f, inv, scale, zp);
    packed[jb] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

/// One warp per block; the 256-entry code in shared memory (blockDim == 256).
__global__ void __launch_bounds__(kThreads)
    quantize_blockwise8_kernel(const float* __restrict__ x, index_t n, int lb,
                               const float* __restrict__ code, uint8_t* __restrict__ q,
                               float* __restrict__ absmax, index_t nblocks) {
  static_assert(kThreads == 256, "one thread per code entry");
  __shared__ float code_s[256];
  code_s[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const index_t b = index_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (b >= nblocks) return;
  const index_t e0 = b << lb, e1 = imin(n, e0 + (index_t(1) << lb));
  float amax = 0.0f;
  for (index_t e = e0 + lane; e < e1; e += 32) {
    const float a = fabsf(x[e]);
    amax = a > amax ? a : amax;
  }
  amax = warp_max(amax);
  if (lane == 0) absmax[b] = amax;
  const float inv = amax > 0.0f ? __fdiv_rn(1.0f, amax) : 0.0f;
  for (index_t e = e0 + lane; e < e1; e += 32)
    q[e] = static_cast<uint8_t>(lowbit::dynamic8_quantize(code_s, __fmul_rn(x[e], inv)));
}

/// Value of a code: table[q] * s, or (q - zero) * s for int4 (one rounding: q - zero is an
/// exact small integer), the CPU's expressions.
__device__ __forceinline__ float dequant_value(float t, float z, float s, bool int4) {
  return int4 ? __fmul_rn(__fsub_rn(t, z), s) : __fmul_rn(t, s);
}

/// One packed byte (two elements) per thread, grid-stride.
template <typename OutT>
__global__ void __launch_bounds__(kThreads) dequantize_4bit_kernel(Fourbit4 w, OutT* out) {
  __shared__ float tab[16];
  if (threadIdx.x < 16) tab[threadIdx.x] = lowbit::code4_value(w.fmt, int(threadIdx.x));
  __syncthreads();
  const index_t n = w.N * w.K, nbytes = (n + 1) / 2;
  const bool int4 = w.fmt == Fmt4::kInt4;
  const index_t stride = index_t(gridDim.x) * kThreads;
  for (index_t jb = index_t(blockIdx.x) * kThreads + threadIdx.x; jb < nbytes; jb += stride) {
    const uint32_t byte = w.packed[jb];
    const index_t e = 2 * jb, b = e >> w.block_shift;  // both elements are in block b
    const float s = w.scale(b);
    const float z = int4 ? static_cast<float>(w.zero[b]) : 0.0f;
    out[e] = from_float<OutT>(dequant_value(tab[byte >> 4], z, s, int4));
    if (e + 1 < n) out[e + 1] = from_float<OutT>(dequant_value(tab[byte & 15u], z, s, int4));
  }
}

// ------------------------------------------------------------------------------------ GEMV

constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;

/// 32 consecutive activations (16-byte aligned) as floats.
__device__ __forceinline__ void load32(const float* src, float (&v)[32]) {
  const float4* s = reinterpret_cast<const float4*>(src);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 t = __ldg(s + i);
    v[4 * i] = t.x;
    v[4 * i + 1] = t.y;
    v[4 * i + 2] = t.z;
    v[4 * i + 3] = t.w;
  }
}
__device__ __forceinline__ void load32(const __half* src, float (&v)[32]) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 t = __ldg(s + i);
    const __half2* h = reinterpret_cast<const __half2*>(&t);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(h[j]);
      v[8 * i + 2 * j] = f.x;
      v[8 * i + 2 * j + 1] = f.y;
    }
  }
}
__device__ __forceinline__ void load32(const __nv_bfloat16* src, float (&v)[32]) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 t = __ldg(s + i);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&t);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(h[j]);
      v[8 * i + 2 * j] = f.x;
      v[8 * i + 2 * j + 1] = f.y;
    }
  }
}

/// out[m, n] for m < p.M <= MR and the kRowsPerWarp rows n of each warp.
template <typename T, int MR, bool kFast>
__global__ void __launch_bounds__(kThreads) linear_4bit_gemv_kernel(Linear4bitGemvArgs p) {
  __shared__ float tab[16];
  if (threadIdx.x < 16) tab[threadIdx.x] = lowbit::code4_value(p.w.fmt, int(threadIdx.x));
  __syncthreads();
  const Fourbit4& w = p.w;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const index_t n_first = (index_t(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  const T* x = static_cast<const T*>(p.x);
  const bool int4 = w.fmt == Fmt4::kInt4;
  float acc[kRowsPerWarp][MR];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[r][m] = 0.0f;

  if constexpr (kFast) {
    const index_t nchunks = w.K >> 5;  // 32 codes = 16 bytes per chunk
    for (index_t c = lane; c < nchunks; c += 32) {
      uint4 raw[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const index_t n = n_first + r;
        raw[r] = n < w.N ? __ldg(reinterpret_cast<const uint4*>(w.packed + ((n * w.K) >> 1)) + c)
                         : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const index_t n = n_first + r;
        if (n >= w.N) break;  // uniform across the warp
        const index_t b = (n * w.K + (c << 5)) >> w.block_shift;  // the chunk's block
        const float s = w.scale(b);
        const float z = int4 ? static_cast<float>(w.zero[b]) : 0.0f;
        const uint32_t words[4] = {raw[r].x, raw[r].y, raw[r].z, raw[r].w};
        float wv[32];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            // Byte 4 i + t (little endian) holds elements 8 i + 2 t (high nibble) and + 1.
            const uint32_t byte = (words[i] >> (8 * t)) & 0xffu;
            wv[8 * i + 2 * t] = tab[byte >> 4] - z;
            wv[8 * i + 2 * t + 1] = tab[byte & 15u] - z;
          }
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m >= p.M) break;
          float xv[32];
          load32(x + m * p.ldx + (c << 5), xv);
          float part = 0.0f;
#pragma unroll
          for (int j = 0; j < 32; ++j) part = fmaf(wv[j], xv[j], part);
          acc[r][m] = fmaf(part, s, acc[r][m]);
        }
      }
    }
  } else {
    for (index_t k = lane; k < w.K; k += 32) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const index_t n = n_first + r;
        if (n >= w.N) break;
        const index_t f = n * w.K + k, b = f >> w.block_shift;
        const uint32_t byte = w.packed[f >> 1];
        const uint32_t q = (f & 1) ? (byte & 15u) : (byte >> 4);
        const float z = int4 ? static_cast<float>(w.zero[b]) : 0.0f;
        const float wk = (tab[q] - z) * w.scale(b);
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          if (m >= p.M) break;
          acc[r][m] = fmaf(wk, to_float(x[m * p.ldx + k]), acc[r][m]);
        }
      }
    }
  }

  // Every lane takes part in the reductions (rows past N contribute zeros).
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const index_t n = n_first + r;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      float v = warp_sum(acc[r][m]);
      if (lane == 0 && n < w.N && m < p.M) {
        if (p.bias != nullptr) v += p.bias[n];
        static_cast<T*>(p.out)[m * w.N + n] = from_float<T>(v);
      }
    }
  }
}

template <typename T, bool kFast>
void launch_gemv_path(const Linear4bitGemvArgs& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.w.N, kRowsPerCta)));
  if (p.M <= 1) linear_4bit_gemv_kernel<T, 1, kFast><<<grid, kThreads, 0, stream>>>(p);
  else if (p.M <= 2) linear_4bit_gemv_kernel<T, 2, kFast><<<grid, kThreads, 0, stream>>>(p);
  else if (p.M <= 4) linear_4bit_gemv_kernel<T, 4, kFast><<<grid, kThreads, 0, stream>>>(p);
  else linear_4bit_gemv_kernel<T, 8, kFast><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_gemv(const Linear4bitGemvArgs& p, cudaStream_t stream) {
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool fast = p.w.K % 32 == 0 && aligned(p.w.packed) && aligned(p.x) &&
                    (p.ldx * index_t(sizeof(T))) % 16 == 0;
  if (fast) launch_gemv_path<T, true>(p, stream);
  else launch_gemv_path<T, false>(p, stream);
}

// ------------------------------------------------------------------------------------ GEMM

// Fused dequantise-GEMM (M > 8, fp16 / bf16 activations): CTA tile 64 (M) x 64 (N) x 32 (K),
// 4 warps as 2 x 2, each 32 x 32 = 2 x 2 wmma fragments (16x16x16, fp32 accumulation). Per K
// step the CTA stages x[64 x 32] and the decoded weights w[64 x 32] (rows of the [N, K] weight:
// a col-major matrix_b, so the product is x . w^T without repacking) in shared memory; each
// weight is table[q] * scale (int4: (q - zero) * scale) in fp32, rounded once to the
// activation dtype, exactly as the dequantise + cuBLAS path would see it. Loads past M, N, K
// are zeros. The weight bytes are read once per CTA row of the grid (M / 64 times in all)
// instead of materialising an [N, K] copy per call.
constexpr int kGM = 64, kGN = 64, kGK = 32, kGThreads = 128, kGLd = kGK + 8;

template <typename T>
__global__ void __launch_bounds__(kGThreads) linear_4bit_gemm_kernel(Linear4bitGemvArgs p) {
  using namespace nvcuda;
  __shared__ __align__(128) T As[kGM * kGLd];
  __shared__ __align__(128) T Bs[kGN * kGLd];
  __shared__ __align__(128) float Cs[kGThreads / 32][16 * 16];
  __shared__ float tab[16];
  const Fourbit4& w = p.w;
  if (threadIdx.x < 16) tab[threadIdx.x] = lowbit::code4_value(w.fmt, int(threadIdx.x));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp >> 1, wn = warp & 1;
  const index_t m0 = index_t(blockIdx.x) * kGM, n0 = index_t(blockIdx.y) * kGN;
  const bool int4 = w.fmt == Fmt4::kInt4;
  const T* x = static_cast<const T*>(p.x);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  __syncthreads();  // tab
  for (index_t k0 = 0; k0 < w.K; k0 += kGK) {
    for (int e = tid; e < kGM * kGK; e += kGThreads) {
      const int r = e / kGK, c = e % kGK;
      const index_t m = m0 + r, k = k0 + c;
      As[r * kGLd + c] = (m < p.M && k < w.K) ? x[m * p.ldx + k] : from_float<T>(0.0f);
    }
    for (int e = tid; e < kGN * kGK; e += kGThreads) {
      const int r = e / kGK, c = e % kGK;
      const index_t n = n0 + r, k = k0 + c;
      float v = 0.0f;
      if (n < w.N && k < w.K) {
        const index_t flat = n * w.K + k, b = flat >> w.block_shift;
        const uint32_t byte = w.packed[flat >> 1];
        const uint32_t code = (flat & 1) ? (byte & 15u) : (byte >> 4);
        v = dequant_value(tab[code], int4 ? static_cast<float>(w.zero[b]) : 0.0f, w.scale(b),
                          int4);
      }
      Bs[r * kGLd + c] = from_float<T>(v);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], As + (wm * 32 + i * 16) * kGLd + kk, kGLd);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], Bs + (wn * 32 + j * 16) * kGLd + kk, kGLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // As / Bs are rewritten by the next K step
  }
  T* out = static_cast<T*>(p.out);
  float* cs = Cs[warp];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(cs, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const index_t m = m0 + wm * 32 + i * 16 + e / 16, n = n0 + wn * 32 + j * 16 + e % 16;
        if (m < p.M && n < w.N) {
          const float bias = p.bias != nullptr ? p.bias[n] : 0.0f;
          out[m * w.N + n] = from_float<T>(cs[e] + bias);
        }
      }
      __syncwarp();
    }
}

int log2_pow2(index_t v) {
  int l = 0;
  while ((index_t(1) << l) < v) ++l;
  return l;
}

}  // namespace

void quantize_4bit(const float* x, index_t n, index_t block, Fmt4 fmt, uint8_t* packed,
                   float* absmax, uint8_t* zero, cudaStream_t stream) {
  if (n <= 0) return;
  const index_t nblocks = ceil_div(n, block);
  const dim3 grid(static_cast<unsigned>(ceil_div(nblocks, kWarps)));
  quantize_4bit_kernel<<<grid, kThreads, 0, stream>>>(x, n, log2_pow2(block), fmt, packed,
                                                      absmax, zero, nblocks);
}

void quantize_blockwise8(const float* x, index_t n, index_t block, const float* code, uint8_t* q,
                         float* absmax, cudaStream_t stream) {
  if (n <= 0) return;
  const index_t nblocks = ceil_div(n, block);
  const dim3 grid(static_cast<unsigned>(ceil_div(nblocks, kWarps)));
  quantize_blockwise8_kernel<<<grid, kThreads, 0, stream>>>(x, n, log2_pow2(block), code, q,
                                                            absmax, nblocks);
}

void dequantize_4bit(const Fourbit4& w, void* out, LowbitDtype out_dtype, cudaStream_t stream) {
  const index_t nbytes = (w.N * w.K + 1) / 2;
  if (w.N * w.K <= 0) return;
  const dim3 grid(static_cast<unsigned>(imin(ceil_div(nbytes, kThreads), index_t(1) << 20)));
  switch (out_dtype) {
    case LowbitDtype::kFloat16:
      dequantize_4bit_kernel<<<grid, kThreads, 0, stream>>>(w, static_cast<__half*>(out));
      break;
    case LowbitDtype::kBFloat16:
      dequantize_4bit_kernel<<<grid, kThreads, 0, stream>>>(w, static_cast<__nv_bfloat16*>(out));
      break;
    default: dequantize_4bit_kernel<<<grid, kThreads, 0, stream>>>(w, static_cast<float*>(out));
  }
}

void linear_4bit_gemm(const Linear4bitGemvArgs& p, cudaStream_t stream) {
  if (p.M <= 0 || p.w.N <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kGM)),
                  static_cast<unsigned>(ceil_div(p.w.N, kGN)));
  if (p.dtype == LowbitDtype::kFloat16)
    linear_4bit_gemm_kernel<__half><<<grid, kGThreads, 0, stream>>>(p);
  else if (p.dtype == LowbitDtype::kBFloat16)
    linear_4bit_gemm_kernel<__nv_bfloat16><<<grid, kGThreads, 0, stream>>>(p);
}

void linear_4bit_gemv(const Linear4bitGemvArgs& p, cudaStream_t stream) {
  if (p.M <= 0 || p.w.N <= 0) return;
  switch (p.dtype) {
    case LowbitDtype::kFloat16: launch_gemv<__half>(p, stream); break;
    case LowbitDtype::kBFloat16: launch_gemv<__nv_bfloat16>(p, stream); break;
    default: launch_gemv<float>(p, stream); break;
  }
}

}  // namespace tilefuse::cuda
