# SPDX-License-Identifier: Apache-2.0
"""Neighborhood attention (NATTEN's module API) and Swin window attention layers."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from .. import neighborhood as F
from .. import reference
from .attention import check_backend

IntOrTuple = Union[int, Sequence[int]]


def _per_axis(x, rank: int) -> tuple:
    t = (x,) * rank if isinstance(x, (int, bool)) else tuple(x)
    if len(t) != rank:
        raise ValueError(f"expected an int or {rank} values, got {x!r}")
    return t


class _NeighborhoodAttention(nn.Module):
    rank = 0

    def __init__(self, embed_dim: int, num_heads: int, kernel_size: IntOrTuple,
                 dilation: IntOrTuple = 1, stride: IntOrTuple = 1,
                 is_causal: Union[bool, Sequence[bool]] = False, qkv_bias: bool = True,
                 qk_scale: float = None, rpb: bool = False, backend: str = "tilefuse",
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        r = self.rank
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kernel_size = _per_axis(kernel_size, r)
        self.dilation = _per_axis(dilation, r)
        self.stride = _per_axis(stride, r)
        self.is_causal = _per_axis(is_causal, r)
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.backend = check_backend(backend)
        fk = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias, **fk)
        self.proj = nn.Linear(embed_dim, embed_dim, **fk)
        if rpb:
            if any(self.is_causal):
                raise ValueError("rpb is defined for non-causal neighborhoods only")
            shape = (num_heads, *[2 * k - 1 for k in self.kernel_size])
            self.rpb = nn.Parameter(torch.zeros(shape, **fk))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, *spatial, embed_dim]`` -> same shape."""
        if x.dim() != self.rank + 2:
            raise ValueError(f"{type(self).__name__}: input must be [batch, *spatial ({self.rank} "
                             f"axes), embed_dim], got shape {tuple(x.shape)}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        kw = dict(kernel_size=self.kernel_size, dilation=self.dilation, stride=self.stride,
                  is_causal=self.is_causal, scale=self.scale, rpb=self.rpb)
        if self.backend == "reference":
            out = reference.na(q, k, v, **kw)
        else:
            out = getattr(F, f"na{self.rank}d")(q, k, v, **kw)
        return self.proj(out.flatten(-2))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}, "
                f"rpb={self.rpb is not None}, backend={self.backend!r}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention layer on ``[B, L, C]`` (NATTEN's module API, plus ``rpb``)."""

    rank = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention layer on ``[B, X, Y, C]`` (NATTEN's module API, plus ``rpb``)."""

    rank = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention layer on ``[B, Z, X, Y, C]`` (NATTEN's module API, plus ``rpb``)."""

    rank = 3


class WindowAttention(nn.Module):
    """Swin (shifted) window attention on a feature map ``[B, *spatial, C]`` (1 to 3 axes),
    fused: no pad / roll / partition copies.

    Parameters follow timm / Hugging Face: ``qkv``, ``proj`` and
    ``relative_position_bias_table [prod(2W-1), H]``. As in timm, the map is padded to a
    multiple of the window *before* the qkv projection, so padded keys / values equal the qkv
    bias (passed to the kernel as ``pad_kv``).
    """

    def __init__(self, embed_dim: int, num_heads: int, window_size: IntOrTuple, rank: int = 2,
                 shift_size: IntOrTuple = 0, qkv_bias: bool = True, rpb: bool = True,
                 backend: str = "tilefuse", device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads, self.rank = embed_dim, num_heads, rank
        self.head_dim = embed_dim // num_heads
        self.window_size = _per_axis(window_size, rank)
        self.shift_size = _per_axis(shift_size, rank)
        self.scale = self.head_dim ** -0.5
        self.backend = check_backend(backend)
        fk = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias, **fk)
        self.proj = nn.Linear(embed_dim, embed_dim, **fk)
        if rpb:
            n = math.prod(2 * w - 1 for w in self.window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(n, num_heads, **fk))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.register_parameter("relative_position_bias_table", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2:
            raise ValueError(f"WindowAttention: input must be [batch, *spatial ({self.rank} axes), "
                             f"embed_dim], got shape {tuple(x.shape)}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        pad_kv = None
        if self.qkv.bias is not None:
            _, kb, vb = self.qkv.bias.view(3, self.num_heads, self.head_dim).unbind(0)
            pad_kv = (kb, vb)
        fn = reference.window_attention if self.backend == "reference" else F.window_attention
        out = fn(q, k, v, self.window_size, self.shift_size, rpb=self.relative_position_bias_table,
                 scale=self.scale, pad_kv=pad_kv)
        return self.proj(out.flatten(-2))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, shift_size={self.shift_size}, "
                f"rpb={self.relative_position_bias_table is not None}, backend={self.backend!r}")
