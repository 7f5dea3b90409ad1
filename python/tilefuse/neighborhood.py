# SPDX-License-Identifier: Apache-2.0
"""User API of neighborhood attention (``na1d/na2d/na3d``) and Swin window attention.

Argument normalisation only; shape, dtype and value checks live in the C++ ops so that
``torch.ops.tilefuse.*`` callers get the same clear errors."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .functional import attention

__all__ = ["na1d", "na2d", "na3d", "window_attention"]

IntOrTuple = Union[int, Sequence[int]]


def _per_axis(x, rank: int, name: str, op: str, kind=int):
    if isinstance(x, (bool, int)) and not (kind is int and isinstance(x, bool)):
        return [kind(x)] * rank
    try:
        vals = list(x)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a tuple of {rank}, got {x!r}") from None
    if len(vals) != rank:
        raise ValueError(f"{op}: {name} must have {rank} entries (one per spatial axis), got {x!r}")
    return [kind(v) for v in vals]


def _scale(q, scale):
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    return float(scale)


def _same_device(op, *ts):
    devices = {t.device for t in ts if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


def merge_attentions(out_a, lse_a, out_b, lse_b):
    """Exact merge of two attentions over disjoint key sets through their LSEs
    (differentiable). Rows with no key on one side (LSE -inf) take the other side."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(lse_a - safe).unsqueeze(-1)
    wb = torch.exp(lse_b - safe).unsqueeze(-1)
    out = out_a.to(wa.dtype) * wa + out_b.to(wb.dtype) * wb
    return out.to(out_a.dtype), lse


def _na(rank, q, k, v, kernel_size, dilation, stride, is_causal, scale, rpb, additional_keys,
        additional_values, return_lse):
    op = f"na{rank}d"
    ks = _per_axis(kernel_size, rank, "kernel_size", op)
    ds = _per_axis(dilation, rank, "dilation", op)
    ss = _per_axis(stride, rank, "stride", op)
    cs = _per_axis(is_causal, rank, "is_causal", op, kind=bool)
    if q.dim() != rank + 3:
        raise ValueError(f"{op}: q must be [batch, *spatial ({rank} axes), heads, head_dim], got shape "
                         f"{tuple(q.shape)}")
    _same_device(op, q, k, v, rpb, additional_keys, additional_values)
    sc = _scale(q, scale)
    out, lse = torch.ops.tilefuse.na_fwd(q, k, v, rpb, ks, ds, ss, cs, sc)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError(f"{op}: additional_keys and additional_values must be given together")
    if additional_keys is not None:
        if additional_keys.dim() != 4 or additional_values.dim() != 4:
            raise ValueError(f"{op}: additional_keys/values must be [batch, tokens, kv_heads, head_dim], "
                             f"got {tuple(additional_keys.shape)} and {tuple(additional_values.shape)}")
        B, H = q.shape[0], q.shape[-2]
        qf = q.reshape(B, -1, H, q.shape[-1])
        out_x, lse_x = attention(qf, additional_keys, additional_values, scale=sc, return_lse=True)
        out, lse = merge_attentions(out, lse, out_x.reshape(out.shape), lse_x.reshape(lse.shape))
    return (out, lse) if return_lse else out


def na1d(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, scale=None, rpb=None,
         additional_keys=None, additional_values=None, return_lse=False):
    """1-D neighborhood attention on ``[B, L, H, D]`` (see :func:`na2d`)."""
    return _na(1, q, k, v, kernel_size, dilation, stride, is_causal, scale, rpb, additional_keys,
               additional_values, return_lse)


def na2d(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, scale=None, rpb=None,
         additional_keys=None, additional_values=None, return_lse=False):
    """Fused neighborhood attention on ``q [B, X, Y, H, D]``, ``k [B, X, Y, Hkv, D]``,
    ``v [B, X, Y, Hkv, Dv]`` (NATTEN's heads-last layout; GQA when ``Hkv < H``), forward and
    backward, NATTEN 0.21 semantics.

    ``kernel_size``, ``dilation``, ``stride`` and ``is_causal`` take an int/bool or one entry
    per axis. Windows shift inward at the borders (every query sees exactly ``kernel_size``
    keys per non-causal axis), even kernels have one key fewer on the right, stride groups
    share their leader's window (``stride == kernel_size`` is blocked attention), dilation
    splits each axis into interleaved groups. Requires ``kernel_size * dilation <= size`` and
    ``stride <= kernel_size`` per axis.

    ``rpb [H, 2k0-1, 2k1-1]`` (NAT / DiNAT relative positional bias, indexed by key minus
    query in dilation-group coordinates) is added to the logits; it is trainable and its
    gradient is deterministic. ``additional_keys/values [B, M, Hkv, D]`` are extra tokens
    every query attends to (no bias), merged exactly through the log-sum-exp.
    ``scale`` defaults to ``D ** -0.5``. Returns ``out`` (and the LSE ``[B, X, Y, H]`` in
    float32 / float64 with ``return_lse=True``).
    """
    return _na(2, q, k, v, kernel_size, dilation, stride, is_causal, scale, rpb, additional_keys,
               additional_values, return_lse)


def na3d(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, scale=None, rpb=None,
         additional_keys=None, additional_values=None, return_lse=False):
    """3-D neighborhood attention on ``[B, Z, X, Y, H, D]`` (see :func:`na2d`)."""
    return _na(3, q, k, v, kernel_size, dilation, stride, is_causal, scale, rpb, additional_keys,
               additional_values, return_lse)


def window_attention(q, k, v, window_size, shift_size=0, rpb=None, scale=None,
                     pad_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     return_lse=False):
    """Swin (shifted) window attention on ``[B, *spatial, H, D]`` (1, 2 or 3 spatial axes),
    fused: no pad, roll or partition copies.

    The result equals timm / Hugging Face Swin: pad every axis to a multiple of
    ``window_size``, roll by ``-shift_size``, partition into windows, attention with the
    relative position bias and the shifted-window mask, reverse, roll back, crop. Padded
    positions are keys, not masked: ``pad_kv = (k_pad [Hkv, D], v_pad [Hkv, Dv])`` gives their
    key and value (zeros by default; a converted Swin layer passes the qkv projection biases,
    since timm and HF pad before the projection). Both are trainable.

    ``rpb`` is the timm / HF ``relative_position_bias_table`` ``[prod(2W - 1), H]``, trainable
    with a deterministic gradient. The shifted-window mask is applied as an exclusion (timm
    adds -100, whose weight e^-100 is below fp32 resolution against any kept key).
    """
    rank = q.dim() - 3
    op = "window_attention"
    if rank not in (1, 2, 3):
        raise ValueError(f"{op}: q must be [batch, *spatial (1 to 3 axes), heads, head_dim], got shape "
                         f"{tuple(q.shape)}")
    ws = _per_axis(window_size, rank, "window_size", op)
    sh = _per_axis(shift_size, rank, "shift_size", op)
    k_pad = v_pad = None
    if pad_kv is not None:
        if len(pad_kv) != 2:
            raise ValueError(f"{op}: pad_kv must be a (k_pad, v_pad) pair")
        k_pad, v_pad = pad_kv
    _same_device(op, q, k, v, rpb, k_pad, v_pad)
    out, lse = torch.ops.tilefuse.window_attention_fwd(q, k, v, rpb, k_pad, v_pad, ws, sh,
                                                       _scale(q, scale))
    return (out, lse) if return_lse else out
