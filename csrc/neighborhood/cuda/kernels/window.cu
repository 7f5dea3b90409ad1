// SPDX-License-Identifier: Apache-2.0
// CUDA launchers of neighborhood attention and Swin windows (WindowMask policy).
#include "tilefuse/cuda/attention_loop.cuh"

namespace tilefuse::cuda {
using namespace detail;

namespace {

/// Spatial tile shapes for CTA tiles of BQ queries / BK keys: disjoint windows (Swin, blocked
/// NA: the caller sets args.window) get one window per tile where it fits; overlapping
/// neighborhoods get rows of 8 along the last axis (1-D: the whole tile along it).
void set_tiles(WindowMask::Args& a, int BQ, int BK) {
  if (disjoint_windows(a)) {
    fit_window_tile(a.window, BQ, a.q_tile);
    fit_window_tile(a.window, BK, a.k_tile);
    return;
  }
  const bool one_d = a.size[0] == 1 && a.size[1] == 1;
  const index_t q[3] = {1, one_d ? 1 : BQ / 8, one_d ? BQ : 8};
  const index_t k[3] = {1, one_d ? 1 : BK / 8, one_d ? BK : 8};
  for (int ax = 0; ax < 3; ++ax) {
    a.q_tile[ax] = q[ax];
    a.k_tile[ax] = k[ax];
  }
}

const char* run_window(const CudaAttentionParams& p, WindowMask::Args a, const CudaWindowBias& x,
                       bool backward, cudaStream_t s) {
  return with_dtype(p.dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    Tiles tl{};
    size_t bytes = 0;
    if (const char* e = pick_tiles<T, WindowTiles>(p, backward, tl, bytes)) return e;
    WindowTiles pol;
    pol.args = a;
    set_tiles(pol.args, tl.BQ, tl.BK);
    pol.bias_table = x.bias;
    for (int ax = 0; ax < 3; ++ax) pol.R[ax] = x.R[ax];
    // Tile counts depend only on the dilation group: sequences b and b + G share them.
    const index_t G = a.dilation[0] * a.dilation[1] * a.dilation[2];
    index_t grid_x = 0;
    for (index_t b = 0; b < imin(p.B, G); ++b) {
      const WindowMask m = WindowMask::make(pol.args, b);
      grid_x = imax(grid_x, backward ? m.num_key_tiles() : m.num_query_tiles());
    }
    return launch<T>(p, pol, backward, tl, bytes, grid_x, x.dbias, s);
  });
}

}  // namespace

const char* window_fwd(const CudaAttentionParams& p, WindowMask::Args a, const CudaWindowBias& x,
                       cudaStream_t s) {
  return run_window(p, a, x, false, s);
}
const char* window_bwd(const CudaAttentionParams& p, WindowMask::Args a, const CudaWindowBias& x,
                       cudaStream_t s) {
  return run_window(p, a, x, true, s);
}

}  // namespace tilefuse::cuda
