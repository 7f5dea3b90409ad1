# SPDX-License-Identifier: Apache-2.0
"""Quantized linear layers: ``Int8Linear`` (W8A8, optional LLM.int8() outliers) and
``Linear4bit`` (nf4 / fp4 / e2m1 / int4 weight-only).

Weights are frozen buffers in their packed form; ``.to(dtype)`` / ``.half()`` etc. cast only the
bias (the compute dtype follows the input), device moves move everything, and nothing is ever
dequantized or re-quantized by ``.to()``. Gradients flow to the input and the bias, so adapters
(LoRA / QLoRA) can be trained on top. ``state_dict`` holds plain tensors in bitsandbytes' key
layout (``Linear8bitLt``: ``weight``, ``SCB``, ``weight_format``; ``Linear4bit``: ``weight`` and
``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.*``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import quant
from ..backend import cpu_isa

__all__ = ["Int8Linear", "Linear4bit"]

# Buffers that hold quantized state: moved between devices, never cast.
_FROZEN_DTYPE_BUFFERS = ("weight", "SCB", "weight_format", "absmax", "code", "zero",
                         "nested_absmax", "nested_code", "nested_offset", "smooth")


def _target_device(fn, t: torch.Tensor) -> torch.device:
    """The device ``Module._apply``'s fn would send ``t`` to, without letting it cast ``t``."""
    return fn(torch.empty(0, dtype=t.dtype, device=t.device)).device


class _QuantizedLinear(nn.Module):
    def _apply(self, fn, recurse=True):
        frozen = {}
        for name in _FROZEN_DTYPE_BUFFERS:
            t = self._buffers.get(name)
            if t is not None:
                frozen[name] = t.to(_target_device(fn, t))
                self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(frozen)
        return self

    @staticmethod
    def _init_weight(out_features, in_features, device, dtype):
        # nn.Linear's default initialisation, so a freshly constructed layer is usable.
        return nn.Linear(in_features, out_features, bias=False, device=device,
                         dtype=dtype).weight.detach()

    def _init_bias(self, bias: Optional[torch.Tensor], out_features, device, dtype):
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone().to(device=device, dtype=dtype))


class Int8Linear(_QuantizedLinear):
    """W8A8 linear layer: int8 weights (per output channel), activations quantised per token.

    ``threshold > 0`` enables LLM.int8() outlier decomposition (6.0 is the usual value).
    ``smooth`` (optional float32 ``[in_features]``, SmoothQuant): the layer computes
    ``int8_linear(x / smooth, Q(W * smooth))``, the same product with activation outliers
    migrated into the weights; ``weight`` / ``SCB`` then hold the smoothed weight. Without it the
    state dict is bitsandbytes' ``Linear8bitLt`` layout; with it, it has one more key, ``smooth``.
    ``asym_act=True``: per-token asymmetric activations (see
    :func:`tilefuse.reference.lowbit.int8_linear_asym`): each token is shifted to centre its
    range before the symmetric int8 quantisation and the shift's product ``c * (W m)`` is added
    back (one extra int8 GEMV of the column mask per call). Not serialised (like ``threshold``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 threshold: float = 0.0, device=None, dtype=None, asym_act: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.threshold = float(threshold)
        self.asym_act = bool(asym_act)
        self.register_buffer("smooth", None)
        self._set_weight(self._init_weight(out_features, in_features, device,
                                           dtype or torch.float32))
        # bitsandbytes' Linear8bitLt marker: 0 = row-major int8 weight.
        self.register_buffer("weight_format", torch.zeros((), dtype=torch.uint8, device=device))
        b = None
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features else 0.0
            b = torch.empty(out_features).uniform_(-bound, bound)
        self._init_bias(b, out_features, device, dtype or torch.float32)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 0.0,
                    smooth: Optional[torch.Tensor] = None, hessian: Optional[torch.Tensor] = None,
                    gptq_damp: float = 0.01, asym_act: bool = False) -> "Int8Linear":
        """Quantises ``linear.weight`` (per output channel, symmetric int8); copies the bias.

        smooth: SmoothQuant divisor per input channel (see the class docstring and
            :func:`tilefuse.calibration.smooth_scale`).
        hessian: ``sum x x^T`` ``[K, K]`` of the layer's input over calibration tokens: the
            weight is rounded by GPTQ (:func:`tilefuse.calibration.gptq_int8`) instead of to
            nearest. Same int8 layout and scales either way.
        asym_act: per-token asymmetric activations (class docstring).
        """
        m = cls.__new__(cls)  # skip __init__'s random weight
        _QuantizedLinear.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.threshold = float(threshold)
        m.asym_act = bool(asym_act)
        w = linear.weight.detach()
        m.register_buffer("smooth", None)
        if smooth is not None:
            smooth = smooth.detach().to(device=w.device, dtype=torch.float32)
            if smooth.shape != (linear.in_features,) or not bool((smooth > 0).all()):
                raise ValueError("Int8Linear: smooth must be positive with shape "
                                 f"[{linear.in_features}]")
            m.register_buffer("smooth", smooth)
            w = (w.to(torch.float32) * smooth).to(w.dtype)
            if hessian is not None:  # the Hessian of the smoothed input x / s
                inv = (1.0 / smooth.to(torch.float64)).cpu()
                hessian = hessian.to(torch.float64) * inv[:, None] * inv[None, :]
        if hessian is None:
            m._set_weight(w)
        else:
            from ..calibration import gptq_int8
            qweight, scb = gptq_int8(w, hessian, gptq_damp)
            m.register_buffer("weight", qweight)
            m.register_buffer("SCB", scb)
        m.register_buffer("weight_format",
                          torch.zeros((), dtype=torch.uint8, device=linear.weight.device))
        m._init_bias(linear.bias, linear.out_features, linear.weight.device,
                     linear.bias.dtype if linear.bias is not None else None)
        return m

    def _set_weight(self, w: torch.Tensor) -> None:
        qweight, _ = quant.quantize_int8(w)
        # SCB = the exact row absmax (bitsandbytes' convention); SCB / 127 reproduces the
        # kernel's scale bit for bit.
        scb = w.to(torch.float32).abs().amax(1) if w.shape[1] else torch.zeros(w.shape[0])
        self.register_buffer("weight", qweight)
        self.register_buffer("SCB", scb.to(device=w.device))

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.SCB / 127.0

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The weight the layer multiplies ``x`` by (the smoothing divided back out)."""
        w = quant.dequantize_int8(self.weight, self.weight_scale, torch.float32)
        if self.smooth is not None:
            w = w / self.smooth
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.asym_act:
            return self._asym_forward(x)
        return quant.int8_linear(x, self.weight, self.weight_scale, self.bias, self.threshold)

    def _asym_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale
        if self.threshold > 0:
            cols = (x.abs() >= self.threshold).reshape(-1, x.shape[-1]).any(0)
        else:
            cols = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
        lo = torch.where(cols, inf, x).amin(-1, keepdim=True)
        hi = torch.where(cols, -inf, x).amax(-1, keepdim=True)
        c = (lo + hi) / 2
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        m = (~cols).to(x.dtype)
        # W m exactly (0/1 quantise exactly to 0/127), one int8 GEMV.
        wm = quant.int8_linear(m.to(torch.float32)[None], self.weight, scale, None, 0.0)[0]
        y = quant.int8_linear(x - c * m, self.weight, scale, self.bias, self.threshold)
        return y + c * wm.to(y.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # ``smooth`` exists only in smoothed layers: adopt it (or drop it) from the checkpoint.
        key = prefix + "smooth"
        if key in state_dict:
            t = state_dict[key]
            self.register_buffer("smooth", t.detach().to(self.SCB.device, torch.float32).clone())
        elif self.smooth is not None:
            self.register_buffer("smooth", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, weight=int8 "
                f"per-channel, smooth={self.smooth is not None}, asym_act={self.asym_act}, "
                f"backend={cpu_isa()}")


class Linear4bit(_QuantizedLinear):
    """4-bit weight-only linear layer (fused dequantisation, fp32 accumulation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "nf4",
                 block_size: int = 64, double_quant: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = self._init_weight(out_features, in_features, device, dtype or torch.float32)
        self._set_quantized(*quant.quantize_4bit(w, fmt, block_size, double_quant))
        b = None
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features else 0.0
            b = torch.empty(out_features).uniform_(-bound, bound)
        self._init_bias(b, out_features, device, dtype or torch.float32)

    def _set_quantized(self, packed: torch.Tensor, state: quant.QuantState) -> None:
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit: quantized weight has shape {tuple(state.shape)}, "
                             f"expected {(self.out_features, self.in_features)}")
        self.fmt, self.block_size = state.fmt, state.block_size
        self.nested_block_size = state.nested_block_size
        self.weight_dtype = state.dtype
        for name, t in (("weight", packed), ("absmax", state.absmax), ("code", state.code),
                        ("zero", state.zero), ("nested_absmax", state.nested_absmax),
                        ("nested_code", state.nested_code),
                        ("nested_offset", state.nested_offset)):
            # Serialised by _save_to_state_dict in bitsandbytes' layout, hence not persistent.
            self.register_buffer(name, t, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "nf4", block_size: int = 64,
                    double_quant: bool = False, hessian: Optional[torch.Tensor] = None,
                    gptq_damp: float = 0.01) -> "Linear4bit":
        """Quantises ``linear.weight`` blockwise to ``fmt``; copies the bias.

        hessian: ``sum x x^T`` ``[K, K]`` of the layer's input over calibration tokens: the
            codes are chosen by GPTQ (:func:`tilefuse.calibration.gptq_4bit`; ``nf4`` / ``fp4``,
            no ``double_quant``, ``in_features % block_size == 0``) instead of to nearest. The
            result is an ordinary (bitsandbytes-compatible) packed weight and state.
        """
        m = cls.__new__(cls)
        _QuantizedLinear.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        if hessian is None:
            m._set_quantized(*quant.quantize_4bit(linear.weight.detach(), fmt, block_size,
                                                  double_quant))
        else:
            if double_quant:
                raise ValueError("Linear4bit.from_linear: GPTQ (hessian=) with double_quant is "
                                 "not supported")
            from ..calibration import gptq_4bit
            m._set_quantized(*gptq_4bit(linear.weight.detach(), hessian, fmt, block_size,
                                        gptq_damp))
        m._init_bias(linear.bias, linear.out_features, linear.weight.device,
                     linear.bias.dtype if linear.bias is not None else None)
        return m

    @property
    def quant_state(self) -> quant.QuantState:
        return quant.QuantState(
            fmt=self.fmt, block_size=self.block_size,
            shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
            absmax=self.absmax, code=self.code, zero=self.zero,
            nested_absmax=self.nested_absmax, nested_code=self.nested_code,
            nested_offset=self.nested_offset, nested_block_size=self.nested_block_size)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return quant.dequantize_4bit(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant._linear_4bit_parts(
            x, self.weight, self.absmax, self.zero, self.nested_absmax, self.nested_code,
            self.nested_offset, self.fmt, self.block_size, self.nested_block_size,
            [self.out_features, self.in_features], self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for k, v in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        sub = {k[len(wkey) + 1:]: state_dict[k] for k in list(state_dict)
               if k.startswith(wkey + ".")}
        if wkey in state_dict and sub:
            state = quant.QuantState.from_dict(sub)
            dev = self.weight.device
            self._set_quantized(state_dict[wkey].to(dev).view(torch.uint8), state.to(dev))
            for k in sub:
                state_dict.pop(wkey + "." + k)  # consumed here, not unexpected keys
            packed = state_dict.pop(wkey)
            try:
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)
            finally:
                state_dict[wkey] = packed
                for k, v in sub.items():
                    state_dict[wkey + "." + k] = v
        else:
            if strict:
                missing_keys.append(wkey)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={self.fmt}, block_size={self.block_size}, "
                f"double_quant={self.nested_absmax is not None}, backend={cpu_isa()}")
