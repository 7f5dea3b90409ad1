// SPDX-License-Identifier: Apache-2.0
// Schemas of the dense attention family. Causal is folded into window_right = 0 by the
// Python API; window_left/window_right = -1 mean unbounded. max_seqlen_* = -1 means unknown.
// key_mask: optional bool [batch, seq_k], True = the key is attended (padding masks).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tilefuse, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
      "Tensor? key_mask=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, int window_left, int window_right, Tensor? key_mask=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
