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


_SMOOTH = torch.rand(96, generator=torch.Generator().manual_seed(0)) * 4 + 0.25


def _layers(linear):
    return [
        Int8Linear.from_linear(linear),
        Int8Linear.from_linear(linear, threshold=2.0),
        Int8Linear.from_linear(linear, threshold=2.0, smooth=_SMOOTH, asym_act=True),
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


@pytest.mark.parametrize("idx", range(7))
def test_state_dict_round_trip_bitwise(linear, idx):
    layer = _layers(linear)[idx]
    x = torch.randn(4, 96)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh = type(layer)(96, 40, **({"threshold": layer.threshold, "asym_act": layer.asym_act}
                                   if isinstance(layer, Int8Linear) else {}))
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
    sds = Int8Linear.from_linear(linear, smooth=_SMOOTH).state_dict()
    assert set(sds) == {"weight", "bias", "SCB", "weight_format", "smooth"}
    plain = Int8Linear.from_linear(linear, smooth=_SMOOTH)
    plain.load_state_dict(sd8)  # a checkpoint without smoothing drops it
    assert plain.smooth is None and set(plain.state_dict()) == set(sd8)


def test_int8_smooth_matches_reference(linear):
    """SmoothQuant layer = the reference W8A8 product of x / s with the smoothed weight."""
    x = torch.randn(5, 96) * 3
    for thr in (0.0, 2.0):
        m = Int8Linear.from_linear(linear, threshold=thr, smooth=_SMOOTH)
        q, s = tilefuse.quantize_int8(linear.weight.detach() * _SMOOTH)
        assert torch.equal(m.weight, q) and torch.allclose(m.weight_scale, s)
        ref = tilefuse.reference.lowbit.int8_linear(x / _SMOOTH, q, s, linear.bias, thr)
        assert torch.allclose(m(x).double(), ref, rtol=1e-5, atol=1e-5)
        w = m.dequantized_weight()
        assert (w - linear.weight).norm() / linear.weight.norm() < 0.02
    with pytest.raises(ValueError, match="smooth"):
        Int8Linear.from_linear(linear, smooth=-_SMOOTH)


@pytest.mark.parametrize("thr", [0.0, 6.0])
def test_int8_asym_act_matches_reference(linear, thr):
    """Per-token asymmetric activations: the reference formula, and a smaller error than the
    symmetric layer on one-sided (post-GELU-like) inputs."""
    x = torch.nn.functional.gelu(torch.randn(2, 6, 96) * 1.5)
    x[0, 1, 5] = 8.0  # an outlier column when thr = 6
    m = Int8Linear.from_linear(linear, threshold=thr, asym_act=True)
    ref = tilefuse.reference.lowbit.int8_linear_asym(x, m.weight, m.weight_scale, linear.bias,
                                                     thr)
    assert torch.allclose(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    sym = Int8Linear.from_linear(linear, threshold=thr)
    fp = linear(x)
    assert (m(x) - fp).norm() < 0.75 * (sym(x) - fp).norm()
    assert "asym_act=True" in repr(m)
    # all-outlier rows and all-equal rows stay finite
    z = torch.full((3, 96), 7.0)
    assert torch.isfinite(m(z)).all()


def test_gptq_diagonal_hessian_is_round_to_nearest(linear):
    """With uncorrelated inputs (diagonal sum x x^T) GPTQ has nothing to compensate: its codes
    are the plain quantiser's."""
    from tilefuse.calibration import gptq_4bit, gptq_int8
    w = linear.weight.detach()
    h = torch.diag(torch.rand(96, dtype=torch.float64) + 0.5)
    q, scb = gptq_int8(w, h)
    q0, _ = tilefuse.quantize_int8(w)
    assert torch.equal(scb, w.abs().amax(1))
    assert (q.to(torch.int32) - q0.to(torch.int32)).abs().max() <= 1
    assert (q != q0).float().mean() < 1e-3  # float64 vs float32 ties only
    for fmt, bs in (("nf4", 32), ("fp4", 32)):
        packed, st = gptq_4bit(w, h, fmt, bs)
        p0, st0 = tilefuse.quantize_4bit(w, fmt, bs)
        assert torch.equal(packed, p0) and torch.equal(st.absmax, st0.absmax)
        assert st.shape == st0.shape and torch.equal(st.code, st0.code)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_gptq_reduces_output_error(fmt):
    """On correlated inputs GPTQ rounding gives a smaller ||X W^T - X Q^T|| than rounding to
    nearest (its objective), in the ordinary layer formats (measured ratio ~0.7)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 96, generator=g) @ (torch.randn(96, 96, generator=g) / 4 + torch.eye(96))
    h = x.double().t() @ x.double()
    if fmt == "int8":
        rtn = Int8Linear.from_linear(linear)
        gq = Int8Linear.from_linear(linear, hessian=h)
    else:
        rtn = Linear4bit.from_linear(linear, "nf4", 32)
        gq = Linear4bit.from_linear(linear, "nf4", 32, hessian=h)
    w = linear.weight.detach()
    e_rtn = (x @ (rtn.dequantized_weight() - w).t()).norm()
    e_gq = (x @ (gq.dequantized_weight() - w).t()).norm()
    assert e_gq < 0.85 * e_rtn, (e_gq, e_rtn)
    sd = gq.state_dict()  # an ordinary layer of its format
    fresh = type(gq)(96, 40)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), gq(x))


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
    ms = Int8Linear.from_linear(linear, threshold=6.0, smooth=_SMOOTH, asym_act=True)
    x[0, 3] = 9.0  # one outlier column
    assert torch.equal(torch.compile(ms, fullgraph=True)(x), ms(x))


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
