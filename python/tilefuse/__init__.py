# SPDX-License-Identifier: Apache-2.0
"""tilefuse: fused attention and low-bit GEMM kernels for PyTorch."""

import torch

from . import _C  # noqa: F401  (registers the torch.ops.tilefuse schemas and kernels)
from . import ops  # noqa: F401  (fake implementations and autograd)
from . import nn, reference
from .functional import attention, block_sparse_attention
from .neighborhood import na1d, na2d, na3d, window_attention
from .backend import cpu_isa, set_cpu_isa
from .block_mask import BlockMask, topk_block_mask
from .convert import ConversionReport, LinearConfig, convert
from .quant import (QuantState, dequantize_4bit, dequantize_int8, int8_linear, linear_4bit,
                    quantize_4bit, quantize_int8)

__version__ = "0.1.0"

__all__ = ["attention", "block_sparse_attention", "na1d", "na2d", "na3d", "window_attention",
           "BlockMask", "topk_block_mask", "convert", "ConversionReport", "LinearConfig",
           "QuantState", "quantize_int8", "dequantize_int8", "int8_linear", "quantize_4bit",
           "dequantize_4bit", "linear_4bit", "nn", "reference", "cpu_isa", "set_cpu_isa",
           "__version__"]
