// SPDX-License-Identifier: Apache-2.0
// CUDA launchers of dense / causal / sliding-window attention (BandMask policy).
#include "tilefuse/cuda/attention_loop.cuh"

namespace tilefuse::cuda {
using namespace detail;

namespace {
const char* run_band(const CudaAttentionParams& p, BandMask::Args m, bool backward,
                     cudaStream_t s) {
  BandTiles pol;
  pol.args = m;
  return with_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    Tiles tl{};
    size_t bytes = 0;
    if (const char* e = pick_tiles<T, BandTiles>(p, backward, tl, bytes)) return e;
    const index_t grid_x = backward ? ceil_div(p.max_sk, tl.BK) : ceil_div(p.max_sq, tl.BQ);
    return launch<T>(p, pol, backward, tl, bytes, grid_x, nullptr, s);
  });
}
}  // namespace

const char* attention_fwd_band(const CudaAttentionParams& p, BandMask::Args m, cudaStream_t s) {
  return run_band(p, m, false, s);
}
const char* attention_bwd_band(const CudaAttentionParams& p, BandMask::Args m, cudaStream_t s) {
  return run_band(p, m, true, s);
}

}  // namespace tilefuse::cuda
