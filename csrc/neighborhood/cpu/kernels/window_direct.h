// SPDX-License-Identifier: Apache-2.0
// The direct backward of disjoint windows (cpu/window_loop.h, window_bwd_direct) and the
// lane-vectorised sliding NA forward (cpu/na_lanes.h): when they apply, and their entry
// points, one per ISA tier (instantiated in window_kernel.cpp).
// Torch-free; included by the CPU adapter and the kernel file.
#pragma once
#include "tilefuse/attention/params.h"
#include "tilefuse/attention/window.h"
#include "tilefuse/cpu/attention.h"

namespace tilefuse::cpu {

/// True when every window is one query tile of at most kAttnTileQ tokens and the windows
/// partition the key grid of every sequence (Swin always; blocked NA when each dilation
/// group's length is a multiple of the kernel on every axis): each query and each key then
/// belongs to exactly one tile. `groups` = number of dilation groups (sequences per batch
/// element). Tile shapes (Args::q_tile) must already be set by the adapter.
inline bool window_bwd_direct_applies(const WindowMask::Args& a, index_t groups) {
  if (!disjoint_windows(a)) return false;
  index_t n = 1;
  for (int ax = 0; ax < 3; ++ax) {
    if (a.q_tile[ax] < a.window[ax]) return false;
    n *= a.window[ax];
  }
  if (n > kAttnTileQ) return false;
  if (a.kind == WindowMask::kSwin) return true;
  for (index_t b = 0; b < groups; ++b) {
    const WindowMask m = WindowMask::make(a, b);
    for (int ax = 0; ax < 3; ++ax)
      if (m.n[ax] % a.kernel[ax] != 0) return false;
  }
  return true;
}

/// True when the forward runs with the queries in vector lanes (cpu/na_lanes.h): sliding
/// neighborhood attention with stride 1 on the innermost axis (any kernel, dilation, causal
/// flags, and stride on the outer axes). Blocked windows keep the single-block path.
inline bool na_lanes_applies(const WindowMask::Args& a) {
  return a.kind == WindowMask::kNeighborhood && a.stride[2] == 1 && !disjoint_windows(a);
}

/// When the lane kernel is also the faster choice (measured with 1 and 2 threads, speed
/// relative to the tile loop: 1.01-1.53x on 56x56 / k 7, 32x32 / k 7, 128x128 / k 13 and
/// 16x32x32 / 3x7x7; 0.91-0.94x in 1-D, where the loop wastes little, and 0.93-0.94x on
/// 32-wide dilation groups with k 13, where half the blocks are border blocks computing up to
/// 2k - 1 offsets).
inline bool na_lanes_preferred(const WindowMask::Args& a, index_t rank) {
  const index_t n2 = ceil_div(a.size[2], a.dilation[2]);
  return na_lanes_applies(a) && rank >= 2 && n2 >= 4 * a.kernel[2];
}

#define TF_DECLARE_WINDOW_DIRECT(ns)                                                        \
  namespace ns {                                                                          \
  template <class T>                                                                      \
  void window_bwd_direct(const AttentionParams<T>& p, const WindowMask::Args& m,           \
                         const WindowExtras<T>& x, index_t n_chunks, const ParallelRunner& r); \
  template <class T>                                                                      \
  void na_fwd_lanes(const AttentionParams<T>& p, const WindowMask::Args& m,                \
                    const WindowExtras<T>& x, const ParallelRunner& r);                   \
  }
TF_DECLARE_WINDOW_DIRECT(generic)
TF_DECLARE_WINDOW_DIRECT(avx2)
#undef TF_DECLARE_WINDOW_DIRECT

}  // namespace tilefuse::cpu
