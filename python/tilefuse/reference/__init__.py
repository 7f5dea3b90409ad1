# SPDX-License-Identifier: Apache-2.0
"""Pure-PyTorch oracles built from the definitions (never from a kernel's tiling).

They never import the extension and are correct in float64; tests compare every kernel
against them.
"""

from . import lowbit
from .attention import attention

__all__ = ["attention", "lowbit"]
