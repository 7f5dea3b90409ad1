# SPDX-License-Identifier: Apache-2.0
"""Which CPU kernel tier runs (kebab-case backend ids: ``cpu-avx2``, ``cpu-generic``)."""

import contextlib

import torch


def cpu_isa() -> str:
    """The CPU kernel tier in use: ``"cpu-avx2"`` or ``"cpu-generic"``."""
    return torch.ops.tilefuse._cpu_isa()


def set_cpu_isa(name: str) -> None:
    """Force a CPU tier (A/B checks); raises if the CPU lacks it.

    The environment variable ``TILEFUSE_CPU_ISA=generic|avx2`` sets the initial tier.
    """
    torch.ops.tilefuse._set_cpu_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str):
    """Context manager form of :func:`set_cpu_isa`."""
    old = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(old)
