# SPDX-License-Identifier: Apache-2.0
"""Pure-PyTorch oracles built from the definitions (never from a kernel's tiling).

They never import the extension and are correct in float64; tests compare every kernel
against them.
"""

from . import lowbit
from .attention import attention
from .block_sparse import block_sparse_attention, block_sparse_element_mask
from .neighborhood import na, window_attention

__all__ = ["attention", "block_sparse_attention", "block_sparse_element_mask", "lowbit", "na",
           "window_attention"]
