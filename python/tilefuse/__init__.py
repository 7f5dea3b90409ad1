# SPDX-License-Identifier: Apache-2.0
"""tilefuse: fused attention and low-bit GEMM kernels for PyTorch."""

import torch

from . import _C  # noqa: F401  (registers the torch.ops.tilefuse schemas and kernels)
from . import ops  # noqa: F401  (fake implementations and autograd)
from . import reference
from .functional import attention
from .backend import cpu_isa, set_cpu_isa
from .quant import (QuantState, dequantize_4bit, dequantize_int8, int8_linear, linear_4bit,
                    quantize_4bit, quantize_int8)
from . import nn

__version__ = "0.1.0"

__all__ = ["attention", "reference", "cpu_isa", "set_cpu_isa", "nn", "QuantState",
           "quantize_int8", "dequantize_int8", "int8_linear", "quantize_4bit", "dequantize_4bit",
           "linear_4bit", "__version__"]
