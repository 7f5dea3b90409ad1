# SPDX-License-Identifier: Apache-2.0
"""tilefuse.nn neighborhood / window layers: kernel backend against the reference backend."""

import pytest
import torch

from tilefuse.nn import (NeighborhoodAttention1D, NeighborhoodAttention2D,
                         NeighborhoodAttention3D, WindowAttention)


def _assert_matches_reference(m, ref, x):
    """The kernel-backed layer and its reference-backend twin agree in output and in the
    gradients to the input and every parameter. Returns the kernel output."""
    out, out_ref = m(x), ref(x)
    assert torch.allclose(out, out_ref, atol=1e-5)
    g = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
    g_ref = torch.autograd.grad(out_ref.square().sum(), [x] + list(ref.parameters()))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    return out


@pytest.mark.parametrize("cls,shape,kw", [
    (NeighborhoodAttention1D, (2, 40, 32), dict(kernel_size=7, dilation=2)),
    (NeighborhoodAttention2D, (2, 12, 14, 32), dict(kernel_size=5, rpb=True)),
    (NeighborhoodAttention2D, (1, 12, 12, 32), dict(kernel_size=(3, 5), stride=2, is_causal=(True, False))),
    (NeighborhoodAttention3D, (1, 4, 6, 6, 32), dict(kernel_size=3)),
], ids=["1d-dilated", "2d-rpb", "2d-strided-causal", "3d"])
def test_neighborhood_layers_match_reference_backend(cls, shape, kw):
    m = cls(32, 4, **kw)
    ref = cls(32, 4, backend="reference", **kw)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    assert _assert_matches_reference(m, ref, x).shape == x.shape
    assert "kernel_size=" in repr(m) and "backend='tilefuse'" in repr(m)


@pytest.mark.parametrize("shape,ws,shift", [((2, 14, 14, 24), 7, 3), ((1, 10, 13, 24), 4, 2)],
                         ids=["aligned", "padded"])
def test_window_layer_matches_reference_backend(shape, ws, shift):
    m = WindowAttention(24, 3, ws, shift_size=shift)
    with torch.no_grad():
        m.qkv.bias.normal_()
        m.relative_position_bias_table.normal_()
    ref = WindowAttention(24, 3, ws, shift_size=shift, backend="reference")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    _assert_matches_reference(m, ref, x)


def test_layer_bad_input():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        NeighborhoodAttention2D(30, 4, kernel_size=3)
    with pytest.raises(ValueError, match="input must be"):
        NeighborhoodAttention2D(32, 4, kernel_size=3)(torch.randn(1, 10, 32))
    with pytest.raises(ValueError, match="rpb is defined for non-causal"):
        NeighborhoodAttention1D(32, 4, kernel_size=3, is_causal=True, rpb=True)
    with pytest.raises(ValueError, match="input must be"):
        WindowAttention(24, 3, 7)(torch.randn(1, 14, 24))


def test_layers_compile_fullgraph():
    m = NeighborhoodAttention2D(32, 4, kernel_size=3, rpb=True)
    x = torch.randn(1, 8, 8, 32)
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(out, m(x), atol=1e-6)
    w = WindowAttention(24, 3, 4, shift_size=2)
    y = torch.randn(1, 8, 8, 24)
    assert torch.allclose(torch.compile(w, fullgraph=True, backend="aot_eager")(y), w(y), atol=1e-6)


def test_block_sparse_layer_matches_reference_backend():
    from tilefuse.nn import BlockSparseAttention

    m = BlockSparseAttention(64, 4, num_kv_heads=2, block_size=32, topk=2, causal=True)
    ref = BlockSparseAttention(64, 4, num_kv_heads=2, block_size=32, topk=2, causal=True,
                               backend="reference")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 150, 64, requires_grad=True)
    _assert_matches_reference(m, ref, x)
    assert "topk=2" in repr(m)
    with pytest.raises(ValueError, match="pass block_mask"):
        BlockSparseAttention(64, 4)(x)
