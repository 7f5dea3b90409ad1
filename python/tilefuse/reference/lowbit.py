# SPDX-License-Identifier: Apache-2.0
"""Pure-PyTorch oracles of the low-bit formats and products, written from the definitions.

Quantisation decisions follow each format's definition, including where that definition is
fp32 arithmetic (bitsandbytes multiplies by the fp32 reciprocal of the block absmax and compares
against float literals); the products are computed in float64. Never imports the extension.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "NF4_TABLE", "FP4_TABLE", "E2M1_TABLE", "code_table", "dynamic_map",
    "quantize_4bit", "dequantize_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "pack_nibbles", "unpack_nibbles", "quantize_int8_rows", "int8_linear", "int8_linear_asym",
    "linear_4bit",
]

NF4_TABLE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# bitsandbytes "FP4": magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12 by 3-bit code, bit 3 = sign.
_FP4_MAG = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4_TABLE = [m / 12.0 for m in _FP4_MAG] + [-m / 12.0 for m in _FP4_MAG]
# OCP E2M1 (S EE M, bias 1): E=0 -> M * 0.5, else 2^(E-1) * (1 + M/2).
_E2M1_MAG = [(0.5 * (c & 1)) if (c >> 1) == 0 else 2.0 ** ((c >> 1) - 1) * (1 + 0.5 * (c & 1))
             for c in range(8)]
E2M1_TABLE = _E2M1_MAG + [-m for m in _E2M1_MAG]

# Thresholds as float32 values, exactly as bitsandbytes' CUDA quantisers compare (strict >).
_NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]
# FP4 magnitude thresholds on |y| and the magnitude code above each one.
_FP4_THRESHOLDS = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]
_FP4_MAG_BY_RANK = [0, 1, 6, 7, 4, 5, 2, 3]  # magnitude codes in increasing value order


def code_table(fmt: str, dtype=torch.float32) -> torch.Tensor:
    """The 16 values of a 4-bit format by code (int4: the integers 0..15)."""
    tables = {"nf4": NF4_TABLE, "fp4": FP4_TABLE, "e2m1": E2M1_TABLE,
              "int4": [float(i) for i in range(16)]}
    if fmt not in tables:
        raise ValueError(f"fmt must be one of {sorted(tables)}, got {fmt!r}")
    return torch.tensor(tables[fmt], dtype=torch.float32).to(dtype)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic-exponent code (Dettmers 2015), used to double-quantise absmax.

    Built the way its definition does it (float32 linspace and midpoints, scaled by decades),
    then sorted; 256 float32 values in [-1, 1].
    """
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n_items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                   else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        edges = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (-(max_exponent_bits - 1) + i)
        data += (decade * means).tolist()
        if signed:
            data += (-decade * means).tolist()
    if additional_items > 0:
        edges = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (decade * means).tolist()
        if signed:
            data += (-decade * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes -> uint8 [(n + 1) // 2, 1], element 2i in the high nibble (bitsandbytes)."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        raise ValueError("pack_nibbles needs an even count (pad with the code of 0.0)")
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1).to(torch.int64)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]


def _blocks(x: torch.Tensor, block: int):
    """Flat float32 x padded with zeros to whole blocks -> [nblocks, block], n."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = -(-n // block)
    pad = torch.zeros(nb * block - n, dtype=torch.float32)
    return torch.cat([flat, pad]).reshape(nb, block), n


def _nf4_codes(y: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(_NF4_THRESHOLDS, dtype=torch.float32)
    return (y.unsqueeze(-1) > t).sum(-1)


def _fp4_codes(y: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(_FP4_THRESHOLDS, dtype=torch.float32)
    rank = (y.abs().unsqueeze(-1) > t).sum(-1)
    mag = torch.tensor(_FP4_MAG_BY_RANK)[rank]
    return mag + 8 * (y < 0).to(torch.int64)


def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    a = y.abs().to(torch.float64)
    mags = torch.tensor(_E2M1_MAG, dtype=torch.float64)
    mid = (mags[:-1] + mags[1:]) / 2
    above = a.unsqueeze(-1) > mid
    tie_up = (a.unsqueeze(-1) == mid) & (torch.arange(7) % 2 == 1)  # ties go to the even code
    mag = (above | tie_up).sum(-1)
    return mag + 8 * (y < 0).to(torch.int64)


def quantize_4bit(w: torch.Tensor, fmt: str, block_size: int = 64):
    """Reference of ``tilefuse.quantize_4bit`` without double quantisation.

    Returns (packed uint8 [(n+1)//2, 1], absmax-or-scale float32 [nblocks], zero uint8 or None).
    """
    xb, n = _blocks(w, block_size)
    nblocks = xb.shape[0]
    valid = (torch.arange(nblocks * block_size) < n).reshape(nblocks, block_size)
    zero = None
    if fmt in ("nf4", "fp4"):
        absmax = xb.abs().amax(1)
        inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
        y = xb * inv[:, None]  # fp32 reciprocal multiply, as bitsandbytes' CUDA kernel
        codes = _nf4_codes(y) if fmt == "nf4" else _fp4_codes(y)
        scale = absmax
    elif fmt == "e2m1":
        amax = xb.abs().amax(1).to(torch.float64)
        e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-300))) - 2,
                        torch.full_like(amax, -127.0)).clamp(-127, 127)
        scale64 = torch.pow(2.0, e)
        codes = _e2m1_codes(xb.to(torch.float64) / scale64[:, None])
        scale = scale64.to(torch.float32)
    elif fmt == "int4":
        mn = xb.amin(1).clamp(max=0)
        mx = xb.amax(1).clamp(min=0)
        # Padding zeros do not change min/max since the range includes 0 anyway.
        scale = (mx - mn) / 15.0
        pos = scale > 0
        safe = torch.where(pos, scale, torch.ones_like(scale))
        z = torch.where(pos, torch.round(-mn / safe).clamp(0, 15), torch.zeros_like(scale))
        q = torch.round(xb / safe[:, None]) + z[:, None]
        codes = torch.where(pos[:, None], q.clamp(0, 15), torch.zeros_like(q)).to(torch.int64)
        zero = z.to(torch.uint8)
    else:
        raise ValueError(f"fmt must be 'nf4', 'fp4', 'e2m1' or 'int4', got {fmt!r}")
    # Padding positions hold the code of 0.0 (only the odd last nibble survives packing).
    zero_code = {"nf4": 7, "fp4": 0, "e2m1": 0}.get(fmt)
    if zero_code is None:
        zero_code_t = zero[:, None].to(torch.int64).expand_as(codes) if zero is not None else 0
        codes = torch.where(valid, codes, zero_code_t)
    else:
        codes = torch.where(valid, codes, torch.full_like(codes, zero_code))
    flat = codes.reshape(-1)[: n + (n % 2)]
    return pack_nibbles(flat), scale.to(torch.float32), zero


def dequantize_4bit(packed, absmax, fmt, block_size, shape, zero=None, dtype=torch.float32):
    """Reference dequantisation: table[q] * scale (int4: (q - zero) * scale), fp32 like the op."""
    n = math.prod(shape)
    q = unpack_nibbles(packed, n)
    b = torch.arange(n) // block_size
    s = absmax.to(torch.float32)[b]
    if fmt == "int4":
        v = (q.to(torch.float32) - zero.to(torch.float32)[b]) * s
    else:
        v = code_table(fmt)[q] * s
    return v.reshape(shape).to(dtype)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, block_size: int = 256):
    """Exact-nearest 8-bit code per element of x / absmax (ties to the lower code).

    bitsandbytes' search returns the nearest code except at rare ties; see the tests.
    """
    xb, n = _blocks(x, block_size)
    absmax = xb.abs().amax(1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    y = (xb * inv[:, None]).reshape(-1)[:n]
    mids = (code[:-1].to(torch.float64) + code[1:].to(torch.float64)) / 2
    q = torch.bucketize(y.to(torch.float64), mids)
    return q.to(torch.uint8).reshape(x.shape), absmax


def dequantize_blockwise_8bit(q, absmax, code, block_size=256):
    b = torch.arange(q.numel()) // block_size
    return (code[q.reshape(-1).long()] * absmax[b]).reshape(q.shape)


def quantize_int8_rows(x: torch.Tensor, threshold: float = 0.0):
    """LLM.int8() vector-wise quantisation of the rows of x [M, K].

    Returns (q int64 [M, K], scale float64 [M] = absmax / 127, outlier column mask [K]).
    Row absmax is over |x| < threshold; outlier columns (any |x| >= threshold) quantise to 0.
    """
    x32 = x.to(torch.float32)
    mask = torch.zeros(x.shape[-1], dtype=torch.bool)
    keep = torch.ones_like(x32, dtype=torch.bool)
    if threshold > 0:
        outl = x32.abs() >= threshold
        mask = outl.any(0)
        keep = ~outl
    absmax = torch.where(keep, x32.abs(), torch.zeros_like(x32)).amax(-1) if x32.shape[-1] else \
        torch.zeros(x32.shape[0])
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))  # fp32, as the op
    q = torch.round(x32 * inv[:, None]).clamp(-127, 127)  # round half to even
    q = torch.where(mask[None, :] | ~keep, torch.zeros_like(q), q)
    return q.to(torch.int64), absmax.to(torch.float64) / 127.0, mask


def int8_linear(x, qweight, weight_scale, bias=None, threshold=0.0):
    """Float64 reference of ``tilefuse.int8_linear``: exact int64 product of the quantised
    operands, dequantised, plus the outlier columns' float product with the int8 weights."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, sx, mask = quantize_int8_rows(x2, threshold)
    acc = (q @ qweight.to(torch.int64).t()).to(torch.float64)  # exact
    ws = weight_scale.to(torch.float64)
    out = acc * sx[:, None] * ws[None, :]
    if mask.any():
        xo = x2.to(torch.float32).to(torch.float64)[:, mask]
        wo = qweight.to(torch.float64)[:, mask]
        out = out + (xo @ wo.t()) * ws[None, :]
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.reshape(*shape[:-1], qweight.shape[0])


def int8_linear_asym(x, qweight, weight_scale, bias=None, threshold=0.0):
    """Float64 reference of ``Int8Linear(asym_act=True)``: per-token asymmetric activations.

    Each token is shifted by ``c = (max + min) / 2`` of its entries in the non-outlier columns
    (all columns when ``threshold == 0``; outlier columns as in LLM.int8(): any
    ``|x| >= threshold``), only those columns are shifted, the shifted input goes through
    :func:`int8_linear`, and ``c * (W m)`` (``m`` = the non-outlier column mask) is added back,
    so the product is unchanged and the symmetric int8 grid covers ``[min, max]`` instead of
    ``[-max|x|, max|x|]``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.float32)
    cols = (x2.abs() >= threshold).any(0) if threshold > 0 else \
        torch.zeros(x2.shape[-1], dtype=torch.bool)
    inf = torch.tensor(float("inf"))
    lo = torch.where(cols, inf, x2).amin(-1, keepdim=True)
    hi = torch.where(cols, -inf, x2).amax(-1, keepdim=True)
    c = (lo + hi) / 2
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    m = (~cols).to(torch.float32)
    out = int8_linear(x2 - c * m, qweight, weight_scale, bias, threshold)
    wm = (qweight.to(torch.float64) * weight_scale.to(torch.float64)[:, None]) @ m.to(torch.float64)
    out = out + c.to(torch.float64) * wm
    return out.reshape(*shape[:-1], qweight.shape[0])


def linear_4bit(x, weight_dequantized, bias=None):
    """Float64 x @ W^T (+ bias) with the dequantised fp32 weight."""
    out = x.to(torch.float64) @ weight_dequantized.to(torch.float64).t()
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out
