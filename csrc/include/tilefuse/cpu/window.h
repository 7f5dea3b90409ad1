// SPDX-License-Identifier: Apache-2.0
// Entry points of the CPU window-attention kernels (neighborhood attention and Swin windows
// through the attention main loop), one set per ISA tier, instantiated for float and double
// in csrc/neighborhood/cpu/kernels/window_kernel.cpp.
#pragma once
#include "tilefuse/attention/params.h"
#include "tilefuse/attention/window.h"

namespace tilefuse::cpu {

#define TF_DECLARE_WINDOW_KERNELS(ns)                                                     \
  namespace ns {                                                                        \
  template <class T>                                                                    \
  void window_fwd(const AttentionParams<T>& p, const WindowMask::Args& m,                \
                  const WindowExtras<T>& x, const ParallelRunner& r);                   \
  template <class T>                                                                    \
  void window_bwd(const AttentionParams<T>& p, const WindowMask::Args& m,                \
                  const WindowExtras<T>& x, const ParallelRunner& r);                   \
  }
TF_DECLARE_WINDOW_KERNELS(generic)
TF_DECLARE_WINDOW_KERNELS(avx2)
#undef TF_DECLARE_WINDOW_KERNELS

}  // namespace tilefuse::cpu
