// SPDX-License-Identifier: Apache-2.0
// Register-blocked GEMM for attention tiles: C[m x n] (op)= A[m x k] * B[k x n].
// A is addressed as a[i * a_rs + p * a_cs] (so P and P^T are both free), B is row-major with
// leading dimension ldb and n a multiple of 16 (callers pad feature dims), or panel-major
// (b_ps > 0: columns [16 q, 16 q + 16) are a [k, 16] panel at b + q * b_ps, ldb = 16, which
// keeps a panel's rows on consecutive cache lines), C row-major.
// Micro-kernel 6 x (2 vectors): for fp32 6x16 = 12 accumulators + 2 B vectors + 1 broadcast,
// 15 of the 16 ymm registers.
#pragma once
#include "tilefuse/common.h"
#include "tilefuse/cpu/vec.h"

namespace tilefuse::cpu {

/// kStore: C = A*B; kStoreScaled: C = row_scale[0] * A*B (one scalar for all rows);
/// kAccumulate: C += A*B; kScaleAccumulate: C = diag(row_scale) * C + A*B.
enum class GemmOut { kStore, kStoreScaled, kAccumulate, kScaleAccumulate };

template <class T, int MR, GemmOut OUT>
static inline void gemm_block(index_t k, const T* a, index_t a_rs, index_t a_cs, const T* b,
                              index_t ldb, T* c, index_t ldc, const T* row_scale) {
  constexpr int W = VecTraits<T>::W;
  vec_t<T> acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    if constexpr (OUT == GemmOut::kStore || OUT == GemmOut::kStoreScaled) {
      acc0[i] = vec_t<T>{};
      acc1[i] = vec_t<T>{};
    } else {
      acc0[i] = loadv(c + i * ldc);
      acc1[i] = loadv(c + i * ldc + W);
      if constexpr (OUT == GemmOut::kScaleAccumulate) {
        acc0[i] *= row_scale[i];
        acc1[i] *= row_scale[i];
      }
    }
  }
  for (index_t p = 0; p < k; ++p) {
    const vec_t<T> b0 = loadv(b + p * ldb), b1 = loadv(b + p * ldb + W);
    const T* ap = a + p * a_cs;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const T s = ap[i * a_rs];
      acc0[i] += s * b0;
      acc1[i] += s * b1;
    }
  }
  if constexpr (OUT == GemmOut::kStoreScaled) {
    const T sc = row_scale[0];
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      acc0[i] *= sc;
      acc1[i] *= sc;
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    storev(c + i * ldc, acc0[i]);
    storev(c + i * ldc + W, acc1[i]);
  }
}

/// \brief C (op)= A*B, see GemmOut. n must be a multiple of 16; m and k are arbitrary (k = 0 is allowed).
template <GemmOut OUT, class T>
static inline void gemm(index_t m, index_t n, index_t k, const T* a, index_t a_rs, index_t a_cs,
                        const T* b, index_t ldb, T* c, index_t ldc,
                        const T* row_scale = nullptr, index_t b_ps = 0) {
  constexpr int NR = 2 * VecTraits<T>::W;
  for (index_t j = 0; j < n; j += NR) {
    const T* bj = b_ps > 0 ? b + (j / 16) * b_ps + j % 16 : b + j;
    index_t i = 0;
    constexpr bool per_row = OUT == GemmOut::kScaleAccumulate;
    for (; i + 6 <= m; i += 6)
      gemm_block<T, 6, OUT>(k, a + i * a_rs, a_rs, a_cs, bj, ldb, c + i * ldc + j, ldc,
                            per_row ? row_scale + i : row_scale);
    const T* ai = a + i * a_rs;
    T* ci = c + i * ldc + j;
    const T* rs = per_row ? row_scale + i : row_scale;
    switch (m - i) {
      case 5: gemm_block<T, 5, OUT>(k, ai, a_rs, a_cs, bj, ldb, ci, ldc, rs); break;
      case 4: gemm_block<T, 4, OUT>(k, ai, a_rs, a_cs, bj, ldb, ci, ldc, rs); break;
      case 3: gemm_block<T, 3, OUT>(k, ai, a_rs, a_cs, bj, ldb, ci, ldc, rs); break;
      case 2: gemm_block<T, 2, OUT>(k, ai, a_rs, a_cs, bj, ldb, ci, ldc, rs); break;
      case 1: gemm_block<T, 1, OUT>(k, ai, a_rs, a_cs, bj, ldb, ci, ldc, rs); break;
      default: break;
    }
  }
}

}  // namespace tilefuse::cpu
