# SPDX-License-Identifier: Apache-2.0
"""Fake implementations and autograd of the block-sparse attention ops."""

import torch


@torch.library.register_fake("tilefuse::block_sparse_attention_fwd")
def _bs_fwd_fake(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale,
                 cu_seqlens=None):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.register_fake("tilefuse::block_sparse_attention_bwd")
def _bs_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, kv_num_blocks, kv_indices, block_q,
                 block_k, causal, scale, cu_seqlens=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, counts, indices, bq, bk, causal, scale, cu = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], counts, indices, cu)
    ctx.args = (bq, bk, causal, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, counts, indices, cu = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.tilefuse.block_sparse_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, counts, indices, *ctx.args, cu)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("tilefuse::block_sparse_attention_fwd", _backward,
                                setup_context=_setup_context)
