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
/// flags, and stride on the outer axes). Blocked windows keep the single-block path. Wherever
/// it applies it is also the faster forward (session 6, avx2 tier, lanes / tile-loop time, one
/// and two threads: 0.53-0.92 on 2-D rows of 14 to 128 with k 7 and 13, 0.55-0.96 in 3-D,
/// 0.60-1.00 in 1-D (4096 / k 31 equal), 0.73-0.99 on dilation groups of 16 and 32 with k 13).
inline bool na_lanes_applies(const WindowMask::Args& a) {
  return a.kind == WindowMask::kNeighborhood && a.stride[2] == 1 && !disjoint_windows(a);
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
