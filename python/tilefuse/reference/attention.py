# SPDX-License-Identifier: Apache-2.0
"""Reference scaled-dot-product attention with causal / sliding-window masks and varlen."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def band_mask(sq: int, sk: int, left: int, right: int, device=None) -> torch.Tensor:
    """Boolean [sq, sk]: key j visible from query i iff -left <= j - (i + sk - sq) <= right
    (FlashAttention's bottom-right alignment; a negative bound is unbounded)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    d = j - (i + sk - sq)
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= d >= -left
    if right >= 0:
        ok &= d <= right
    return ok


def masked_attention(q, k, v, allowed, scale):
    """Attention of one sequence under an explicit mask.

    q [Sq, H, D], k [Sk, Hkv, D], v [Sk, Hkv, Dv], allowed bool broadcastable to [H, Sq, Sk].
    Returns out [Sq, H, Dv] and lse [Sq, H]; rows without a visible key give 0 and -inf.
    """
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    allowed = allowed.expand(s.shape)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows without any visible key
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.nan_to_num(p, nan=0.0) * allowed  # rows without keys: p = 0 (exp(-inf - -inf))
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse.transpose(0, 1)


def _one_sequence(q, k, v, scale, left, right, key_mask=None):
    allowed = band_mask(q.shape[0], k.shape[0], left, right, device=q.device)
    if key_mask is not None:
        allowed = allowed & key_mask[None, :]
    return masked_attention(q, k, v, allowed, scale)


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
    key_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Same contract as :func:`tilefuse.attention`, computed in the inputs' dtype (use
    float64 for an oracle): softmax(q k^T * scale + mask) v, per sequence."""
    left, right = (-1, -1) if window is None else (
        -1 if window[0] is None else window[0], -1 if window[1] is None else window[1])
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is None:
        outs, lses = zip(*(_one_sequence(q[b], k[b], v[b], scale, left, right,
                                         None if key_mask is None else key_mask[b])
                           for b in range(q.shape[0]))) if q.shape[0] else ((), ())
        out = torch.stack(outs) if outs else q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.stack(lses) if lses else q.new_empty(q.shape[:-1])
    else:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(cq) - 1):
            o, l_ = _one_sequence(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                  scale, left, right)
            outs.append(o)
            lses.append(l_)
        out = torch.cat(outs) if outs else q.new_empty((0, q.shape[1], v.shape[-1]))
        lse = torch.cat(lses) if lses else q.new_empty((0, q.shape[1]))
    return (out, lse) if return_lse else out
