// SPDX-License-Identifier: Apache-2.0
// CUDA launchers of block-sparse attention (BlockRows layouts, optional causal band).
#include "tilefuse/cuda/attention_loop.cuh"

namespace tilefuse::cuda {
using namespace detail;

namespace {
const char* run_block_sparse(const CudaAttentionParams& p, const BlockSparseArgs& a,
                             bool backward, cudaStream_t s) {
  BlockSparseTiles pol;
  pol.args = a;
  return with_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    Tiles tl{};
    size_t bytes = 0;
    if (const char* e = pick_tiles<T, BlockSparseTiles>(p, backward, tl, bytes)) return e;
    const index_t grid_x = backward ? a.q.n_rows * ceil_div(a.bk, tl.BK)
                                    : a.kv.n_rows * ceil_div(a.bq, tl.BQ);
    return launch<T>(p, pol, backward, tl, bytes, grid_x, nullptr, s);
  });
}
}  // namespace

const char* block_sparse_fwd(const CudaAttentionParams& p, const BlockSparseArgs& a,
                             cudaStream_t s) {
  return run_block_sparse(p, a, false, s);
}
const char* block_sparse_bwd(const CudaAttentionParams& p, const BlockSparseArgs& a,
                             cudaStream_t s) {
  return run_block_sparse(p, a, true, s);
}

}  // namespace tilefuse::cuda
