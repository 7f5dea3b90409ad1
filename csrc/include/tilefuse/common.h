// SPDX-License-Identifier: Apache-2.0
// Torch-free basics shared by the CPU kernels (g++) and the CUDA kernels (nvcc).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif

namespace tilefuse {

using index_t = int64_t;

TF_HD index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }
TF_HD index_t round_up(index_t a, index_t b) { return ceil_div(a, b) * b; }
TF_HD index_t imin(index_t a, index_t b) { return a < b ? a : b; }
TF_HD index_t imax(index_t a, index_t b) { return a > b ? a : b; }

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr double kLog2ed = 1.4426950408889634074;
constexpr double kLn2d = 0.6931471805599453094;

}  // namespace tilefuse
