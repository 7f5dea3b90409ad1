# SPDX-License-Identifier: Apache-2.0
"""Modules: quantized linear layers (attention modules may join later)."""

from .linear import Int8Linear, Linear4bit

__all__ = ["Int8Linear", "Linear4bit"]
