// SPDX-License-Identifier: Apache-2.0
// Entry points of the CPU block-sparse attention kernels, one set per ISA tier.
#pragma once
#include "tilefuse/attention/block_sparse.h"
#include "tilefuse/attention/params.h"

namespace tilefuse::cpu {

#define TF_DECLARE_BLOCK_SPARSE_KERNELS(ns)                                                 \
  namespace ns {                                                                          \
  template <class T>                                                                      \
  void block_sparse_fwd(const AttentionParams<T>& p, const BlockSparseArgs& a,            \
                        const ParallelRunner& r);                                         \
  template <class T>                                                                      \
  void block_sparse_bwd(const AttentionParams<T>& p, const BlockSparseArgs& a,            \
                        const ParallelRunner& r);                                         \
  }
TF_DECLARE_BLOCK_SPARSE_KERNELS(generic)
TF_DECLARE_BLOCK_SPARSE_KERNELS(avx2)
#undef TF_DECLARE_BLOCK_SPARSE_KERNELS

}  // namespace tilefuse::cpu
