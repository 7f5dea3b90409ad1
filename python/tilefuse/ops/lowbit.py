# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) implementations and autograd of the low-bit ops (``csrc/lowbit/``).

Argument checks live in C++; the fakes only compute output shapes and dtypes. Gradients flow
to the activations only: the quantized weights are frozen (LoRA / QLoRA-style fine-tuning), and
the activation quantisation of ``int8_linear`` is treated as identity (straight-through), as
bitsandbytes' ``MatMul8bitLt`` does: ``grad_x = grad_out @ dequant(W)``.
"""

import torch


@torch.library.register_fake("tilefuse::quantize_int8")
def _quantize_int8_fake(w):
    return (w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[:1], dtype=torch.float32))


@torch.library.register_fake("tilefuse::int8_linear")
def _int8_linear_fake(x, qweight, weight_scale, bias, threshold):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("tilefuse::quantize_4bit")
def _quantize_4bit_fake(w, fmt, block_size):
    n = w.numel()
    nblocks = -(-n // block_size)
    packed = w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = w.new_empty((nblocks,), dtype=torch.float32)
    zero = w.new_empty((nblocks if fmt == "int4" else 0,), dtype=torch.uint8)
    return packed, absmax, zero


@torch.library.register_fake("tilefuse::quantize_blockwise_8bit")
def _quantize_blockwise_8bit_fake(x, code, block_size):
    nblocks = -(-x.numel() // block_size)
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((nblocks,), dtype=torch.float32)


@torch.library.register_fake("tilefuse::dequantize_4bit")
def _dequantize_4bit_fake(packed, absmax, zero, nested_absmax, nested_code, nested_offset, fmt,
                          block_size, nested_block_size, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("tilefuse::linear_4bit")
def _linear_4bit_fake(x, packed, absmax, zero, nested_absmax, nested_code, nested_offset, fmt,
                      block_size, nested_block_size, shape, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _grad_through(grad_out, weight, x_dtype):
    """grad_out[..., N] @ weight[N, K] in fp32 (never the slow bf16/fp16 CPU matmul)."""
    compute = torch.float64 if x_dtype == torch.float64 else torch.float32
    return torch.matmul(grad_out.to(compute), weight.to(compute)).to(x_dtype)


def _int8_setup_context(ctx, inputs, output):
    x, qweight, weight_scale, bias, threshold = inputs
    ctx.save_for_backward(qweight, weight_scale)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int8_backward(ctx, grad_out):
    qweight, weight_scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        w = qweight.to(torch.float32) * weight_scale[:, None]
        grad_x = _grad_through(grad_out, w, ctx.x_dtype)
    grad_bias = None
    if ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None


torch.library.register_autograd("tilefuse::int8_linear", _int8_backward,
                                setup_context=_int8_setup_context)


def _4bit_setup_context(ctx, inputs, output):
    (x, packed, absmax, zero, nested_absmax, nested_code, nested_offset, fmt, block_size,
     nested_block_size, shape, bias) = inputs
    ctx.save_for_backward(packed, absmax, zero, nested_absmax, nested_code, nested_offset)
    ctx.args = (fmt, block_size, nested_block_size, shape)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _4bit_backward(ctx, grad_out):
    packed, absmax, zero, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    fmt, block_size, nested_block_size, shape = ctx.args
    grad_x = None
    if ctx.needs_input_grad[0]:
        dtype = torch.float64 if ctx.x_dtype == torch.float64 else torch.float32
        w = torch.ops.tilefuse.dequantize_4bit(packed, absmax, zero, nested_absmax, nested_code,
                                               nested_offset, fmt, block_size, nested_block_size,
                                               shape, dtype)
        grad_x = _grad_through(grad_out, w, ctx.x_dtype)
    grad_bias = None
    if ctx.needs_input_grad[11]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return (grad_x,) + (None,) * 10 + (grad_bias,)


torch.library.register_autograd("tilefuse::linear_4bit", _4bit_backward,
                                setup_context=_4bit_setup_context)
