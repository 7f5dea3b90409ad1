// SPDX-License-Identifier: Apache-2.0
// Block-sparse attention kernels (float, double), compiled once per ISA tier.
#include "tilefuse/cpu/block_sparse.h"
#include "tilefuse/cpu/block_sparse_loop.h"

namespace tilefuse::cpu::TF_ISA_NS {

template <class T>
void block_sparse_fwd(const AttentionParams<T>& p, const BlockSparseArgs& a,
                      const ParallelRunner& r) {
  attn_detail::block_sparse_fwd(p, a, r);
}
template <class T>
void block_sparse_bwd(const AttentionParams<T>& p, const BlockSparseArgs& a,
                      const ParallelRunner& r) {
  attn_detail::block_sparse_bwd(p, a, r);
}

template void block_sparse_fwd<float>(const AttentionParams<float>&, const BlockSparseArgs&,
                                      const ParallelRunner&);
template void block_sparse_fwd<double>(const AttentionParams<double>&, const BlockSparseArgs&,
                                       const ParallelRunner&);
template void block_sparse_bwd<float>(const AttentionParams<float>&, const BlockSparseArgs&,
                                      const ParallelRunner&);
template void block_sparse_bwd<double>(const AttentionParams<double>&, const BlockSparseArgs&,
                                       const ParallelRunner&);

}  // namespace tilefuse::cpu::TF_ISA_NS
