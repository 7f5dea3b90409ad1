# SPDX-License-Identifier: Apache-2.0
"""``tilefuse.convert``: swap layers inside an existing model, in place, keeping weights.

One recursive walk (torchao ``quantize_`` style): handlers keyed by module class, an optional
``filter_fn(module, qualified_name)``, and a report of what was replaced and what was left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from torch import nn


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

    if type(module).__name__ in hf.SPECS:
        reason = hf.why_not(module)
        if reason:
            return None, reason
        return hf.HFSelfAttention(module, backend=backend), None
    return None


def convert(model: nn.Module, *, attention: bool = True, linear=None,
            filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
            backend: str = "tilefuse") -> ConversionReport:
    """Replace supported layers of ``model`` in place and return a :class:`ConversionReport`.

    attention: swap Hugging Face BERT / RoBERTa / ViT self-attention for the fused kernel
        (padding masks handled; the projections are kept, so ``state_dict`` keys are unchanged).
    linear: ``None`` or a low-bit format; not available in this build yet.
    filter_fn(module, qualified_name) -> bool: convert only where it returns True.
    backend: ``"tilefuse"`` or ``"reference"`` (pure PyTorch, for A/B checks).
    """
    if linear is not None:
        raise NotImplementedError(
            "tilefuse.convert(linear=...): low-bit linear layers are not in this build yet")
    report = ConversionReport()

    def walk(parent: nn.Module, prefix: str):
        for name, child in list(parent.named_children()):
            fqn = f"{prefix}.{name}" if prefix else name
            result = _attention_handler(child, backend) if attention else None
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
                continue
            walk(child, fqn)

    walk(model, "")
    return report
