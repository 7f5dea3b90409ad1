# SPDX-License-Identifier: Apache-2.0
"""``nn.Module`` layers backed by tilefuse kernels."""

from .attention import FusedAttention
from .neighborhood import (NeighborhoodAttention1D, NeighborhoodAttention2D,
                           NeighborhoodAttention3D, WindowAttention)

__all__ = ["FusedAttention", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
           "NeighborhoodAttention3D", "WindowAttention"]
