// SPDX-License-Identifier: Apache-2.0
// Block-sparse layouts (torch-free, shared by the CPU and CUDA kernels).
#pragma once
#include "tilefuse/common.h"

namespace tilefuse {

/// \brief Compressed rows of a block layout, FlexAttention's convention: row r of (b, h) lists
/// counts[b, h, r] ascending block indices in indices[b, h, r, :]. Batch and head dims may be
/// 1 (broadcast).
struct BlockRows {
  const int32_t* counts = nullptr;   // [Bm, Hm, n_rows]
  const int32_t* indices = nullptr;  // [Bm, Hm, n_rows, max_cols]
  index_t Bm = 1, Hm = 1, n_rows = 0, max_cols = 0;

  TF_HD index_t offset(index_t b, index_t h, index_t r) const {
    return ((Bm == 1 ? 0 : b) * Hm + (Hm == 1 ? 0 : h)) * n_rows + r;
  }
  TF_HD index_t count(index_t b, index_t h, index_t r) const { return counts[offset(b, h, r)]; }
  TF_HD index_t at(index_t b, index_t h, index_t r, index_t t) const {
    return indices[offset(b, h, r) * max_cols + t];
  }
};

/// \brief Block-sparse attention over [B, S, H, D] inputs: query block i (rows [i*bq,
/// (i+1)*bq)) attends to the key blocks kv.at(b, h, i, :) (keys [j*bk, (j+1)*bk)); the
/// transposed layout q lists, per key block, the query blocks that attend to it (backward).
/// With causal, elements also need j <= i + Sk - Sq (bottom-right, as tilefuse.attention).
struct BlockSparseArgs {
  BlockRows kv, q;
  index_t bq = 0, bk = 0;
  bool causal = false;
};

}  // namespace tilefuse
