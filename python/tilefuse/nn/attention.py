# SPDX-License-Identifier: Apache-2.0
"""Attention layers."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import functional as F
from .. import reference

BACKENDS = ("tilefuse", "reference")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def run_attention(backend: str, q, k, v, **kw):
    """tilefuse kernel, or the pure-PyTorch reference for A/B checks (same contract)."""
    if backend == "reference":
        kw.pop("max_seqlen_q", None), kw.pop("max_seqlen_k", None)
        return reference.attention(q, k, v, **kw)
    return F.attention(q, k, v, **kw)


class FusedAttention(nn.Module):
    """Multi-head self/cross attention with q/k/v/out projections on the fused kernel.

    ``num_kv_heads < num_heads`` gives GQA/MQA (the kernel reads shared KV heads, no copies).
    Inputs ``[B, S, embed_dim]``; ``key`` / ``value`` default to ``query`` (self attention).
    ``key_mask`` (bool ``[B, Sk]``, True = attend) masks padding keys.
    ``backend="reference"`` runs :func:`tilefuse.reference.attention` instead of the kernel.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, bias: bool = True,
                 causal: bool = False, window: Optional[Tuple[int, int]] = None,
                 backend: str = "tilefuse", device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.window = causal, window
        self.backend = check_backend(backend)
        fk = dict(device=device, dtype=dtype)
        kv_out = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(kdim or embed_dim, kv_out, bias=bias, **fk)
        self.v_proj = nn.Linear(vdim or embed_dim, kv_out, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None, *,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        key = query if key is None else key
        value = key if value is None else value
        B, Sq, _ = query.shape
        Sk = key.shape[1]
        q = self.q_proj(query).view(B, Sq, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(B, Sk, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(B, Sk, self.num_kv_heads, self.head_dim)
        out = run_attention(self.backend, q, k, v, causal=self.causal, window=self.window,
                            key_mask=key_mask)
        return self.out_proj(out.reshape(B, Sq, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, window={self.window}, backend={self.backend!r}")


class BlockSparseAttention(nn.Module):
    """Multi-head attention over selected key blocks, with q/k/v/out projections.

    Pass a :class:`tilefuse.BlockMask` per call, or set ``topk`` to route each query block to
    its ``topk`` best key blocks by mean-pooled scores (MoBA / BiFormer style, own block always
    kept). ``backend="reference"`` runs :func:`tilefuse.reference.block_sparse_attention`.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 block_size=64, topk: Optional[int] = None, causal: bool = False,
                 bias: bool = True, backend: str = "tilefuse", device=None, dtype=None):
        super().__init__()
        self.inner = FusedAttention(embed_dim, num_heads, num_kv_heads=num_kv_heads, bias=bias,
                                    causal=causal, backend=backend, device=device, dtype=dtype)
        self.block_size, self.topk, self.causal = block_size, topk, causal
        self.backend = backend

    def forward(self, x: torch.Tensor, block_mask=None) -> torch.Tensor:
        from ..block_mask import topk_block_mask
        from ..functional import block_sparse_attention

        a = self.inner
        B, S, _ = x.shape
        q = a.q_proj(x).view(B, S, a.num_heads, a.head_dim)
        k = a.k_proj(x).view(B, S, a.num_kv_heads, a.head_dim)
        v = a.v_proj(x).view(B, S, a.num_kv_heads, a.head_dim)
        if block_mask is None:
            if self.topk is None:
                raise ValueError("BlockSparseAttention: pass block_mask= or build with topk=")
            block_mask = topk_block_mask(q, k, self.block_size, self.topk, causal=self.causal)
        fn = reference.block_sparse_attention if self.backend == "reference" else block_sparse_attention
        out = fn(q, k, v, block_mask, causal=self.causal)
        return a.out_proj(out.reshape(B, S, a.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.inner.embed_dim}, num_heads={self.inner.num_heads}, "
                f"num_kv_heads={self.inner.num_kv_heads}, block_size={self.block_size}, "
                f"topk={self.topk}, causal={self.causal}, backend={self.backend!r}")
