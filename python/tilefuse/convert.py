# SPDX-License-Identifier: Apache-2.0
"""``tilefuse.convert``: swap layers inside an existing model, in place, keeping weights.

One recursive walk (torchao ``quantize_`` style): handlers keyed by module class, an optional
``filter_fn(module, qualified_name)``, and a report of what was replaced and what was left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

LINEAR_FORMATS = ("int8", "llm.int8", "nf4", "fp4", "e2m1", "int4")


@dataclass(frozen=True)
class LinearConfig:
    """How ``convert`` quantises ``nn.Linear`` layers.

    fmt: ``"int8"`` (W8A8), ``"llm.int8"`` (W8A8 with LLM.int8() outliers at ``threshold``),
        or a 4-bit weight-only format ``"nf4"``, ``"fp4"``, ``"e2m1"``, ``"int4"``.
    block_size / double_quant: 4-bit quantisation blocks (bitsandbytes defaults: 64, False).
    min_features: layers with fewer input or output features stay in floating point.

    Calibrated options (off by default; each needs ``calibration``):
    smooth_alpha: SmoothQuant migration strength in [0, 1] (int8 formats; 0.5 is the paper's
        default): ``Int8Linear.smooth = max|x|^a / max|W|^(1-a)`` per input channel, from the
        calibration inputs. Adds a ``smooth`` key to those layers' state dicts.
    gptq: round the weights with GPTQ against the calibration inputs' ``sum x x^T``
        (int8 formats, ``nf4``, ``fp4``); the stored format is unchanged (bitsandbytes-compatible).
        4-bit layers whose ``in_features`` is not a multiple of ``block_size`` (blocks spanning
        rows) and layers the calibration never runs are rounded to nearest.
    gptq_damp: GPTQ's dampening, a fraction of the mean diagonal of ``sum x x^T``.
    asym_act: int8 formats: per-token asymmetric activations (``Int8Linear(asym_act=True)``;
        no calibration needed).
    calibration: an iterable of model inputs, each a dict (keyword arguments), a tuple / list
        (positional) or a tensor; ``convert`` runs the unconverted model on each once, without
        gradients, and records every ``nn.Linear``'s input (padding tokens included, so pass
        unpadded batches). Use text that is not your evaluation data.
    """

    fmt: str
    threshold: float = 6.0
    block_size: int = 64
    double_quant: bool = False
    min_features: int = 0
    smooth_alpha: Optional[float] = None
    gptq: bool = False
    gptq_damp: float = 0.01
    asym_act: bool = False
    calibration: Optional[Iterable[Any]] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.fmt not in LINEAR_FORMATS:
            raise ValueError(f"linear format must be one of {LINEAR_FORMATS}, got {self.fmt!r}")
        int8 = self.fmt in ("int8", "llm.int8")
        if self.smooth_alpha is not None:
            if not int8:
                raise ValueError("smooth_alpha (SmoothQuant) applies to the int8 formats, "
                                 f"not {self.fmt!r}")
            if not 0.0 <= self.smooth_alpha <= 1.0:
                raise ValueError(f"smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.asym_act and not int8:
            raise ValueError(f"asym_act applies to the int8 formats, not {self.fmt!r}")
        if self.gptq:
            if not (int8 or self.fmt in ("nf4", "fp4")):
                raise ValueError(f"gptq supports int8, llm.int8, nf4 and fp4, not {self.fmt!r}")
            if self.double_quant:
                raise ValueError("gptq with double_quant is not supported")
        if self.needs_calibration and self.calibration is None:
            raise ValueError("smooth_alpha / gptq need calibration inputs (calibration=...)")

    @property
    def needs_calibration(self) -> bool:
        return self.smooth_alpha is not None or self.gptq


def _linear_config(linear: Union[None, str, LinearConfig]) -> Optional[LinearConfig]:
    if linear is None or isinstance(linear, LinearConfig):
        return linear
    if isinstance(linear, str):
        return LinearConfig(linear)
    raise TypeError(f"linear must be None, a format name or a LinearConfig, got {type(linear)}")


def _linear_handler(module: nn.Module, cfg: LinearConfig, stats: Optional[Dict[int, Any]]):
    """(replacement, None) or (None, reason) for nn.Linear; None for anything else."""
    if type(module) is not nn.Linear:
        return None
    if min(module.in_features, module.out_features) < cfg.min_features:
        return None, f"fewer than min_features={cfg.min_features} features"
    try:
        from .nn import Int8Linear, Linear4bit
    except ImportError as e:  # the low-bit layers are not in this build
        raise NotImplementedError(f"tilefuse.convert(linear=...): {e}") from e
    smooth = hessian = None
    if stats is not None:
        st = stats.get(id(module))  # a layer the calibration never ran is rounded plainly
        if st is not None and st.tokens and cfg.gptq and (
                cfg.fmt in ("int8", "llm.int8") or module.in_features % cfg.block_size == 0):
            hessian = st.hessian  # 4-bit blocks spanning rows: rounded plainly
        if st is not None and st.tokens and cfg.smooth_alpha is not None:
            from .calibration import smooth_scale
            smooth = smooth_scale(st.absmax, module.weight, cfg.smooth_alpha)
    if cfg.fmt in ("int8", "llm.int8"):
        return Int8Linear.from_linear(module, threshold=cfg.threshold if cfg.fmt == "llm.int8"
                                      else 0.0, smooth=smooth, hessian=hessian,
                                      gptq_damp=cfg.gptq_damp, asym_act=cfg.asym_act), None
    return Linear4bit.from_linear(module, fmt=cfg.fmt, block_size=cfg.block_size,
                                  double_quant=cfg.double_quant, hessian=hessian,
                                  gptq_damp=cfg.gptq_damp), None


@dataclass
class ConversionReport:
    replaced: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, from, to)
    left: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, class, reason)

    def __str__(self) -> str:
        lines = [f"tilefuse.convert: {len(self.replaced)} replaced, {len(self.left)} left"]
        lines += [f"  replaced {n}: {a} -> {b}" for n, a, b in self.replaced]
        lines += [f"  left     {n}: {c} ({r})" for n, c, r in self.left]
        return "\n".join(lines)


def _attention_handler(module: nn.Module, backend: str):
    """(replacement, None) or (None, reason) for attention-like modules; None if not one."""
    from .integrations import hf

    if type(module).__name__ == "SwinLayer":
        reason = hf.swin_why_not(module)
        if reason or backend != "tilefuse":
            return None, reason or "Swin layers have no reference backend (the original is one)"
        return hf.HFSwinLayer(module), None
    if type(module).__name__ == "Swinv2Layer":
        reason = hf.swinv2_why_not(module)
        if reason or backend != "tilefuse":
            return None, reason or "Swin layers have no reference backend (the original is one)"
        return hf.HFSwinv2Layer(module), None
    if type(module).__name__ == "NeighborhoodAttention" and hasattr(module, "rpb"):
        reason = hf.natten_why_not(module)
        if reason or backend != "tilefuse":
            return None, reason or "DiNAT attention has no reference backend here"
        return hf.HFNeighborhoodAttention(module), None
    if type(module).__name__ in hf.SPECS:
        reason = hf.why_not(module)
        if reason:
            return None, reason
        return hf.HFSelfAttention(module, backend=backend), None
    return None


def convert(model: nn.Module, *, attention: bool = True,
            linear: Union[None, str, LinearConfig] = None,
            filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
            backend: str = "tilefuse") -> ConversionReport:
    """Replace supported layers of ``model`` in place and return a :class:`ConversionReport`.

    attention: swap Hugging Face BERT / RoBERTa / ViT self-attention for the fused kernel
        (padding masks handled), Swin / SwinV2 layers for one fused window-attention call and
        DiNAT neighborhood attention for the fused NA kernel (see
        :func:`tilefuse.integrations.hf.enable_dinat`); the
        projections and bias tables are kept, so ``state_dict`` keys are unchanged.
    linear: ``None``, a format name (see :data:`LINEAR_FORMATS`) or a :class:`LinearConfig`:
        swap every ``nn.Linear`` (including the projections kept inside converted attention)
        for ``Int8Linear`` / ``Linear4bit``. A config with ``smooth_alpha`` / ``gptq`` first
        runs the model on its ``calibration`` inputs (see :class:`LinearConfig`).
    filter_fn(module, qualified_name) -> bool: convert only where it returns True.
    backend: ``"tilefuse"`` or ``"reference"`` (pure PyTorch, for A/B checks).
    """
    lin_cfg = _linear_config(linear)
    report = ConversionReport()
    stats = None
    if lin_cfg is not None and lin_cfg.needs_calibration:
        # One pass over the unconverted model: every nn.Linear's input statistics, keyed by
        # module identity (the converted attention keeps the same projection modules).
        from .calibration import collect_linear_stats
        lins = [m for n, m in model.named_modules() if type(m) is nn.Linear
                and min(m.in_features, m.out_features) >= lin_cfg.min_features
                and (filter_fn is None or filter_fn(m, n))]
        stats = collect_linear_stats(model, lin_cfg.calibration, lins, hessian=lin_cfg.gptq)

    def walk(parent: nn.Module, prefix: str):
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            result = _attention_handler(child, backend) if attention else None
            if result is None and lin_cfg is not None:
                result = _linear_handler(child, lin_cfg, stats)
            if result is not None:
                if filter_fn is not None and not filter_fn(child, fqn):
                    report.left.append((fqn, type(child).__name__, "excluded by filter_fn"))
                    continue
                new, reason = result
                if new is None:
                    report.left.append((fqn, type(child).__name__, reason))
                else:
                    setattr(parent, name, new)
                    report.replaced.append((fqn, type(child).__name__, type(new).__name__))
                    walk(new, fqn)  # e.g. the projections kept inside converted attention
                continue
            walk(child, fqn)

    walk(model, "")
    return report
