# SPDX-License-Identifier: Apache-2.0
"""linear_4bit: fused-dequantisation GEMV/GEMM against the float64 reference, all formats,
double quantisation, odd shapes, dtypes, gradients, opcheck, torch.compile, bad input."""

import dataclasses

import pytest
import torch

import tilefuse
from tilefuse.reference import lowbit as ref

FMTS = ["nf4", "fp4", "e2m1", "int4"]


def _check(out, x, packed, state, bias=None):
    """fp32 accumulation over K terms: error ~ sqrt(K) * eps * sum|x w|; we bound it by
    K * eps * sum|x||w| / sqrt-ish slack. bf16/fp16 outputs add one rounding of the result."""
    w = tilefuse.dequantize_4bit(packed, state, torch.float32)
    expected = ref.linear_4bit(x.to(torch.float32), w, bias)
    scale = (x.to(torch.float64).abs() @ w.to(torch.float64).abs().t())
    if bias is not None:
        scale = scale + bias.to(torch.float64).abs()
    eps = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3,
           torch.float64: 1e-12}[out.dtype]
    err = (out.to(torch.float64) - expected).abs()
    assert (err <= eps * (scale + 1e-30) + 1e-30).all(), err.max().item()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 33])
def test_matches_reference_fast_path(fmt, M, cpu_isa):
    N, K = 40, 256  # K % 32 == 0: the AVX2 decoder path
    x = torch.randn(M, K)
    packed, st = tilefuse.quantize_4bit(torch.randn(N, K), fmt, 64)
    b = torch.randn(N)
    _check(tilefuse.linear_4bit(x, packed, st, b), x, packed, st, b)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("N,K,block", [(1, 1, 32), (7, 31, 32), (5, 53, 64), (9, 96, 64),
                                       (3, 1000, 256), (17, 33, 128), (2, 600, 32),
                                       (20, 4096, 4096), (16, 1536, 1024)])
def test_odd_shapes_and_blocks_spanning_rows(fmt, N, K, block, cpu_isa):
    x = torch.randn(4, K)
    packed, st = tilefuse.quantize_4bit(torch.randn(N, K), fmt, block)
    _check(tilefuse.linear_4bit(x, packed, st), x, packed, st)
    _check(tilefuse.linear_4bit(x[:1], packed, st), x[:1], packed, st)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("block", [32, 64])
def test_double_quant(fmt, block, cpu_isa):
    # Block 64 with K % 64 == 0 takes the 64-code GEMV steps (nested-scale variant); 32 the
    # 32-code ones; M = 1 and 3 both run the GEMV.
    x = torch.randn(3, 320)
    packed, st = tilefuse.quantize_4bit(torch.randn(72, 320), fmt, block, double_quant=True)
    assert st.double_quant
    _check(tilefuse.linear_4bit(x, packed, st), x, packed, st)
    _check(tilefuse.linear_4bit(x[:1], packed, st), x[:1], packed, st)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_activations(dtype, cpu_isa):
    x = torch.randn(2, 3, 128).to(dtype)
    b = torch.randn(48).to(dtype)
    packed, st = tilefuse.quantize_4bit(torch.randn(48, 128), "nf4", 64)
    out = tilefuse.linear_4bit(x, packed, st, b)
    assert out.dtype == dtype and out.shape == (2, 3, 48)
    _check(out, x, packed, st, b)


def test_tiers_agree():
    x = torch.randn(6, 512)
    packed, st = tilefuse.quantize_4bit(torch.randn(100, 512), "nf4", 64)
    outs = []
    for isa in ["cpu-generic"] + (["cpu-avx2"] if tilefuse.cpu_isa() == "cpu-avx2" else []):
        with tilefuse.backend.use_cpu_isa(isa):
            outs.append(tilefuse.linear_4bit(x, packed, st))
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    packed, st = tilefuse.quantize_4bit(torch.randn(12, 40), "nf4", 32, double_quant=True)
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: tilefuse.linear_4bit(x, packed, st, b), (x, b))


def test_gradient_float32_and_bf16(cpu_isa):
    packed, st = tilefuse.quantize_4bit(torch.randn(24, 64), "int4", 32)
    w = tilefuse.dequantize_4bit(packed, st, torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    y = tilefuse.linear_4bit(x, packed, st)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    xh = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    tilefuse.linear_4bit(xh, packed, st).sum().backward()
    assert xh.grad.dtype == torch.bfloat16


def test_opcheck():
    for fmt, dq in [("nf4", False), ("int4", True)]:
        packed, st = tilefuse.quantize_4bit(torch.randn(20, 64), fmt, 32, double_quant=dq)
        for x, b in [(torch.randn(3, 64), None), (torch.randn(1, 64), torch.randn(20)),
                     (torch.randn(2, 64, dtype=torch.float64, requires_grad=True), None)]:
            torch.library.opcheck(torch.ops.tilefuse.linear_4bit.default,
                                  (x, packed, *st._op_args(), b))


def test_compile_fullgraph():
    packed, st = tilefuse.quantize_4bit(torch.randn(24, 96), "nf4", 32, double_quant=True)
    b = torch.randn(24)

    def f(x):
        return torch.relu(tilefuse.linear_4bit(x, packed, st, b)) * 2

    x = torch.randn(4, 96)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_bad_inputs():
    packed, st = tilefuse.quantize_4bit(torch.randn(8, 64), "nf4", 32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        tilefuse.linear_4bit(torch.randn(2, 63), packed, st)
    with pytest.raises(TypeError, match="packed must be uint8"):
        tilefuse.linear_4bit(x, packed.to(torch.int8), st)
    with pytest.raises(TypeError, match="x must be float32"):
        tilefuse.linear_4bit(x.to(torch.int64), packed, st)
    with pytest.raises(ValueError, match="bias must have shape"):
        tilefuse.linear_4bit(x, packed, st, torch.randn(9))
    with pytest.raises(ValueError, match="block_size"):
        tilefuse.linear_4bit(x, packed, dataclasses.replace(st, block_size=33))
    with pytest.raises(ValueError, match="fmt"):
        tilefuse.linear_4bit(x, packed, dataclasses.replace(st, fmt="nf5"))
    with pytest.raises(ValueError, match="packed has"):
        tilefuse.linear_4bit(x, packed, dataclasses.replace(st, shape=torch.Size([9, 64])))
    with pytest.raises(ValueError, match="2-D"):
        tilefuse.linear_4bit(x, packed, dataclasses.replace(st, shape=torch.Size([8, 8, 8])))


def test_empty_batch_and_strided_input(cpu_isa):
    packed, st = tilefuse.quantize_4bit(torch.randn(8, 64), "nf4", 32)
    assert tilefuse.linear_4bit(torch.randn(2, 0, 64), packed, st).shape == (2, 0, 8)
    x = torch.randn(64, 5).t()  # non-contiguous rows
    assert torch.equal(tilefuse.linear_4bit(x, packed, st),
                       tilefuse.linear_4bit(x.contiguous(), packed, st))
