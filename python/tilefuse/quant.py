# SPDX-License-Identifier: Apache-2.0
"""User API of the low-bit GEMMs: int8 W8A8 (with LLM.int8() outliers) and 4-bit weight-only.

Formats and layouts are described in docs/lowbit.md. NF4 / FP4 (with or without double
quantisation) are bit-compatible with bitsandbytes, so ``QuantState.from_dict`` accepts a
bitsandbytes ``Linear4bit`` state and ``as_dict`` writes one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, Optional, Tuple

import torch

from .reference.lowbit import code_table, dynamic_map

__all__ = [
    "QuantState", "quantize_int8", "dequantize_int8", "int8_linear",
    "quantize_4bit", "dequantize_4bit", "linear_4bit", "FORMATS_4BIT",
]

FORMATS_4BIT = ("nf4", "fp4", "e2m1", "int4")
_NESTED_BLOCK = 256  # bitsandbytes' block size for double quantisation
_dynamic_map_cache: Dict[str, torch.Tensor] = {}


def _nested_code() -> torch.Tensor:
    if "signed" not in _dynamic_map_cache:
        _dynamic_map_cache["signed"] = dynamic_map(signed=True)
    return _dynamic_map_cache["signed"]


# ----------------------------------------------------------------------------------- int8

def quantize_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``qweight = round_half_even(w * 127 / absmax_row)``.

    ``w`` is ``[N, K]`` (out_features, in_features). Returns ``(qweight int8 [N, K],
    scale float32 [N])`` with ``w ~= qweight * scale[:, None]``; ``scale = absmax / 127`` (so
    bitsandbytes' ``SCB`` is ``127 * scale``). An all-zero row gets scale 0.
    """
    return torch.ops.tilefuse.quantize_int8(w)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``qweight * scale[:, None]`` computed in fp32, returned in ``dtype``."""
    if qweight.dtype != torch.int8:
        raise TypeError(f"dequantize_int8: qweight must be int8, got {qweight.dtype}")
    if scale.shape != qweight.shape[:1]:
        raise ValueError(f"dequantize_int8: scale must have shape [{qweight.shape[0]}], "
                         f"got {tuple(scale.shape)}")
    return (qweight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, threshold: float = 0.0) -> torch.Tensor:
    """W8A8 linear ``y = x @ W^T + bias`` with ``W = qweight * weight_scale[:, None]``.

    ``x [..., K]`` (float32 / bfloat16 / float16) is quantised per token inside the op
    (symmetric +-127, round half to even); the int8 x int8 -> int32 products are exact, and
    dequantisation and bias are fused into the epilogue. Output in ``x.dtype``.

    ``threshold > 0`` is LLM.int8(): input columns with any ``|x| >= threshold`` go through an
    fp32 product with the int8 weight columns dequantised, the rest through int8, with the row
    statistics taken over the non-outlier entries (bitsandbytes' semantics).
    Gradient flows to ``x`` (straight-through: ``grad_out @ W``) and to ``bias``.
    """
    return torch.ops.tilefuse.int8_linear(x, qweight, weight_scale, bias, float(threshold))


# ----------------------------------------------------------------------------------- 4-bit

@dataclasses.dataclass
class QuantState:
    """Everything needed to use a 4-bit packed weight besides the packed bytes.

    ``absmax`` is the per-block scale: the block absmax for nf4 / fp4, the power-of-two (E8M0)
    scale for e2m1, the step size for int4; float32 ``[nblocks]``, or uint8 codes when double
    quantised (then ``nested_absmax``, ``nested_code`` and ``nested_offset`` give
    ``absmax = nested_code[absmax] * nested_absmax[b // nested_block_size] + nested_offset``).
    ``zero`` holds the int4 zero points (uint8 ``[nblocks]``). ``shape`` and ``dtype`` are the
    original weight's. ``code`` is the 16-entry table (bitsandbytes' ``quant_map``).
    """

    fmt: str
    block_size: int
    shape: torch.Size
    dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    zero: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    nested_offset: Optional[torch.Tensor] = None
    nested_block_size: int = _NESTED_BLOCK

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def _op_args(self):
        n = math.prod(self.shape)
        last = self.shape[-1] if len(self.shape) else 1
        shape2 = [n // last if last else 0, last]
        return (self.absmax, self.zero, self.nested_absmax, self.nested_code, self.nested_offset,
                self.fmt, self.block_size, self.nested_block_size, shape2)

    def to(self, device) -> "QuantState":
        """Moves the state's tensors to ``device`` (never changes their dtypes)."""
        def mv(t):
            return None if t is None else t.to(device)
        return dataclasses.replace(
            self, absmax=mv(self.absmax), code=mv(self.code), zero=mv(self.zero),
            nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code),
            nested_offset=mv(self.nested_offset))

    # bitsandbytes-compatible serialisation ------------------------------------------------
    def as_dict(self, packed: bool = True) -> Dict[str, torch.Tensor]:
        """The state as bitsandbytes' ``QuantState.as_dict(packed=True)`` lays it out.

        Keys: ``absmax``, ``quant_map``, (``nested_absmax``, ``nested_quant_map``), and
        ``quant_state.bitsandbytes__<fmt>`` (JSON as uint8) for nf4 / fp4. e2m1 and int4, which
        bitsandbytes does not have, use ``quant_state.tilefuse__<fmt>`` and add ``zero``.
        """
        meta = {
            "quant_type": self.fmt,
            "blocksize": self.block_size,
            "dtype": str(self.dtype).replace("torch.", ""),
            "shape": list(self.shape),
        }
        d = {"absmax": self.absmax, "quant_map": self.code}
        if self.double_quant:
            d["nested_absmax"] = self.nested_absmax
            d["nested_quant_map"] = self.nested_code.clone()
            meta.update({"nested_blocksize": self.nested_block_size, "nested_dtype": "float32",
                         "nested_offset": float(self.nested_offset.item())})
        if self.zero is not None:
            d["zero"] = self.zero
        if not packed:
            d.update(meta)
            return d
        owner = "bitsandbytes" if self.fmt in ("nf4", "fp4") else "tilefuse"
        blob = json.dumps(meta).encode("utf-8")
        d[f"quant_state.{owner}__{self.fmt}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, torch.Tensor]) -> "QuantState":
        """Inverse of :meth:`as_dict`; also reads a bitsandbytes ``Linear4bit`` state (the keys
        under ``weight.``, prefix removed)."""
        keys = [k for k in d if k.startswith("quant_state.")]
        if len(keys) != 1:
            raise ValueError(
                f"QuantState.from_dict: expected one 'quant_state.*' entry, got {keys}")
        meta = json.loads(bytes(d[keys[0]].to(torch.uint8).cpu().tolist()).decode("utf-8"))
        fmt = meta["quant_type"]
        if fmt not in FORMATS_4BIT:
            raise ValueError(f"QuantState.from_dict: unknown quant_type {fmt!r}")
        nested = "nested_absmax" in d
        return cls(
            fmt=fmt, block_size=int(meta["blocksize"]), shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]), absmax=d["absmax"], code=d["quant_map"],
            zero=d.get("zero"),
            nested_absmax=d["nested_absmax"] if nested else None,
            nested_code=d["nested_quant_map"] if nested else None,
            nested_offset=(torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
                           if nested else None),
            nested_block_size=int(meta.get("nested_blocksize", _NESTED_BLOCK)),
        )


def quantize_4bit(w: torch.Tensor, fmt: str = "nf4", block_size: int = 64,
                  double_quant: bool = False) -> Tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantisation of ``w`` (any shape; a linear weight is ``[N, K]``).

    Blocks are ``block_size`` (power of two, 32..4096) consecutive elements of the flattened
    tensor; codes are packed two per byte, first element in the high nibble: uint8
    ``[(numel + 1) // 2, 1]``, exactly bitsandbytes' layout.

    ``fmt``: ``"nf4"`` / ``"fp4"`` (bitsandbytes' tables, absmax scaling, bit-compatible),
    ``"e2m1"`` (OCP MX FP4 values with a power-of-two block scale, ties to even, saturating),
    ``"int4"`` (asymmetric: scale = (max - min) / 15 over a range that includes 0, uint8 zero
    point). ``double_quant`` quantises the per-block scales again like bitsandbytes'
    ``compress_statistics`` (mean offset, block 256, 8-bit dynamic map); not for e2m1, whose
    scales are already 8-bit powers of two.
    """
    if fmt not in FORMATS_4BIT:
        raise ValueError(f"quantize_4bit: fmt must be one of {FORMATS_4BIT}, got {fmt!r}")
    if double_quant and fmt == "e2m1":
        raise ValueError("quantize_4bit: double_quant is not supported for fmt='e2m1' (its "
                         "block scales are powers of two, already 8-bit E8M0)")
    packed, absmax, zero = torch.ops.tilefuse.quantize_4bit(w, fmt, int(block_size))
    state = QuantState(fmt=fmt, block_size=int(block_size), shape=w.shape, dtype=w.dtype,
                       absmax=absmax, code=code_table(fmt).to(w.device),
                       zero=zero if fmt == "int4" else None)
    if double_quant:
        offset = absmax.mean()
        code = _nested_code().to(w.device)
        qabs, absmax2 = torch.ops.tilefuse.quantize_blockwise_8bit(absmax - offset, code,
                                                                   _NESTED_BLOCK)
        state.absmax = qabs
        state.nested_absmax = absmax2
        state.nested_code = code
        state.nested_offset = offset.to(torch.float32)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Unpacks to ``state.shape`` in ``dtype`` (default ``state.dtype``); values computed in
    fp32 as ``table[q] * absmax`` (int4: ``(q - zero) * scale``)."""
    out = torch.ops.tilefuse.dequantize_4bit(packed, *state._op_args(), dtype or state.dtype)
    return out.reshape(state.shape)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ dequantize_4bit(packed, state)^T + bias`` with the dequantisation fused into
    the GEMV / GEMM kernels (fp32 accumulation). ``state.shape`` must be ``[N, K]`` and
    ``x [..., K]`` float32 / bfloat16 / float16 (float64 for gradcheck). Output in
    ``x.dtype``; gradient flows to ``x`` and ``bias``."""
    if len(state.shape) != 2:
        raise ValueError(f"linear_4bit: state.shape must be 2-D [N, K], got {tuple(state.shape)}")
    return torch.ops.tilefuse.linear_4bit(x, packed, *state._op_args(), bias)


def _linear_4bit_parts(x, packed, absmax, zero, nested_absmax, nested_code, nested_offset, fmt,
                       block_size, nested_block_size, shape, bias):
    """``linear_4bit`` on the state's tensors spelled out (what nn.Linear4bit.forward uses, so
    that torch.compile traces plain tensors and constants)."""
    return torch.ops.tilefuse.linear_4bit(x, packed, absmax, zero, nested_absmax, nested_code,
                                          nested_offset, fmt, block_size, nested_block_size,
                                          shape, bias)
