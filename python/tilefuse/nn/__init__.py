# SPDX-License-Identifier: Apache-2.0
"""``nn.Module`` layers backed by tilefuse kernels."""

from .attention import BlockSparseAttention, FusedAttention
from .neighborhood import (NeighborhoodAttention1D, NeighborhoodAttention2D,
                           NeighborhoodAttention3D, WindowAttention)

__all__ = ["BlockSparseAttention", "FusedAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
           "NeighborhoodAttention3D", "WindowAttention"]
