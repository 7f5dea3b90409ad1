# SPDX-License-Identifier: Apache-2.0
"""Reference block-sparse attention: the block mask expanded to elements, then plain attention."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .attention import band_mask, masked_attention


def block_sparse_element_mask(block_mask, causal: bool = False) -> torch.Tensor:
    """Bool ``[B|1, H|1, Sq, Sk]`` in the callers' token order.

    Element (i, j) is visible iff its block is in the layout and, with ``causal``, j <= i +
    Sk - Sq. For spatial tiles (``from_tiles``) blocks and the causal test live in the
    tile-major order, mapped back to the row-major tokens here.
    """
    bq, bk = block_mask.block_size
    sq, sk = block_mask.seq_lens
    layout = block_mask.to_dense()
    el = layout.repeat_interleave(bq, dim=-2)[..., :sq, :]
    el = el.repeat_interleave(bk, dim=-1)[..., :sk]
    if causal:
        el = el & band_mask(sq, sk, -1, 0, device=el.device)
    if block_mask.token_order is not None:
        inv = torch.argsort(block_mask.token_order)
        el = el[..., inv, :][..., :, inv]
    return el


def block_sparse_attention(q, k, v, block_mask, *, causal: bool = False,
                           scale: Optional[float] = None, cu_seqlens=None,
                           return_lse: bool = False):
    """Same contract as ``tilefuse.block_sparse_attention``, in the inputs' dtype (use float64
    for an oracle)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is not None:  # per sequence: layout row b, sequence-local indices
        cu = cu_seqlens.tolist()
        outs, lses = [], []
        bq, bk = block_mask.block_size
        dense = block_mask.to_dense()
        for b in range(len(cu) - 1):
            n = cu[b + 1] - cu[b]
            lay = dense[b if dense.shape[0] > 1 else 0]
            el = lay.repeat_interleave(bq, -2)[:, :n].repeat_interleave(bk, -1)[:, :, :n]
            if causal:
                el = el & band_mask(n, n, -1, 0, device=el.device)
            o, l_ = masked_attention(q[cu[b]:cu[b + 1]], k[cu[b]:cu[b + 1]], v[cu[b]:cu[b + 1]],
                                     el, scale)
            outs.append(o)
            lses.append(l_)
        out, lse = torch.cat(outs), torch.cat(lses)
        return (out, lse) if return_lse else out
    el = block_sparse_element_mask(block_mask, causal)
    outs, lses = [], []
    for b in range(q.shape[0]):
        allowed = el[b if el.shape[0] > 1 else 0]
        o, l_ = masked_attention(q[b], k[b], v[b], allowed, scale)
        outs.append(o)
        lses.append(l_)
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_lse else out
