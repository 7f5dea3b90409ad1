// SPDX-License-Identifier: Apache-2.0
// Schemas of the block-sparse attention family. The layout is FlexAttention's compressed rows:
// kv_num_blocks int32 [B|1, H|1, nQ], kv_indices int32 [B|1, H|1, nQ, max] (ascending).
// Inputs [B, S, H, D], or packed [total, H, D] with int32 cu_seqlens [B + 1] (self-attention
// packing: the same boundaries for queries and keys; the layout is per sequence, sized for the
// longest one).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tilefuse, m) {
  m.def(
      "block_sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, "
      "Tensor kv_indices, int block_q, int block_k, bool causal, float scale, "
      "Tensor? cu_seqlens=None) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor kv_num_blocks, Tensor kv_indices, int block_q, "
      "int block_k, bool causal, float scale, Tensor? cu_seqlens=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
