# SPDX-License-Identifier: Apache-2.0
"""tilefuse.nn.Int8Linear / Linear4bit: from_linear, extra_repr, state_dict round trip,
.to() semantics, backward to the input, bitsandbytes state-dict compatibility."""

import io

import pytest
import torch

import tilefuse
from tilefuse.nn import Int8Linear, Linear4bit

try:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
except Exception:  # noqa: BLE001 - optional cross-check
    bnb = None


def _layers(linear):
    return [
        Int8Linear.from_linear(linear),
        Int8Linear.from_linear(linear, threshold=2.0),
        Linear4bit.from_linear(linear, "nf4", 64, double_quant=True),
        Linear4bit.from_linear(linear, "fp4", 32),
        Linear4bit.from_linear(linear, "e2m1", 32),
        Linear4bit.from_linear(linear, "int4", 64, double_quant=True),
    ]


@pytest.fixture
def linear():
    return torch.nn.Linear(96, 40)


def test_from_linear_matches_functional(linear):
    x = torch.randn(3, 96) * 2
    w = linear.weight.detach()
    q, s = tilefuse.quantize_int8(w)
    m = Int8Linear.from_linear(linear, threshold=2.0)
    assert torch.equal(m(x), tilefuse.int8_linear(x, q, s, linear.bias, threshold=2.0))
    assert m.weight.dtype == torch.int8 and torch.equal(m.SCB, w.abs().amax(1))
    packed, st = tilefuse.quantize_4bit(w, "nf4", 64, double_quant=True)
    m4 = Linear4bit.from_linear(linear, "nf4", 64, double_quant=True)
    assert torch.equal(m4(x), tilefuse.linear_4bit(x, packed, st, linear.bias))
    for layer in _layers(linear):  # every layer approximates the float layer
        rel = (layer(x) - linear(x)).norm() / linear(x).norm()
        assert rel < 0.15, (layer, rel)


def test_extra_repr(linear):
    r = repr(Linear4bit.from_linear(linear, "int4", 128, double_quant=True))
    assert "fmt=int4" in r and "block_size=128" in r and "double_quant=True" in r
    assert "in_features=96" in r and "backend=cpu-" in r
    r8 = repr(Int8Linear.from_linear(linear, threshold=6.0))
    assert "threshold=6.0" in r8 and "out_features=40" in r8


@pytest.mark.parametrize("idx", range(6))
def test_state_dict_round_trip_bitwise(linear, idx):
    layer = _layers(linear)[idx]
    x = torch.randn(4, 96)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh = type(layer)(96, 40, **({"threshold": layer.threshold} if isinstance(layer, Int8Linear)
                                   else {}))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), layer(x))
    assert set(fresh.state_dict()) == set(sd)


def test_state_dict_keys_bitsandbytes_layout(linear):
    sd = Linear4bit.from_linear(linear, "nf4", 64, double_quant=True).state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map",
                       "weight.nested_absmax", "weight.nested_quant_map",
                       "weight.quant_state.bitsandbytes__nf4"}
    sd8 = Int8Linear.from_linear(linear).state_dict()
    assert set(sd8) == {"weight", "bias", "SCB", "weight_format"}


def test_load_strict_reports_missing(linear):
    layer = Linear4bit(96, 40)
    with pytest.raises(RuntimeError, match="weight"):
        layer.load_state_dict({"bias": torch.zeros(40)})


def test_to_keeps_weights_packed(linear):
    for layer in _layers(linear):
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.to(torch.bfloat16)
        assert layer.bias.dtype == torch.bfloat16
        for k, v in layer.state_dict().items():
            if k != "bias":
                assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
        x = torch.randn(2, 96, dtype=torch.bfloat16)
        assert layer(x).dtype == torch.bfloat16
        layer.float().to("cpu")
        assert layer.bias.dtype == torch.float32


def test_backward_to_input_for_adapters(linear):
    """QLoRA-style: frozen quantized base + trainable low-rank adapter; gradients reach both the
    input and the adapter, and the base has no trainable weight."""
    for base in _layers(linear):
        base.bias.requires_grad_(False)
        a = torch.nn.Linear(96, 4, bias=False)
        b = torch.nn.Linear(4, 40, bias=False)
        x = torch.randn(5, 96, requires_grad=True)
        y = base(x) + b(a(x))
        y.square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert a.weight.grad is not None and b.weight.grad is not None
        assert [n for n, p in base.named_parameters() if p.requires_grad] == []
        w = base.dequantized_weight()
        g = torch.autograd.grad(base(x).sum(), x)[0]
        assert torch.allclose(g, w.sum(0).expand_as(g), rtol=1e-5, atol=1e-5)


def test_compile_module(linear):
    m = Linear4bit.from_linear(linear, "nf4", 64, double_quant=True)
    m8 = Int8Linear.from_linear(linear, threshold=3.0)
    x = torch.randn(3, 96)
    assert torch.equal(torch.compile(m, fullgraph=True)(x), m(x))
    assert torch.equal(torch.compile(m8, fullgraph=True)(x), m8(x))


@pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed (optional)")
def test_loads_bitsandbytes_linear4bit_state(linear):
    bl = bnb.nn.Linear4bit(96, 40, quant_type="nf4", compress_statistics=True)
    bl.load_state_dict(linear.state_dict())
    bl = bl.to("cpu")  # quantises on the CPU backend
    sd = bl.state_dict()
    ours = Linear4bit(96, 40)
    ours.load_state_dict(sd)
    x = torch.randn(3, 96)
    w_bnb = bnb.functional.dequantize_4bit(bl.weight.data, bl.weight.quant_state)
    assert torch.equal(ours.dequantized_weight(), w_bnb)
    expected = x.double() @ w_bnb.double().t() + bl.bias.double()
    assert torch.allclose(ours(x).double(), expected, rtol=1e-5, atol=1e-5)
