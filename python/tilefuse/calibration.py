# SPDX-License-Identifier: Apache-2.0
"""Calibrated quantisation of linear layers: SmoothQuant scale migration and GPTQ rounding.

Both need statistics of each linear layer's *input* on a few representative batches, which
:func:`collect_linear_stats` gathers in one forward pass per batch (hooks, no model changes).
They only change which numbers are stored: the formats, packed layouts and kernels are the
ordinary ones (a GPTQ-rounded NF4 weight is an ordinary bitsandbytes NF4 weight).

- SmoothQuant (Xiao et al. 2023): per input channel ``s_j = max|x_j|^a / max|W_:j|^(1-a)``; the
  layer computes ``(x / s) @ (W * s)^T``, which is the same product, with the activation
  outliers moved into the weights. The division is done at run time (``Int8Linear.smooth``):
  in post-LayerNorm models (BERT) the LayerNorm output also feeds the residual, so it cannot
  absorb ``1 / s`` (torchao's SmoothQuant also divides at run time).
- GPTQ (Frantar et al. 2023): the weight columns are rounded one at a time and each rounding
  error is compensated on the not-yet-rounded columns through the inverse of
  ``H = sum x x^T`` over the calibration tokens, which minimises ``||X W^T - X Q^T||``
  instead of ``||W - Q||``. Per-row int8 scales are fixed up front (the row absmax); 4-bit block
  absmaxes are taken from the partially updated block when the rounding reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterable

import torch
from torch import nn

from .reference.lowbit import _fp4_codes, _nf4_codes, code_table

__all__ = ["LinearStats", "collect_linear_stats", "smooth_scale", "gptq_int8", "gptq_4bit"]

GPTQ_FORMATS_4BIT = ("nf4", "fp4")


class LinearStats:
    """Running statistics of one linear layer's input: per-channel absmax, ``H = sum x x^T``
    (float64) and the token count."""

    def __init__(self, in_features: int, hessian: bool):
        self.absmax = torch.zeros(in_features, dtype=torch.float64)
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64) if hessian \
            else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if self.hessian is not None:
            self.hessian += x.t() @ x
        self.tokens += x.shape[0]


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):  # dict, tokenizer BatchEncoding
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def collect_linear_stats(model: nn.Module, calibration: Iterable, modules: Iterable[nn.Module],
                         hessian: bool = True) -> Dict[int, LinearStats]:
    """Runs ``model`` on each batch of ``calibration`` (a dict is passed as keyword arguments, a
    tuple / list as positional ones, anything else as the single argument) without gradients
    and returns ``{id(module): LinearStats}`` for the given ``nn.Linear`` modules. (A mapping
    such as a tokenizer's ``BatchEncoding`` counts as a dict.)

    Every token of every batch counts, padding included: pass batches without padding (e.g.
    one sentence per batch) when the model pads.
    """
    stats: Dict[int, LinearStats] = {}
    hooks = []
    for m in modules:
        st = stats[id(m)] = LinearStats(m.in_features, hessian)
        hooks.append(m.register_forward_hook(lambda mod, inp, out, st=st: st.add(inp[0])))
    n = 0
    try:
        with torch.no_grad():
            for batch in calibration:
                _call(model, batch)
                n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("calibration: no batches")
    return stats


def smooth_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisor ``max|x_j|^alpha / max|W_:j|^(1 - alpha)``
    (float32 ``[K]``); channels never active in calibration or with a zero weight column get 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_alpha must be in [0, 1], got {alpha}")
    xa = act_absmax.to(torch.float64)
    wa = weight.detach().to(torch.float64).abs().amax(0).cpu()
    ok = (xa > 0) & (wa > 0)
    s = xa.clamp_min(1e-30) ** alpha / wa.clamp_min(1e-30) ** (1.0 - alpha)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(1e-5, 1e5)
    return s.to(torch.float32)


def _hinv_upper(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (GPTQ's form)."""
    H = hessian.to(torch.float64).clone()
    d = torch.diagonal(H)
    dead = d == 0
    d[dead] = 1.0  # inputs never active in calibration: no information, plain rounding
    mean = d.mean()
    for _ in range(6):  # not positive definite in float64: more dampening, as GPTQ does
        d += damp * mean
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        damp *= 10.0
    raise RuntimeError("GPTQ: sum x x^T is not positive definite even with dampening")


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, damp: float, quantize_columns,
          batch: int):
    """Generic blocked GPTQ. ``quantize_columns(W_block, j0)`` rounds the columns of the lazy
    batch starting at column ``j0`` one at a time; it is called with a closure ``step`` that it
    must call per column. Returns the rounded (dequantised) float64 weight."""
    W = weight.detach().to("cpu", torch.float64).clone()
    N, K = W.shape
    if hessian.shape != (K, K):
        raise ValueError(f"GPTQ: Hessian must be [{K}, {K}], got {tuple(hessian.shape)}")
    Hinv = _hinv_upper(hessian, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, K, batch):
        i2 = min(i1 + batch, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = quantize_columns(W1, i1, i)
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01):
    """GPTQ rounding to symmetric per-row int8. Returns ``(qweight int8 [N, K], SCB float32
    [N])`` with ``W ~= qweight * SCB[:, None] / 127`` (the ``Int8Linear`` layout; ``SCB`` is the
    row absmax of ``weight``, as plain quantisation)."""
    scb = weight.detach().to("cpu", torch.float32).abs().amax(1)
    inv = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb)).to(torch.float64)
    step = torch.where(scb > 0, scb.to(torch.float64) / 127.0, torch.zeros_like(inv))

    def rnd(W1, j0, i):
        return torch.round(W1[:, i] * inv).clamp(-127, 127) * step

    Q = _gptq(weight, hessian, damp, rnd, 128)
    q = torch.where(step[:, None] > 0, torch.round(Q / step.clamp_min(1e-300)[:, None]),
                    torch.zeros_like(Q))
    return q.clamp(-127, 127).to(torch.int8).to(weight.device), scb.to(weight.device)


def gptq_4bit(weight: torch.Tensor, hessian: torch.Tensor, fmt: str = "nf4",
              block_size: int = 64, damp: float = 0.01):
    """GPTQ rounding to a blockwise absmax 4-bit format (``nf4`` / ``fp4``, bitsandbytes'
    layout and code decisions). Blocks must not span rows (``K % block_size == 0``). Returns
    ``(packed, QuantState)`` exactly as :func:`tilefuse.quantize_4bit` lays them out."""
    from . import quant

    if fmt not in GPTQ_FORMATS_4BIT:
        raise ValueError(f"GPTQ 4-bit supports {GPTQ_FORMATS_4BIT}, got {fmt!r}")
    N, K = weight.shape
    if K % block_size:
        raise ValueError(f"GPTQ 4-bit: in_features ({K}) must be a multiple of block_size "
                         f"({block_size}) so that blocks do not span rows")
    table = code_table(fmt, torch.float64)
    codes_of = _nf4_codes if fmt == "nf4" else _fp4_codes
    absmax = torch.zeros(N, K // block_size, dtype=torch.float32)
    codes = torch.zeros(N, K, dtype=torch.int64)
    cur = {}

    def rnd(W1, j0, i):
        j = j0 + i
        if j % block_size == 0:  # the block lies inside this lazy batch (batch % block == 0)
            a = W1[:, i:i + block_size].abs().amax(1).to(torch.float32)
            absmax[:, j // block_size] = a
            cur["a"] = a
            cur["inv"] = torch.where(a > 0, 1.0 / a, torch.zeros_like(a))  # fp32, as bnb
        a = cur["a"]
        y = W1[:, i].to(torch.float32) * cur["inv"]
        c = codes_of(y)
        codes[:, j] = c
        return table[c] * a.to(torch.float64)

    _gptq(weight, hessian, damp, rnd, max(128, block_size))
    from .reference.lowbit import pack_nibbles
    dev = weight.device
    packed = pack_nibbles(codes.reshape(-1)).to(dev)
    state = quant.QuantState(fmt=fmt, block_size=int(block_size), shape=weight.shape,
                             dtype=weight.dtype, absmax=absmax.reshape(-1).to(dev),
                             code=code_table(fmt).to(dev))
    return packed, state

