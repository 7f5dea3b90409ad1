# SPDX-License-Identifier: Apache-2.0
"""``nn.Module`` layers backed by tilefuse kernels."""

from .attention import BlockSparseAttention, FusedAttention
from .linear import Int8Linear, Linear4bit
from .neighborhood import (NeighborhoodAttention1D, NeighborhoodAttention2D,
                           NeighborhoodAttention3D, WindowAttention)

__all__ = ["BlockSparseAttention", "FusedAttention", "Int8Linear", "Linear4bit",
           "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
           "WindowAttention"]
