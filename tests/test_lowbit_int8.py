# SPDX-License-Identifier: Apache-2.0
"""int8 W8A8: quantisation, exactness of the int8 product, LLM.int8() outliers, dtypes,
gradients, opcheck, torch.compile, bad input."""

import pytest
import torch

import tilefuse
from tilefuse.reference import lowbit as ref

# Tolerances: the op's epilogue is fp32 (int32 -> float, two scale multiplies, bias add):
# a few float32 ulps of |out|, far below any int8 quantisation effect.
RTOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _close(out, expected, dtype):
    exp = expected.to(dtype).to(torch.float64)  # the reference rounded once to the output dtype
    tol = RTOL[dtype] * (expected.abs().max().item() + 1e-30)
    assert (out.to(torch.float64) - exp).abs().max().item() <= tol


def test_quantize_int8_matches_reference(cpu_isa):
    w = torch.randn(70, 131) * 5
    w[3] = 0.0
    q, s = tilefuse.quantize_int8(w)
    rq, rs, _ = ref.quantize_int8_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q.long(), rq)
    assert torch.equal(s, (w.abs().amax(1) / 127.0))
    assert torch.allclose(s.double(), rs, rtol=1e-7)
    assert q.abs().max() == 127 and torch.equal(q[3], torch.zeros(131, dtype=torch.int8))
    d = tilefuse.dequantize_int8(q, s)
    assert ((d - w).abs() <= s[:, None] * 0.5 * (1 + 1e-5)).all()


def test_round_half_to_even():
    # absmax 127 -> factor 1: x.5 values round to even.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -2.5]])
    q, _ = tilefuse.quantize_int8(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -2]]


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 64, 96), (3, 7, 31), (5, 50, 33), (32, 48, 256),
                                   (17, 13, 1000), (2, 100, 4096 + 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_reference(M, N, K, bias, cpu_isa):
    x = torch.randn(M, K)
    w = torch.randn(N, K)
    b = torch.randn(N) if bias else None
    q, s = tilefuse.quantize_int8(w)
    out = tilefuse.int8_linear(x, q, s, b)
    _close(out, ref.int8_linear(x, q, s, b), torch.float32)


def worst_case_operands(sign, M, N, K):
    """Activations [M, K] and int8 weights [N, K] with every entry +-127 ("same": rows of one
    sign, "random", "alternating" columns): the largest int32 sums an int8 GEMM can see."""
    if sign == "same":
        a = torch.full((M, K), 127.0)
        w = torch.full((N, K), 127, dtype=torch.int8)
        w[::2] = -127
    elif sign == "random":
        a = torch.where(torch.rand(M, K) < 0.5, -127.0, 127.0)
        w = torch.where(torch.rand(N, K) < 0.5, -127, 127).to(torch.int8)
    else:
        a = torch.full((M, K), 127.0)
        a[:, 1::2] = -127.0
        w = torch.full((N, K), 127, dtype=torch.int8)
        w[:, 1::2] = -127
        w[1::2] = -w[1::2]
    return a, w


@pytest.mark.parametrize("sign", ["same", "random", "alternating"])
def test_int8_product_exact_on_worst_case(sign, cpu_isa):
    """All entries +-127 with unit scales: the output is the int32 dot product itself, which
    must equal the int64 reference exactly (any 16-bit saturation in the kernel shows here)."""
    K = 4096 + 13  # with a tail; |sum| up to 127*127*4109 = 66.3M (> 2^24: compared as floats)
    M, N = 5, 11
    a, w = worst_case_operands(sign, M, N, K)
    ones = torch.ones(N)
    out = tilefuse.int8_linear(a, w, ones)  # activation scale = 127 / 127 = 1
    exact = a.long() @ w.long().t()
    assert torch.equal(out, exact.to(torch.float32))
    # Under 2^24 the float result is the integer itself.
    out_small = tilefuse.int8_linear(a[:, :1024], w[:, :1024].contiguous(), ones)
    assert torch.equal(out_small.long(), a[:, :1024].long() @ w[:, :1024].long().t())


@pytest.mark.parametrize("M,N,K", [(4, 33, 516), (67, 97, 1030), (130, 64, 3), (133, 45, 2085)])
def test_int8_product_exact_packed_panels(M, N, K, cpu_isa):
    """The packed-panel kernel (M >= 4) on extreme values, including weight entries of -128 that
    a user-made qweight may hold: several K slices, panel and row tails, exact int32 products."""
    g = torch.Generator().manual_seed(M * N + K)
    a = torch.where(torch.rand(M, K, generator=g) < 0.5, -127.0, 127.0)
    a[torch.rand(M, K, generator=g) < 0.1] = 0.0
    a[:, 0] = 127.0  # every row keeps scale 1
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    w[torch.rand(N, K, generator=g) < 0.3] = -128
    w[torch.rand(N, K, generator=g) < 0.3] = 127
    out = tilefuse.int8_linear(a, w, torch.ones(N))
    assert torch.equal(out.double(), (a.long() @ w.long().t()).double().float().double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_linear_half_dtypes(dtype, cpu_isa):
    x = torch.randn(4, 3, 160).to(dtype)
    w = torch.randn(40, 160)
    b = torch.randn(40).to(dtype)
    q, s = tilefuse.quantize_int8(w)
    out = tilefuse.int8_linear(x, q, s, b)
    assert out.dtype == dtype and out.shape == (4, 3, 40)
    _close(out, ref.int8_linear(x, q, s, b), dtype)


def test_all_zero_activation_row(cpu_isa):
    x = torch.randn(3, 64)
    x[1] = 0
    q, s = tilefuse.quantize_int8(torch.randn(8, 64))
    out = tilefuse.int8_linear(x, q, s)
    assert torch.equal(out[1], torch.zeros(8))


@pytest.mark.parametrize("M", [1, 6, 20])  # 20: the packed-panel kernel (M >= 16)
def test_outlier_routing(M, cpu_isa):
    K, N, thr = 300, 30, 6.0  # N = 30: a full and a partial 8-column group per panel
    x = torch.randn(M, K)
    cols = [5, 77, 299]
    x[0, cols] = torch.tensor([9.0, -7.5, 6.0])  # 6.0 counts (>= threshold)
    w = torch.randn(N, K)
    q, s = tilefuse.quantize_int8(w)
    out = tilefuse.int8_linear(x, q, s, None, threshold=thr)
    _close(out, ref.int8_linear(x, q, s, None, thr), torch.float32)
    _, _, mask = ref.quantize_int8_rows(x, thr)
    assert mask.nonzero().view(-1).tolist() == cols
    # The outlier columns really left the int8 path: their fp32 product (with the int8 weight
    # columns dequantised) is what makes the difference to the threshold-0 result.
    plain = tilefuse.int8_linear(x, q, s)
    assert not torch.allclose(out, plain)
    # A threshold above every |x| is the plain int8 product.
    assert torch.equal(tilefuse.int8_linear(x, q, s, None, threshold=100.0), plain)


def test_outlier_matches_bitsandbytes_semantics():
    """Row statistics over non-outliers; outlier columns zeroed in the int8 operand; outlier
    product with the int8 weight dequantised (SCB / 127): written out with plain torch."""
    x = torch.randn(4, 64)
    x[1, 3] = 20.0
    x[2, 40] = -8.0
    w = torch.randn(16, 64)
    q, s = tilefuse.quantize_int8(w)
    thr = 6.0
    outl = x.abs() >= thr
    cols = outl.any(0)
    xs = torch.where(outl, 0.0, x)
    row_stats = xs.abs().amax(1)
    ca = torch.round(xs * (127.0 / row_stats[:, None]))
    ca[:, cols] = 0
    main = (ca.double() @ q.double().t()) * (row_stats.double()[:, None] / 127) * s.double()[None]
    extra = x[:, cols].double() @ (q[:, cols].double() * s.double()[:, None]).t()
    out = tilefuse.int8_linear(x, q, s, None, thr)
    assert torch.allclose(out.double(), main + extra, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,thr,gemm_path", [(2, 2.0, False), (40, 1.0, True)])
def test_many_outlier_columns(M, thr, gemm_path, cpu_isa):
    """Up to 256 outlier products per call are added in the kernel epilogue; more take the
    gathered fp32 GEMM path. Both must match the reference."""
    x = torch.randn(M, 200) * 1.5
    q, s = tilefuse.quantize_int8(torch.randn(30, 200))
    _, _, mask = ref.quantize_int8_rows(x, thr)
    assert (M * int(mask.sum()) > 256) == gemm_path and int(mask.sum()) > 20
    b = torch.randn(30)
    _close(tilefuse.int8_linear(x, q, s, b, thr), ref.int8_linear(x, q, s, b, thr), torch.float32)


def test_gradients_to_input_and_bias(cpu_isa):
    x = torch.randn(3, 2, 48, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    q, s = tilefuse.quantize_int8(torch.randn(20, 48))
    y = tilefuse.int8_linear(x, q, s, b, threshold=2.5)
    g = torch.randn_like(y)
    y.backward(g)
    w = tilefuse.dequantize_int8(q, s)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)  # straight-through estimator
    assert torch.allclose(b.grad, g.reshape(-1, 20).sum(0), rtol=1e-5, atol=1e-5)
    xh = torch.randn(2, 48, dtype=torch.bfloat16, requires_grad=True)
    tilefuse.int8_linear(xh, q, s).sum().backward()
    assert xh.grad.dtype == torch.bfloat16


def test_opcheck():
    x = torch.randn(5, 40)
    q, s = tilefuse.quantize_int8(torch.randn(12, 40))
    for args in [(x, q, s, None, 0.0), (x, q, s, torch.randn(12), 0.0),
                 (x * 4, q, s, torch.randn(12), 5.0),
                 (x.to(torch.bfloat16), q, s, None, 0.0)]:
        torch.library.opcheck(torch.ops.tilefuse.int8_linear.default, args)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.tilefuse.int8_linear.default, (x, q, s, None, 0.0),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_compile_fullgraph():
    q, s = tilefuse.quantize_int8(torch.randn(24, 64))
    b = torch.randn(24)

    def f(x):
        return torch.relu(tilefuse.int8_linear(x, q, s, b, threshold=3.0)) * 2

    x = torch.randn(7, 64) * 2
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_bad_inputs():
    x = torch.randn(4, 32)
    q, s = tilefuse.quantize_int8(torch.randn(8, 32))
    with pytest.raises(TypeError, match="qweight must be int8"):
        tilefuse.int8_linear(x, q.to(torch.uint8), s)
    with pytest.raises(TypeError, match="x must be float32"):
        tilefuse.int8_linear(x.to(torch.int32), q, s)
    with pytest.raises(TypeError, match="weight_scale must be float32"):
        tilefuse.int8_linear(x, q, s.double())
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        tilefuse.int8_linear(torch.randn(4, 31), q, s)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        tilefuse.int8_linear(x, q, s[:-1])
    with pytest.raises(ValueError, match="qweight must be 2-D"):
        tilefuse.int8_linear(x, q.view(-1), s)
    with pytest.raises(ValueError, match="bias must have shape"):
        tilefuse.int8_linear(x, q, s, torch.randn(7))
    with pytest.raises(TypeError, match="bias must be a floating"):
        tilefuse.int8_linear(x, q, s, torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="threshold"):
        tilefuse.int8_linear(x, q, s, None, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        tilefuse.int8_linear(x, q, s, None, threshold=float("nan"))
    with pytest.raises(ValueError, match="w must be 2-D"):
        tilefuse.quantize_int8(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="w must be a floating"):
        tilefuse.quantize_int8(torch.ones(3, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="qweight must be int8"):
        tilefuse.dequantize_int8(q.to(torch.int16), s)
    with pytest.raises(ValueError, match="scale must have shape"):
        tilefuse.dequantize_int8(q, s[:3])


def test_empty_batch_and_strided_input(cpu_isa):
    q, s = tilefuse.quantize_int8(torch.randn(8, 64))
    assert tilefuse.int8_linear(torch.randn(0, 64), q, s, None, 2.0).shape == (0, 8)
    x = torch.randn(64, 5).t()
    assert torch.equal(tilefuse.int8_linear(x, q, s), tilefuse.int8_linear(x.contiguous(), q, s))


try:
    import warnings as _w
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        import bitsandbytes as bnb
except Exception:  # noqa: BLE001 - optional cross-check
    bnb = None


@pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed (optional)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_int8_matches_bitsandbytes(dtype, cpu_isa):
    w = torch.randn(48, 256).to(dtype)
    q, s = tilefuse.quantize_int8(w)
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w)
    assert torch.equal(q, cb) and torch.equal(scb, w.float().abs().amax(1))
    assert torch.equal(s, scb / 127.0)


@pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed (optional)")
def test_loads_bitsandbytes_linear8bitlt_state():
    lin = torch.nn.Linear(64, 16)
    b = bnb.nn.Linear8bitLt(64, 16, has_fp16_weights=False, threshold=0.0)
    b.load_state_dict(lin.state_dict())
    sd = b.to("cpu").state_dict()
    m = tilefuse.nn.Int8Linear(64, 16)
    m.load_state_dict(sd)
    assert torch.equal(m.weight, sd["weight"]) and torch.equal(m.SCB, sd["SCB"])
    x = torch.randn(3, 64)
    w = sd["weight"].double() * (sd["SCB"].double() / 127)[:, None]
    assert torch.allclose(m(x).double(), x.double() @ w.t() + sd["bias"].double(), rtol=0.05,
                          atol=0.05)
