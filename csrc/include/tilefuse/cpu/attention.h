// SPDX-License-Identifier: Apache-2.0
// Entry points of the CPU attention kernels, one set per ISA tier (see csrc/cpu_isa.cpp),
// instantiated for T = float and double in csrc/attention/cpu/kernels/attention_kernel.cpp.
#pragma once
#include "tilefuse/attention/mask.h"
#include "tilefuse/attention/params.h"

namespace tilefuse::cpu {

/// Query and key tile sizes of the CPU main loop (rows of Q, columns of K^T per step).
constexpr index_t kAttnTileQ = 64;
constexpr index_t kAttnTileK = 128;

#define TF_DECLARE_ATTENTION_KERNELS(ns)                                                       \
  namespace ns {                                                                             \
  /* dst[h][c][t] = src(h, t, c) for t < Tn, zeros in columns [Tn, Tn + 16); ld >= Tn + 16. */ \
  template <class T>                                                                         \
  void transpose_heads(const Operand<T>& src, index_t H, index_t Tn, index_t C, T* dst,       \
                       index_t ld, const ParallelRunner& r);                                 \
  /* Per-head repack: dst[(h Tn + t) width + c] (head-major rows), or with panel             \
     dst[((h (width / 16) + c / 16) Tn + t) 16 + c % 16] (16-column panels); zeros past C. */ \
  template <class T>                                                                         \
  void pack_heads(const Operand<T>& src, index_t H, index_t Tn, index_t C, T* dst,            \
                  index_t width, bool panel, const ParallelRunner& r);                       \
  template <class T>                                                                         \
  void attention_fwd_dense(const AttentionParams<T>& p, const ParallelRunner& r);            \
  template <class T>                                                                         \
  void attention_fwd_band(const AttentionParams<T>& p, const BandMask::Args& m,               \
                          const ParallelRunner& r);                                          \
  template <class T>                                                                         \
  void attention_bwd_dense(const AttentionParams<T>& p, const ParallelRunner& r);            \
  template <class T>                                                                         \
  void attention_bwd_band(const AttentionParams<T>& p, const BandMask::Args& m,               \
                          const ParallelRunner& r);                                          \
  }
TF_DECLARE_ATTENTION_KERNELS(generic)
TF_DECLARE_ATTENTION_KERNELS(avx2)
#undef TF_DECLARE_ATTENTION_KERNELS

}  // namespace tilefuse::cpu
