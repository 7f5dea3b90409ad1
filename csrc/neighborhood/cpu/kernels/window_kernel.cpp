// SPDX-License-Identifier: Apache-2.0
// Instantiates the attention main loop's spatial driver for the window policy (neighborhood
// attention and Swin windows), in float and double. Compiled once per ISA tier.
#include "tilefuse/cpu/window.h"
#include "tilefuse/cpu/window_loop.h"
#include "tilefuse/cpu/na_lanes.h"
#include "window_direct.h"

namespace tilefuse::cpu::TF_ISA_NS {

template <class T>
void window_fwd(const AttentionParams<T>& p, const WindowMask::Args& m, const WindowExtras<T>& x,
                const ParallelRunner& r) {
  attn_detail::window_fwd(p, m, x, r);
}
template <class T>
void window_bwd(const AttentionParams<T>& p, const WindowMask::Args& m, const WindowExtras<T>& x,
                const ParallelRunner& r) {
  attn_detail::window_bwd(p, m, x, r);
}

template <class T>
void window_bwd_direct(const AttentionParams<T>& p, const WindowMask::Args& m,
                       const WindowExtras<T>& x, index_t n_chunks, const ParallelRunner& r) {
  attn_detail::window_bwd_direct(p, m, x, n_chunks, r);
}

template <class T>
void na_fwd_lanes(const AttentionParams<T>& p, const WindowMask::Args& m,
                  const WindowExtras<T>& x, const ParallelRunner& r) {
  attn_detail::na_fwd_lanes(p, m, x, r);
}

#define TF_INSTANTIATE(T)                                                                    \
  template void window_fwd<T>(const AttentionParams<T>&, const WindowMask::Args&,            \
                              const WindowExtras<T>&, const ParallelRunner&);                \
  template void window_bwd<T>(const AttentionParams<T>&, const WindowMask::Args&,            \
                              const WindowExtras<T>&, const ParallelRunner&);                \
  template void window_bwd_direct<T>(const AttentionParams<T>&, const WindowMask::Args&,     \
                                     const WindowExtras<T>&, index_t, const ParallelRunner&); \
  template void na_fwd_lanes<T>(const AttentionParams<T>&, const WindowMask::Args&,          \
                                const WindowExtras<T>&, const ParallelRunner&);
TF_INSTANTIATE(float)
TF_INSTANTIATE(double)
#undef TF_INSTANTIATE

}  // namespace tilefuse::cpu::TF_ISA_NS
