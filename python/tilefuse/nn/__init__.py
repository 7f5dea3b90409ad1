# SPDX-License-Identifier: Apache-2.0
"""``nn.Module`` layers backed by tilefuse kernels."""

from .attention import FusedAttention

__all__ = ["FusedAttention"]
