# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) implementations and autograd of ``tilefuse::attention_fwd`` / ``attention_bwd``.

The schemas and all argument checks live in C++ (csrc/attention/); the fakes here only compute
output shapes so that ``torch.compile`` can trace through the ops without graph breaks.
"""

import torch


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("tilefuse::attention_fwd")
def _attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                        window_left, window_right, key_mask=None):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("tilefuse::attention_bwd")
def _attention_bwd_fake(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
                        key_mask=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr, key_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, key_mask)
    ctx.args = (max_q, max_k, scale, wl, wr)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, key_mask = ctx.saved_tensors
    max_q, max_k, scale, wl, wr = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.tilefuse.attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, wl, wr, key_mask)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("tilefuse::attention_fwd", _backward, setup_context=_setup_context)
