# SPDX-License-Identifier: Apache-2.0
"""User API: argument normalisation. Shape, dtype and value checks live in the C++ ops so
that ``torch.ops.tilefuse.*`` callers get the same clear errors."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["attention", "block_sparse_attention"]


def _window(causal: bool, window) -> Tuple[int, int]:
    if window is None:
        left, right = -1, -1
    else:
        if isinstance(window, int) or len(window) != 2:
            raise ValueError(f"attention: window must be a (left, right) pair, got {window!r}")
        left, right = (-1 if w is None else int(w) for w in window)
        if left < -1 or right < -1:
            raise ValueError(
                f"attention: window sizes must be >= 0, or -1/None for unbounded, got {window!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Optional[Tuple[int, int]] = None,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    key_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Fused scaled-dot-product attention, O(S) extra memory, forward and backward.

    Layout heads-last: ``q [B, Sq, H, D]``, ``k [B, Sk, Hkv, D]``, ``v [B, Sk, Hkv, Dv]`` with
    ``H % Hkv == 0`` (GQA/MQA read the shared KV head, no copies). Varlen: packed
    ``[total, H, D]`` with int32 ``cu_seqlens_q/k`` of length ``batch + 1`` (FlashAttention's
    convention; empty sequences allowed).

    ``causal`` is bottom-right aligned when ``Sq != Sk``; ``window=(left, right)`` keeps keys
    ``j`` with ``-left <= j - (i + Sk - Sq) <= right`` (``-1``/``None`` = unbounded) and
    combines with ``causal`` (which sets ``right = 0``). ``scale`` defaults to ``D ** -0.5``.
    ``key_mask`` (bool ``[B, Sk]``, True = attend) masks keys per batch element, e.g. padding;
    it is not combinable with ``causal``/``window`` or varlen.

    Returns ``out [B, Sq, H, Dv]`` in the input dtype, and with ``return_lse=True`` also the
    log-sum-exp ``[B, Sq, H]`` (float32; float64 for float64 inputs). A query row that sees no
    key gets output 0 and LSE ``-inf``. NaN in an input propagates (IEEE) to the output rows
    that attend to it; it is not checked for.
    """
    left, right = _window(causal, window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("attention: cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_seqlens_q is None and (max_seqlen_q is not None or max_seqlen_k is not None):
        raise ValueError("attention: max_seqlen_q/max_seqlen_k only apply with cu_seqlens_q/k")
    devices = {t.device for t in (q, k, v)}
    if len(devices) != 1:
        raise ValueError(f"attention: q, k and v must be on one device, got {sorted(map(str, devices))}")
    out, lse = torch.ops.tilefuse.attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k,
        -1 if max_seqlen_q is None else int(max_seqlen_q),
        -1 if max_seqlen_k is None else int(max_seqlen_k),
        float(scale), left, right, key_mask)
    return (out, lse) if return_lse else out


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, *,
                           causal: bool = False, scale: Optional[float] = None,
                           cu_seqlens: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Attention over the key blocks a :class:`tilefuse.BlockMask` selects per query block.

    Layouts as in :func:`attention` (``[B, S, H, D]``, GQA by ``H % Hkv == 0``). Only the
    listed blocks cost anything, in forward and backward. ``causal`` adds the element test
    ``j <= i + Sk - Sq`` inside the blocks (blocks wholly in the future are skipped). A query
    row with no visible key returns 0 with LSE ``-inf``. Varlen: packed ``[total, H, D]`` with
    int32 ``cu_seqlens`` (the same boundaries for queries and keys); the layout then has one row
    per sequence (or 1 to broadcast) and is sized for the longest sequence. For a mask built with
    ``BlockMask.from_tiles`` the tokens are gathered into tile-major order for the kernel and
    the output is scattered back (the causal test then applies in that order).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    devices = {t.device for t in (q, k, v)}
    if len(devices) != 1:
        raise ValueError(f"block_sparse_attention: q, k and v must be on one device, got "
                         f"{sorted(map(str, devices))}")
    if cu_seqlens is None and q.dim() == 4 and k.dim() == 4 and \
            (q.shape[1], k.shape[1]) != tuple(block_mask.seq_lens):
        raise ValueError(f"block_sparse_attention: the block mask is for seq_lens "
                         f"{tuple(block_mask.seq_lens)}, got q/k sequences "
                         f"({q.shape[1]}, {k.shape[1]})")
    order = block_mask.token_order
    if order is not None:
        if cu_seqlens is not None:
            raise NotImplementedError("block_sparse_attention: spatial-tile masks with varlen")
        order = order.to(q.device)
        q, k, v = (t.index_select(1, order) for t in (q, k, v))
    bq, bk = block_mask.block_size
    out, lse = torch.ops.tilefuse.block_sparse_attention_fwd(
        q, k, v, block_mask.kv_num_blocks, block_mask.kv_indices, bq, bk, causal, float(scale),
        cu_seqlens)
    if order is not None:
        inv = torch.argsort(order)
        out, lse = out.index_select(1, inv), lse.index_select(1, inv)
    return (out, lse) if return_lse else out
