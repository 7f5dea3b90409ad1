# SPDX-License-Identifier: Apache-2.0
"""Fake implementations and autograd of ``tilefuse::na_fwd/na_bwd`` and
``tilefuse::window_attention_fwd/bwd`` (schemas and checks live in csrc/neighborhood/)."""

import torch


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_fake(q, v):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


def _opt_grad(t, like):
    return torch.empty_like(t) if t is not None else like.new_empty((0,))


@torch.library.register_fake("tilefuse::na_fwd")
def _na_fwd_fake(q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale):
    return _fwd_fake(q, v)


@torch.library.register_fake("tilefuse::na_bwd")
def _na_bwd_fake(grad_out, grad_lse, q, k, v, rpb, out, lse, kernel_size, dilation, stride,
                 is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _opt_grad(rpb, q)


@torch.library.register_fake("tilefuse::window_attention_fwd")
def _window_fwd_fake(q, k, v, rpb, k_pad, v_pad, window_size, shift_size, scale):
    return _fwd_fake(q, v)


@torch.library.register_fake("tilefuse::window_attention_bwd")
def _window_bwd_fake(grad_out, grad_lse, q, k, v, rpb, k_pad, v_pad, out, lse, window_size,
                     shift_size, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _opt_grad(rpb, q),
            _opt_grad(k_pad, q), _opt_grad(v_pad, q))


def _na_setup(ctx, inputs, output):
    q, k, v, rpb, kernel_size, dilation, stride, is_causal, scale = inputs
    ctx.save_for_backward(q, k, v, rpb, *output)
    ctx.args = (kernel_size, dilation, stride, is_causal, scale)


def _na_backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, drpb = torch.ops.tilefuse.na_bwd(grad_out, grad_lse, q, k, v, rpb, out, lse,
                                                 *ctx.args)
    return dq, dk, dv, (drpb if rpb is not None else None), None, None, None, None, None


def _window_setup(ctx, inputs, output):
    q, k, v, rpb, k_pad, v_pad, window_size, shift_size, scale = inputs
    ctx.save_for_backward(q, k, v, rpb, k_pad, v_pad, *output)
    ctx.args = (window_size, shift_size, scale)


def _window_backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, k_pad, v_pad, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, drpb, dkp, dvp = torch.ops.tilefuse.window_attention_bwd(
        grad_out, grad_lse, q, k, v, rpb, k_pad, v_pad, out, lse, *ctx.args)
    return (dq, dk, dv, drpb if rpb is not None else None, dkp if k_pad is not None else None,
            dvp if v_pad is not None else None, None, None, None)


torch.library.register_autograd("tilefuse::na_fwd", _na_backward, setup_context=_na_setup)
torch.library.register_autograd("tilefuse::window_attention_fwd", _window_backward,
                                setup_context=_window_setup)
