// SPDX-License-Identifier: Apache-2.0
// Instantiates the attention main loop for the dense and band (causal / sliding window) mask
// policies, in float and double. Compiled once per ISA tier (TF_ISA_NS = generic | avx2).
#include "tilefuse/cpu/attention_loop.h"

namespace tilefuse::cpu::TF_ISA_NS {

template <class T>
void transpose_heads(const Operand<T>& src, index_t H, index_t Tn, index_t C, T* dst, index_t ld,
                     const ParallelRunner& r) {
  attn_detail::transpose_heads(src, H, Tn, C, dst, ld, r);
}
template <class T>
void pack_heads(const Operand<T>& src, index_t H, index_t Tn, index_t C, T* dst, index_t width,
                bool panel, const ParallelRunner& r) {
  attn_detail::pack_heads(src, H, Tn, C, dst, width, panel, r);
}
template <class T>
void attention_fwd_dense(const AttentionParams<T>& p, const ParallelRunner& r) {
  attn_detail::attention_fwd<DenseMask>(p, {}, r);
}
template <class T>
void attention_fwd_band(const AttentionParams<T>& p, const BandMask::Args& m,
                        const ParallelRunner& r) {
  attn_detail::attention_fwd<BandMask>(p, m, r);
}
template <class T>
void attention_bwd_dense(const AttentionParams<T>& p, const ParallelRunner& r) {
  attn_detail::attention_bwd<DenseMask>(p, {}, r);
}
template <class T>
void attention_bwd_band(const AttentionParams<T>& p, const BandMask::Args& m,
                        const ParallelRunner& r) {
  attn_detail::attention_bwd<BandMask>(p, m, r);
}

#define TF_INSTANTIATE(T)                                                                 \
  template void transpose_heads<T>(const Operand<T>&, index_t, index_t, index_t, T*, index_t, \
                                   const ParallelRunner&);                                \
  template void pack_heads<T>(const Operand<T>&, index_t, index_t, index_t, T*, index_t, bool, \
                              const ParallelRunner&);                                     \
  template void attention_fwd_dense<T>(const AttentionParams<T>&, const ParallelRunner&); \
  template void attention_fwd_band<T>(const AttentionParams<T>&, const BandMask::Args&,   \
                                      const ParallelRunner&);                             \
  template void attention_bwd_dense<T>(const AttentionParams<T>&, const ParallelRunner&); \
  template void attention_bwd_band<T>(const AttentionParams<T>&, const BandMask::Args&,   \
                                      const ParallelRunner&);
TF_INSTANTIATE(float)
TF_INSTANTIATE(double)
#undef TF_INSTANTIATE

}  // namespace tilefuse::cpu::TF_ISA_NS
