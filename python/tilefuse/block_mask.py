# SPDX-License-Identifier: Apache-2.0
"""Block layouts for block-sparse attention: ``BlockMask`` and content-routed ``topk_block_mask``.

A BlockMask says, per (batch, head) and query block, which key blocks are attended. Blocks are
``block_size = (bq, bk)`` consecutive tokens, or spatial tiles of a multi-dimensional token grid
(``from_tiles``), in which case the mask carries the tile-major token order. ``partial`` marks
blocks that also need the element test (the causal diagonal, ragged ends are implicit).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

BLOCK_MIN, BLOCK_MAX = 16, 256

__all__ = ["BlockMask", "topk_block_mask"]


def _pair(x, name) -> Tuple[int, int]:
    t = (x, x) if isinstance(x, int) else tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a (query, key) pair, got {x!r}")
    for v in t:
        if not BLOCK_MIN <= v <= BLOCK_MAX:
            raise ValueError(f"{name} entries must be in [{BLOCK_MIN}, {BLOCK_MAX}], got {x!r}")
    return t


def _check_layout(layout: torch.Tensor, name: str, nq: int, nk: int):
    if layout.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B|1, H|1, n_q_blocks, n_k_blocks], got shape "
                         f"{tuple(layout.shape)}")
    if tuple(layout.shape[2:]) != (nq, nk):
        raise ValueError(f"{name} must have {nq} x {nk} blocks (ceil(seq / block) per axis), got "
                         f"{tuple(layout.shape[2:])}")


class BlockMask:
    """Which key blocks each query block attends to, per (batch, head).

    Stored compressed like torch's FlexAttention ``BlockMask``: ``kv_num_blocks`` int32
    ``[B|1, H|1, nQ]`` and ``kv_indices`` int32 ``[B|1, H|1, nQ, nK]`` (the first
    ``kv_num_blocks`` entries of each row, ascending; the rest unused). Build it with
    :meth:`from_dense`, :meth:`from_indices`, :meth:`from_flex` or :meth:`from_tiles`.
    """

    def __init__(self, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                 block_size: Tuple[int, int], seq_lens: Tuple[int, int],
                 partial: Optional[torch.Tensor] = None,
                 token_order: Optional[torch.Tensor] = None):
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.block_size = block_size
        self.seq_lens = seq_lens
        self.partial = partial
        self.token_order = token_order  # tile-major position -> original token index

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_dense(cls, layout: torch.Tensor, block_size, seq_lens: Sequence[int],
                   partial: Optional[torch.Tensor] = None) -> "BlockMask":
        """From a bool layout ``[B|1, H|1, ceil(Sq/bq), ceil(Sk/bk)]`` (True = attended)."""
        bq, bk = _pair(block_size, "block_size")
        sq, sk = (int(s) for s in seq_lens)
        if sq < 0 or sk < 0:
            raise ValueError(f"seq_lens must be >= 0, got {seq_lens!r}")
        nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
        if layout.dtype != torch.bool:
            raise TypeError(f"layout must be a bool tensor, got {layout.dtype}")
        _check_layout(layout, "layout", nq, nk)
        if partial is not None:
            if partial.dtype != torch.bool:
                raise TypeError(f"partial must be a bool tensor, got {partial.dtype}")
            _check_layout(partial, "partial", nq, nk)
        counts = layout.sum(-1, dtype=torch.int32)
        # Stable sort puts the True blocks first, in ascending block order.
        order = torch.sort((~layout).to(torch.int8), dim=-1, stable=True).indices
        return cls(counts, order.to(torch.int32), (bq, bk), (sq, sk), partial)

    @classmethod
    def from_indices(cls, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size,
                     seq_lens: Sequence[int], partial: Optional[torch.Tensor] = None) -> "BlockMask":
        """From compressed rows ``kv_num_blocks [B, H, nQ]`` and ``kv_indices [B, H, nQ, max]``
        (FlexAttention's convention; entries past the count are ignored)."""
        bq, bk = _pair(block_size, "block_size")
        sq, sk = (int(s) for s in seq_lens)
        nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
        if kv_num_blocks.dim() != 3 or kv_num_blocks.shape[-1] != nq:
            raise ValueError(f"kv_num_blocks must be [B|1, H|1, {nq}], got {tuple(kv_num_blocks.shape)}")
        if kv_indices.dim() != 4 or kv_indices.shape[:3] != kv_num_blocks.shape:
            raise ValueError(f"kv_indices must be [*kv_num_blocks.shape, max_blocks], got "
                             f"{tuple(kv_indices.shape)}")
        if kv_num_blocks.numel() and (int(kv_num_blocks.min()) < 0
                                      or int(kv_num_blocks.max()) > min(nk, kv_indices.shape[-1])):
            raise ValueError(f"kv_num_blocks entries must be in [0, {min(nk, kv_indices.shape[-1])}]")
        return cls.from_dense(_indices_to_dense(kv_num_blocks, kv_indices, nk), (bq, bk), (sq, sk),
                              partial)

    @classmethod
    def from_flex(cls, block_mask, *, causal: bool = False) -> "BlockMask":
        """From a torch FlexAttention ``BlockMask``. Its full blocks are attended as they are;
        its partial blocks need their ``mask_mod``, which tilefuse can only honour when it is
        the causal element test (pass ``causal=True`` to the attention call as well)."""
        bq, bk = block_mask.BLOCK_SIZE
        sq, sk = block_mask.seq_lengths
        nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
        partial_layout = _indices_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, nk)
        full_layout = torch.zeros_like(partial_layout)
        if block_mask.full_kv_num_blocks is not None:
            full_layout = _indices_to_dense(block_mask.full_kv_num_blocks,
                                            block_mask.full_kv_indices, nk)
        if partial_layout[..., :nq, :].any() and not causal:
            raise NotImplementedError(
                "BlockMask.from_flex: the Flex mask has partial blocks, whose mask_mod tilefuse "
                "cannot run; only the causal element test is supported (causal=True)")
        layout = (partial_layout | full_layout)[..., :nq, :nk]
        return cls.from_dense(layout, (bq, bk), (sq, sk), partial_layout[..., :nq, :nk])

    @classmethod
    def from_tiles(cls, layout: torch.Tensor, spatial_shape: Sequence[int],
                   tile_shape: Sequence[int]) -> "BlockMask":
        """Blocks as spatial tiles of a token grid (e.g. 8x8 tiles of a 64x64 map, 2x8x8 tiles
        of a video). ``layout`` is bool ``[B|1, H|1, n_tiles, n_tiles]`` with tiles numbered
        row-major over the tile grid, or ``[B|1, H|1, *tile_grid, *tile_grid]``. Tokens are the
        row-major flattened grid (``[B, prod(spatial), H, D]``); each block is one tile.
        """
        spatial = tuple(int(s) for s in spatial_shape)
        tile = tuple(int(t) for t in tile_shape)
        if len(spatial) != len(tile) or not 1 <= len(spatial) <= 3:
            raise ValueError(f"spatial_shape and tile_shape must have the same rank 1..3, got "
                             f"{spatial} and {tile}")
        if any(s % t for s, t in zip(spatial, tile)):
            raise ValueError(f"spatial_shape {spatial} must be a multiple of tile_shape {tile}")
        grid = tuple(s // t for s, t in zip(spatial, tile))
        n_tiles, block = math.prod(grid), math.prod(tile)
        if layout.dim() == 2 + 2 * len(grid):
            if tuple(layout.shape[2:]) != grid + grid:
                raise ValueError(f"layout must be [B|1, H|1, *{grid}, *{grid}], got "
                                 f"{tuple(layout.shape)}")
            layout = layout.reshape(*layout.shape[:2], n_tiles, n_tiles)
        tokens = math.prod(spatial)
        bm = cls.from_dense(layout, (block, block), (tokens, tokens))
        bm.token_order = tile_major_order(spatial, tile)
        return bm

    # -- views ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> Tuple[int, int]:
        return (math.ceil(self.seq_lens[0] / self.block_size[0]),
                math.ceil(self.seq_lens[1] / self.block_size[1]))

    def to_dense(self) -> torch.Tensor:
        """Bool layout ``[B|1, H|1, nQ, nK]``."""
        return _indices_to_dense(self.kv_num_blocks, self.kv_indices, self.num_blocks[1])

    def density(self) -> float:
        return float(self.to_dense().float().mean())

    def __repr__(self) -> str:
        return (f"BlockMask(shape={tuple(self.kv_num_blocks.shape[:2])}, "
                f"blocks={self.num_blocks}, block_size={self.block_size}, "
                f"seq_lens={self.seq_lens}, density={self.density():.3f}, "
                f"partial={'yes' if self.partial is not None else 'no'}, "
                f"tiles={'yes' if self.token_order is not None else 'no'})")


def _indices_to_dense(counts: torch.Tensor, indices: torch.Tensor, nk: int) -> torch.Tensor:
    cols = torch.arange(indices.shape[-1], device=indices.device)
    valid = cols < counts.unsqueeze(-1)
    dense = torch.zeros(*indices.shape[:-1], nk + 1, dtype=torch.bool, device=indices.device)
    idx = torch.where(valid, indices.long().clamp(0, nk - 1 if nk else 0), nk)
    dense.scatter_(-1, idx, True)
    return dense[..., :nk]


def tile_major_order(spatial: Tuple[int, ...], tile: Tuple[int, ...]) -> torch.Tensor:
    """Permutation listing the row-major token indices tile by tile (tiles row-major, tokens
    row-major inside a tile)."""
    idx = torch.arange(math.prod(spatial)).reshape(spatial)
    grid = [s // t for s, t in zip(spatial, tile)]
    # [g0, t0, g1, t1, ...] -> [g0, g1, ..., t0, t1, ...]
    split = idx.reshape(*[v for g, t in zip(grid, tile) for v in (g, t)])
    r = len(spatial)
    perm = [2 * i for i in range(r)] + [2 * i + 1 for i in range(r)]
    return split.permute(perm).reshape(-1)


@torch.no_grad()
def topk_block_mask(q: torch.Tensor, k: torch.Tensor, block_size: Union[int, Tuple[int, int]],
                    topk: int, *, causal: bool = False, always_local: bool = True) -> BlockMask:
    """Content-routed block selection (MoBA / BiFormer style), per query block.

    Keys are mean-pooled per key block and queries per query block; each (batch, head, query
    block) keeps the ``topk`` key blocks with the highest pooled score ``q_blk . k_blk``. With
    ``causal`` only blocks that hold a visible key can be picked (bottom-right alignment, as in
    :func:`tilefuse.attention`) and blocks crossing the diagonal are marked partial. With
    ``always_local`` the key blocks holding the query block's own positions are always kept (in
    addition to ``topk``). The selection is discrete: no gradient flows through it.

    q ``[B, Sq, H, D]``, k ``[B, Sk, Hkv, D]`` (H % Hkv == 0).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, S, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be an int >= 0, got {topk!r}")
    bq, bk = _pair(block_size, "block_size")
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    nq, nk = math.ceil(Sq / bq), math.ceil(Sk / bk)
    q_blk = _block_mean(q.float(), bq, nq)  # [B, nq, H, D]
    k_blk = _block_mean(k.float(), bk, nk).repeat_interleave(H // Hkv, dim=2)  # [B, nk, H, D]
    scores = torch.einsum("bihd,bjhd->bhij", q_blk, k_blk)
    qi = torch.arange(nq, device=q.device)
    kj = torch.arange(nk, device=q.device)
    off = Sk - Sq
    q_first = qi * bq + off  # diagonal key position of the first / last query of each block
    q_last = torch.clamp((qi + 1) * bq, max=Sq) - 1 + off
    k_first, k_last = kj * bk, torch.clamp((kj + 1) * bk, max=Sk) - 1
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = k_first[None, :] <= q_last[:, None]
    local = (k_first[None, :] <= q_last[:, None]) & (k_last[None, :] >= q_first[:, None])
    keep_local = (local & allowed) if always_local else torch.zeros_like(local)
    # top-k among the allowed blocks that are not already kept as local blocks
    scores.masked_fill_(~allowed | keep_local, float("-inf"))
    layout = keep_local.expand(B, H, nq, nk).clone()
    kk = min(topk, nk)
    if kk > 0:
        top = scores.topk(kk, dim=-1)
        chosen = torch.zeros_like(layout)
        chosen.scatter_(-1, top.indices, top.values > float("-inf"))
        layout |= chosen
    partial = None
    if causal:
        partial = (k_last[None, :] > q_first[:, None]) & allowed
        partial = partial.expand(1, 1, nq, nk)
    return BlockMask.from_dense(layout, (bq, bk), (Sq, Sk), partial)


def _block_mean(x: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Mean over consecutive blocks of the sequence axis of [B, S, H, D] (the last block may be
    short); no padded copy of x."""
    B, S, H, D = x.shape
    full = S // block
    out = x.new_empty(B, n, H, D)
    if full:
        torch.sum(x[:, :full * block].reshape(B, full, block, H, D), dim=2, out=out[:, :full])
        out[:, :full] *= 1.0 / block
    if n > full:
        out[:, full] = x[:, full * block:].mean(1)
    return out
