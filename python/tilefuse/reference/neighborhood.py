# SPDX-License-Identifier: Apache-2.0
"""Reference neighborhood attention (NATTEN 0.21 semantics) and Swin window attention.

Both build the attention pattern from the definitions, never from a kernel's tiling, and work
in the inputs' dtype (use float64 for an oracle). :func:`window_attention` is the literal Swin
recipe: pad, cyclic roll by ``-shift``, window partition, attention with the relative position
bias and the shifted-window region mask (``-100`` as in timm / Hugging Face), reverse, roll back,
crop.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch


def _tuple(x, n, name):
    if isinstance(x, (int, bool)):
        return (x,) * n
    x = tuple(x)
    if len(x) != n:
        raise ValueError(f"{name} must have {n} entries, got {x!r}")
    return x


def na_window(length: int, kernel_size: int, dilation: int = 1, stride: int = 1,
              is_causal: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of one axis: the window start and end (exclusive) in dilation-group
    coordinates, and the dilation group, from NATTEN's definition.

    Non-causal: the stride-group leader (the group's centre query, right of centre for an even
    stride, at most the last query) is the window centre, clamped so that the window of
    ``kernel_size`` keys (``k // 2`` left, ``k // 2 - (1 - k % 2)`` right) fits in the group.
    Causal: the leader is the group's last query; keys from ``leader - k + 1`` to the query.
    """
    x = torch.arange(length)
    g = x % dilation
    i = x // dilation
    glen = (length - g + dilation - 1) // dilation
    if is_causal:
        leader = torch.minimum((i // stride) * stride + stride - 1, glen - 1)
        start = (leader - kernel_size + 1).clamp(min=0)
        end = i + 1
    else:
        left = kernel_size // 2
        right = kernel_size // 2 + kernel_size % 2 - 1
        leader = torch.minimum((i // stride) * stride + stride // 2, glen - 1)
        center = torch.maximum(torch.minimum(leader, glen - 1 - right), torch.full_like(leader, left))
        start = center - left
        end = center + right + 1
    return start, end, g


def na_mask(shape: Sequence[int], kernel_size, dilation=1, stride=1, is_causal=False):
    """Boolean ``[N, N]`` (row-major flattened positions): key j visible from query i.
    Also returns, per axis, the group-coordinate offset ``key - query`` (for the bias)."""
    r = len(shape)
    ks, ds, ss, cs = (_tuple(a, r, n) for a, n in ((kernel_size, "kernel_size"), (dilation, "dilation"),
                                                    (stride, "stride"), (is_causal, "is_causal")))
    grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    coords = [g.reshape(-1) for g in grids]
    allowed = torch.ones(len(coords[0]), len(coords[0]), dtype=torch.bool)
    offsets = []
    for a in range(r):
        start, end, grp = na_window(shape[a], ks[a], ds[a], ss[a], cs[a])
        qi, kj = coords[a][:, None], coords[a][None, :]
        jj = kj // ds[a]
        allowed &= (grp[qi] == grp[kj]) & (jj >= start[qi]) & (jj < end[qi])
        offsets.append(jj - qi // ds[a])
    return allowed, offsets


def _attend(q, k, v, scale, bias, allowed):
    # q [B, N, H, D], k/v [B, M, H, *]; bias [H, N, M] or None; allowed [N, M]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        s = s + bias.unsqueeze(0)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(torch.exp(s - lse.unsqueeze(-1)), nan=0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse.transpose(1, 2)


def na(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, scale=None, rpb=None,
       additional_keys=None, additional_values=None, return_lse=False):
    """Neighborhood attention on ``[B, *spatial, H, D]`` from an explicit mask (any rank).

    ``rpb [H, 2k0-1, ...]`` is indexed by ``(key - query) + k - 1`` per axis in dilation-group
    coordinates (NAT/DiNAT). Additional keys/values ``[B, M, Hkv, D]`` are visible from every
    query (no bias)."""
    r = q.dim() - 3
    shape = q.shape[1:1 + r]
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed, offsets = na_mask(shape, kernel_size, dilation, stride, is_causal)
    g = H // k.shape[-2]
    qf = q.reshape(B, -1, H, D)
    kf = k.reshape(B, -1, k.shape[-2], D).repeat_interleave(g, dim=2)
    vf = v.reshape(B, -1, v.shape[-2], v.shape[-1]).repeat_interleave(g, dim=2)
    bias = None
    if rpb is not None:
        ks = _tuple(kernel_size, r, "kernel_size")
        idx = [(off + kk - 1).clamp(0, 2 * kk - 2) for off, kk in zip(offsets, ks)]
        bias = rpb[(slice(None), *idx)]  # [H, N, N]
    if additional_keys is not None:
        ak = additional_keys.repeat_interleave(g, dim=2)
        av = additional_values.repeat_interleave(g, dim=2)
        kf, vf = torch.cat([kf, ak], 1), torch.cat([vf, av], 1)
        allowed = torch.cat([allowed, torch.ones(allowed.shape[0], ak.shape[1], dtype=torch.bool)], 1)
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(H, bias.shape[1], ak.shape[1])], 2)
    out, lse = _attend(qf, kf, vf, scale, bias, allowed)
    out = out.reshape(*q.shape[:-1], v.shape[-1])
    lse = lse.reshape(q.shape[:-1])
    return (out, lse) if return_lse else out


def swin_relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """timm / Hugging Face ``relative_position_index`` ``[N, N]`` of a window (any rank):
    ravel of ``(coord_query - coord_key + W - 1)`` with extents ``2W - 1``."""
    grids = torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids])  # [r, N]
    rel = coords[:, :, None] - coords[:, None, :]
    idx = torch.zeros(rel.shape[1:], dtype=torch.long)
    for a, w in enumerate(window):
        idx = idx * (2 * w - 1) + rel[a] + w - 1
    return idx


def window_attention(q, k, v, window_size, shift_size=0, rpb=None, scale=None, pad_kv=None,
                     return_lse=False):
    """Swin (shifted) window attention on ``[B, *spatial, H, D]``, the literal recipe.

    Padded positions get key/value ``pad_kv = (k_pad [Hkv, D], v_pad [Hkv, Dv])`` (zeros by
    default), as when timm / Hugging Face pad the input before the qkv projection."""
    r = q.dim() - 3
    shape = list(q.shape[1:1 + r])
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hkv, Dv = k.shape[-2], v.shape[-1]
    W = _tuple(window_size, r, "window_size")
    S = _tuple(shift_size, r, "shift_size")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = H // Hkv
    k = k.repeat_interleave(g, dim=-2)
    v = v.repeat_interleave(g, dim=-2)
    padded = [math.ceil(n / w) * w for n, w in zip(shape, W)]
    kp = torch.zeros(Hkv, D, dtype=q.dtype) if pad_kv is None else pad_kv[0]
    vp = torch.zeros(Hkv, Dv, dtype=q.dtype) if pad_kv is None else pad_kv[1]
    kp, vp = kp.repeat_interleave(g, 0), vp.repeat_interleave(g, 0)

    def pad(x, fill):
        out = fill.expand(B, *padded, *fill.shape).clone() if fill is not None else \
            x.new_zeros(B, *padded, *x.shape[-2:])
        out[(slice(None), *[slice(0, n) for n in shape])] = x
        return out

    qp, kpd, vpd = pad(q, None), pad(k, kp), pad(v, vp)
    dims = tuple(range(1, 1 + r))
    if any(S):
        qp, kpd, vpd = (torch.roll(x, [-s for s in S], dims) for x in (qp, kpd, vpd))

    def partition(x):  # [B, *padded, H, C] -> [B * nW, N, H, C]
        view = [B]
        for n, w in zip(padded, W):
            view += [n // w, w]
        x = x.reshape(*view, *x.shape[-2:])
        perm = [0] + [1 + 2 * a for a in range(r)] + [2 + 2 * a for a in range(r)] + [1 + 2 * r, 2 + 2 * r]
        x = x.permute(perm)
        return x.reshape(-1, math.prod(W), *x.shape[-2:])

    qw, kw, vw = partition(qp), partition(kpd), partition(vpd)
    n_win = qw.shape[0] // B
    logits = torch.einsum("wqhd,wkhd->whqk", qw, kw) * scale
    if rpb is not None:
        idx = swin_relative_position_index(W)
        logits = logits + rpb[idx.reshape(-1)].reshape(*idx.shape, H).permute(2, 0, 1).unsqueeze(0)
    if any(S):
        # Region ids on the rolled, padded grid: the last window of each shifted axis holds two
        # regions that were not adjacent before the roll.
        region = torch.zeros(padded, dtype=torch.long)
        for a, (n, w, s) in enumerate(zip(padded, W, S)):
            ra = torch.zeros(n, dtype=torch.long)
            if s > 0:
                ra[n - w:n - s] = 1
                ra[n - s:] = 2
            region = region * 3 + ra.reshape([-1 if b == a else 1 for b in range(r)])
        rw = partition(region.reshape(1, *padded, 1, 1).expand(B, *padded, 1, 1))[:n_win, :, 0, 0]
        mask = torch.where(rw[:, :, None] == rw[:, None, :], 0.0, -100.0).to(q.dtype)
        logits = logits.reshape(B, n_win, H, *logits.shape[-2:]) + mask[None, :, None]
        logits = logits.reshape(B * n_win, H, *logits.shape[-2:])
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    ow = torch.einsum("whqk,wkhd->wqhd", p, vw)
    lw = lse.transpose(1, 2).unsqueeze(-1)  # [B*nW, N, H, 1]

    def reverse(x):  # [B * nW, N, H, C] -> [B, *padded, H, C]
        view = [B] + [n // w for n, w in zip(padded, W)] + list(W) + list(x.shape[-2:])
        x = x.reshape(view)
        perm = [0]
        for a in range(r):
            perm += [1 + a, 1 + r + a]
        perm += [1 + 2 * r, 2 + 2 * r]
        return x.permute(perm).reshape(B, *padded, *x.shape[-2:])

    out, lse = reverse(ow), reverse(lw)
    if any(S):
        out, lse = (torch.roll(x, list(S), dims) for x in (out, lse))
    crop = (slice(None), *[slice(0, n) for n in shape])
    out, lse = out[crop], lse[crop][..., 0]
    return (out, lse) if return_lse else out
