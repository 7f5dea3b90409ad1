# SPDX-License-Identifier: Apache-2.0
"""CUDA low-bit ops (csrc/lowbit/cuda/) against the CPU ops and the float64 references.

Quantisers (quantize_int8, quantize_4bit, quantize_blockwise_8bit) and dequantize_4bit must be
bit-identical to the CPU kernels on the same input; int8_linear must match the reference within
the CPU test's tolerances (and the worst-case int8 product exactly); linear_4bit is checked
against x @ dequantize_4bit(W)^T, for the fused GEMV (M <= 8) and the dequantise + cuBLAS path
(M > 8). Skipped without a GPU.
"""

import dataclasses

import pytest
import torch

import tilefuse
from test_lowbit_int8 import worst_case_operands
from tilefuse.reference import lowbit as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FMTS = ["nf4", "fp4", "e2m1", "int4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 matmuls inside the ops (outlier GEMM, M > 8 4-bit path) in full fp32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------------- int8

INT8_RTOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _close_int8(out, expected, dtype):
    """As tests/test_lowbit_int8.py: a few fp32 ulps of max |out| (plus one output rounding)."""
    assert out.dtype == dtype
    exp = expected.to(dtype).to(torch.float64)
    tol = INT8_RTOL[dtype] * (expected.abs().max().item() + 1e-30)
    err = (out.cpu().to(torch.float64) - exp).abs().max().item()
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(70, 131), (1, 1), (3, 4096 + 3), (257, 64)])
def test_quantize_int8_bit_identical_to_cpu(dtype, shape):
    w = (torch.randn(shape) * 5).to(dtype)
    w[0, : min(3, shape[1])] = 0.0
    if shape[0] > 3:
        w[3] = 0.0  # all-zero row: scale 0, codes 0
    q, s = tilefuse.quantize_int8(w.to(DEV))
    qc, sc = tilefuse.quantize_int8(w)
    assert q.device.type == "cuda" and q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q.cpu(), qc)
    assert torch.equal(s.cpu(), sc)


def test_quantize_int8_round_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -2.5]], device=DEV)
    q, _ = tilefuse.quantize_int8(x)
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, 126, -2]]


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 64, 96), (3, 7, 31), (5, 50, 33),
                                   (32, 48, 256), (17, 13, 1000), (2, 100, 4096 + 5),
                                   (64, 130, 16), (130, 257, 48), (200, 129, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_reference(M, N, K, bias):
    """Tiles crossing M and N, K below / not a multiple of 16 and 32 (byte-wise weight loads)."""
    x = torch.randn(M, K)
    w = torch.randn(N, K)
    b = torch.randn(N) if bias else None
    q, s = tilefuse.quantize_int8(w)
    out = tilefuse.int8_linear(x.to(DEV), q.to(DEV), s.to(DEV), None if b is None else b.to(DEV))
    assert out.device.type == "cuda" and out.shape == (M, N)
    _close_int8(out, ref.int8_linear(x, q, s, b), torch.float32)
    _close_int8(out, tilefuse.int8_linear(x, q, s, b).to(torch.float64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 12, 64])
def test_int8_linear_half_dtypes(dtype, M):
    x = torch.randn(M, 3, 160).to(dtype)
    w = torch.randn(40, 160)
    b = torch.randn(40).to(dtype)
    q, s = tilefuse.quantize_int8(w)
    out = tilefuse.int8_linear(x.to(DEV), q.to(DEV), s.to(DEV), b.to(DEV))
    assert out.dtype == dtype and out.shape == (M, 3, 40)
    _close_int8(out, ref.int8_linear(x, q, s, b), dtype)


@pytest.mark.parametrize("sign", ["same", "random", "alternating"])
@pytest.mark.parametrize("K", [4096 + 13, 4096])
def test_int8_product_exact_on_worst_case(sign, K):
    """All entries +-127 with unit scales: the output is the int32 dot product itself."""
    M, N = 5, 11
    a, w = worst_case_operands(sign, M, N, K)
    ones = torch.ones(N)
    out = tilefuse.int8_linear(a.to(DEV), w.to(DEV), ones.to(DEV)).cpu()
    exact = a.long() @ w.long().t()
    assert torch.equal(out, exact.to(torch.float32))
    small = tilefuse.int8_linear(a[:, :1024].to(DEV), w[:, :1024].contiguous().to(DEV),
                                 ones.to(DEV)).cpu()
    assert torch.equal(small.long(), a[:, :1024].long() @ w[:, :1024].long().t())


@pytest.mark.parametrize("K", [1000, 1024])
def test_int8_exact_product_random_codes(K):
    """Random codes in [-127, 127] with power-of-two scales: every step of the epilogue is exact
    (|acc| <= 127^2 K < 2^24), so the output must equal the int64 product times the scales."""
    M, N = 150, 140
    a = torch.randint(-127, 128, (M, K)).float()
    a[:, 0] = 127.0  # row absmax 127: activation scale exactly 1, codes = a
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    ws = 2.0 ** torch.randint(-8, 8, (N,)).float()
    out = tilefuse.int8_linear(a.to(DEV), w.to(DEV), ws.to(DEV)).cpu()
    exact = (a.long() @ w.long().t()).double() * ws.double()[None]
    assert torch.equal(out.double(), exact.float().double())


def test_int8_all_zero_row_and_empty_batch():
    x = torch.randn(3, 64, device=DEV)
    x[1] = 0
    q, s = tilefuse.quantize_int8(torch.randn(8, 64, device=DEV))
    out = tilefuse.int8_linear(x, q, s)
    assert torch.equal(out[1].cpu(), torch.zeros(8))
    assert tilefuse.int8_linear(torch.randn(2, 0, 64, device=DEV), q, s).shape == (2, 0, 8)


@pytest.mark.parametrize("M", [1, 6, 140])
def test_int8_outlier_columns_fused(M):
    """Few outlier columns: added in the GEMM epilogue."""
    K, N, thr = 300, 24, 6.0
    x = torch.randn(M, K)
    cols = [5, 77, 299]
    x[0, cols] = torch.tensor([9.0, -7.5, 6.0])  # 6.0 counts (>= threshold)
    q, s = tilefuse.quantize_int8(torch.randn(N, K))
    xd, qd, sd = x.to(DEV), q.to(DEV), s.to(DEV)
    out = tilefuse.int8_linear(xd, qd, sd, None, threshold=thr)
    _close_int8(out, ref.int8_linear(x, q, s, None, thr), torch.float32)
    plain = tilefuse.int8_linear(xd, qd, sd)
    assert not torch.allclose(out, plain)
    assert torch.equal(tilefuse.int8_linear(xd, qd, sd, None, threshold=100.0), plain)


@pytest.mark.parametrize("M,thr", [(2, 2.0), (40, 1.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_many_outlier_columns(M, thr, dtype):
    """More than 16 outlier columns: the gathered fp32 GEMM path."""
    x = (torch.randn(M, 200) * 1.5).to(dtype)
    q, s = tilefuse.quantize_int8(torch.randn(30, 200))
    _, _, mask = ref.quantize_int8_rows(x, thr)
    assert int(mask.sum()) > 16
    b = torch.randn(30)
    out = tilefuse.int8_linear(x.to(DEV), q.to(DEV), s.to(DEV), b.to(DEV), thr)
    _close_int8(out, ref.int8_linear(x, q, s, b, thr), dtype)


def test_int8_gradients():
    x = torch.randn(3, 2, 48, device=DEV, requires_grad=True)
    b = torch.randn(20, device=DEV, requires_grad=True)
    q, s = tilefuse.quantize_int8(torch.randn(20, 48, device=DEV))
    y = tilefuse.int8_linear(x, q, s, b, threshold=2.5)
    g = torch.randn_like(y)
    y.backward(g)
    w = tilefuse.dequantize_int8(q, s)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.grad, g.reshape(-1, 20).sum(0), rtol=1e-5, atol=1e-5)


def test_int8_bad_inputs():
    x = torch.randn(4, 32, device=DEV)
    q, s = tilefuse.quantize_int8(torch.randn(8, 32, device=DEV))
    with pytest.raises(ValueError, match="CUDA kernel got qweight on cpu"):
        tilefuse.int8_linear(x, q.cpu(), s)
    with pytest.raises(ValueError, match="CUDA kernel got weight_scale on cpu"):
        tilefuse.int8_linear(x, q, s.cpu())
    with pytest.raises(ValueError, match="CUDA kernel got bias on cpu"):
        tilefuse.int8_linear(x, q, s, torch.randn(8))
    with pytest.raises(ValueError, match="CUDA kernel got x on cpu"):
        tilefuse.int8_linear(x.cpu(), q, s)
    with pytest.raises(TypeError, match="qweight must be int8"):
        tilefuse.int8_linear(x, q.to(torch.uint8), s)
    with pytest.raises(TypeError, match="x must be float32"):
        tilefuse.int8_linear(x.to(torch.int32), q, s)
    with pytest.raises(ValueError, match="threshold"):
        tilefuse.int8_linear(x, q, s, None, -1.0)


# ----------------------------------------------------------------------------------- 4-bit

@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("shape,block", [((64, 128), 64), ((37, 53), 64), ((5, 7), 32),
                                         ((3, 1000), 256), ((129,), 128), ((16, 4096), 4096),
                                         ((300, 256), 32)])
def test_quantize_4bit_bit_identical_to_cpu(fmt, shape, block):
    w = torch.randn(shape) * 3
    if w.numel() >= 4 * block:
        w.view(-1)[: 2 * block] = 0.0  # two all-zero blocks
        w.view(-1)[2 * block: 3 * block] = 0.25  # a constant block
    packed, absmax, zero = torch.ops.tilefuse.quantize_4bit(w.to(DEV), fmt, block)
    pc, ac, zc = torch.ops.tilefuse.quantize_4bit(w, fmt, block)
    assert packed.shape == pc.shape and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), pc)
    assert torch.equal(absmax.cpu(), ac)
    assert torch.equal(zero.cpu(), zc)
    # And against the reference quantiser built from the definitions.
    rp, rs, rz = ref.quantize_4bit(w, fmt, block)
    assert torch.equal(packed.cpu(), rp) and torch.equal(absmax.cpu(), rs)
    if fmt == "int4":
        assert torch.equal(zero.cpu(), rz)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_quantize_4bit_other_dtypes(dtype):
    w = torch.randn(16, 64).to(dtype)
    for fmt in FMTS:
        got = torch.ops.tilefuse.quantize_4bit(w.to(DEV), fmt, 32)
        exp = torch.ops.tilefuse.quantize_4bit(w, fmt, 32)
        for g, e in zip(got, exp):
            assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("n,block", [(300, 256), (1200, 256), (77, 32), (5000, 4096)])
def test_quantize_blockwise_8bit_bit_identical_to_cpu(n, block):
    code = ref.dynamic_map()
    x = torch.randn(n) * 0.1
    x[:block] = 0.0  # an all-zero block
    q, am = torch.ops.tilefuse.quantize_blockwise_8bit(x.to(DEV), code.to(DEV), block)
    qc, amc = torch.ops.tilefuse.quantize_blockwise_8bit(x, code, block)
    assert torch.equal(q.cpu(), qc) and torch.equal(am.cpu(), amc)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape,block", [((37, 53), 64), ((16, 4096), 4096), ((3, 1000), 256)])
def test_dequantize_4bit_bit_identical_to_cpu(fmt, dtype, shape, block):
    w = torch.randn(shape)
    packed, st = tilefuse.quantize_4bit(w, fmt, block)
    got = tilefuse.dequantize_4bit(packed.to(DEV), st.to(DEV), dtype)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert torch.equal(got.cpu(), tilefuse.dequantize_4bit(packed, st, dtype))


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4"])
def test_double_quant(fmt):
    w = torch.randn(300, 256)
    packed, st = tilefuse.quantize_4bit(w, fmt, 64, double_quant=True)
    # Dequantising a CPU-made nested state: bit-identical.
    got = tilefuse.dequantize_4bit(packed.to(DEV), st.to(DEV), torch.float32)
    assert torch.equal(got.cpu(), tilefuse.dequantize_4bit(packed, st, torch.float32))
    # The whole pipeline on the GPU: same codes and nested absmax given the same offset (the
    # offset is a mean, whose last bit may differ between devices).
    pd, sd = tilefuse.quantize_4bit(w.to(DEV), fmt, 64, double_quant=True)
    assert torch.equal(pd.cpu(), packed)
    _, s1 = tilefuse.quantize_4bit(w, fmt, 64)
    q, am2 = torch.ops.tilefuse.quantize_blockwise_8bit(s1.absmax - sd.nested_offset.cpu(),
                                                        st.nested_code, 256)
    assert torch.equal(sd.absmax.cpu(), q) and torch.equal(sd.nested_absmax.cpu(), am2)
    assert torch.allclose(sd.nested_offset.cpu(), st.nested_offset, rtol=1e-6)
    x = torch.randn(3, 256)
    _check_4bit(tilefuse.linear_4bit(x.to(DEV), pd, sd), x, pd, sd)


def _check_4bit(out, x, packed, state, bias=None, gemm=False):
    """tests/test_lowbit_linear4bit.py's bound: err <= eps * (|x| @ |w|^T + |bias|), eps per
    output dtype. gemm=True (M > 8: dequantise + cuBLAS): fp16 / bf16 weights are rounded to
    the activation dtype first (about one more unit roundoff of that dtype; bf16 2^-9, fp16
    2^-11), and fp32 goes through cuBLAS's own summation order (TF32 off)."""
    w = tilefuse.dequantize_4bit(packed.cpu(), state.to("cpu"), torch.float32)
    xc = x.cpu()
    expected = ref.linear_4bit(xc, w, None if bias is None else bias.cpu())
    scale = xc.to(torch.float64).abs() @ w.to(torch.float64).abs().t()
    if bias is not None:
        scale = scale + bias.cpu().to(torch.float64).abs()
    eps = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3,
           torch.float64: 1e-12}[out.dtype]
    if gemm:
        eps = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 3e-3}[out.dtype]
    err = (out.cpu().to(torch.float64) - expected).abs()
    assert (err <= eps * (scale + 1e-30) + 1e-30).all(), err.max().item()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_4bit_fast_shapes(fmt, M, dtype):
    """K % 32 == 0: the vectorised GEMV (M <= 8) and the dequantise + cuBLAS path (M > 8)."""
    N, K = 200, 512
    x = torch.randn(M, K).to(dtype)
    packed, st = tilefuse.quantize_4bit(torch.randn(N, K), fmt, 64)
    b = torch.randn(N).to(dtype)
    for bias in (None, b):
        out = tilefuse.linear_4bit(x.to(DEV), packed.to(DEV), st.to(DEV),
                                   None if bias is None else bias.to(DEV))
        assert out.dtype == dtype and out.shape == (M, N) and out.device.type == "cuda"
        _check_4bit(out, x, packed, st, bias, gemm=M > 8)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("N,K,block", [(1, 1, 32), (7, 31, 32), (5, 53, 64), (9, 96, 64),
                                       (3, 1000, 256), (17, 33, 128), (2, 600, 32),
                                       (20, 4096, 4096), (16, 1536, 1024)])
def test_linear_4bit_odd_shapes_and_blocks_spanning_rows(fmt, N, K, block):
    x = torch.randn(12, K)
    packed, st = tilefuse.quantize_4bit(torch.randn(N, K), fmt, block)
    pd, sd = packed.to(DEV), st.to(DEV)
    for m in (1, 4, 12):
        _check_4bit(tilefuse.linear_4bit(x[:m].to(DEV), pd, sd), x[:m], packed, st, gemm=m > 8)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_linear_4bit_unaligned_operands(fmt):
    """Unaligned packed bytes take the element-wise GEMV; unaligned x is copied (fast GEMV)."""
    N, K = 40, 256
    x = torch.randn(3, K)
    packed, st = tilefuse.quantize_4bit(torch.randn(N, K), fmt, 64)
    pd, sd = packed.to(DEV), st.to(DEV)
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8, device=DEV)
    buf[1:] = pd.view(-1)
    p_unaligned = buf[1:].view(-1, 1)
    assert p_unaligned.data_ptr() % 16 != 0
    aligned = tilefuse.linear_4bit(x.to(DEV), pd, sd)
    _check_4bit(aligned, x, packed, st)
    _check_4bit(tilefuse.linear_4bit(x.to(DEV), p_unaligned, sd), x, packed, st)
    xbuf = torch.zeros(3 * K + 1, device=DEV)
    xbuf[1:] = x.to(DEV).view(-1)
    x_unaligned = xbuf[1:].view(3, K)
    assert torch.equal(tilefuse.linear_4bit(x_unaligned, pd, sd), aligned)


def test_linear_4bit_float64_strided_and_empty():
    packed, st = tilefuse.quantize_4bit(torch.randn(8, 64), "nf4", 32)
    pd, sd = packed.to(DEV), st.to(DEV)
    xd = torch.randn(2, 64, dtype=torch.float64)
    _check_4bit(tilefuse.linear_4bit(xd.to(DEV), pd, sd), xd, packed, st)
    assert tilefuse.linear_4bit(torch.randn(2, 0, 64, device=DEV), pd, sd).shape == (2, 0, 8)
    x = torch.randn(64, 5, device=DEV).t()  # non-contiguous rows
    assert torch.equal(tilefuse.linear_4bit(x, pd, sd),
                       tilefuse.linear_4bit(x.contiguous(), pd, sd))
    x3 = torch.randn(2, 3, 64)
    out = tilefuse.linear_4bit(x3.to(DEV), pd, sd)
    assert out.shape == (2, 3, 8)
    _check_4bit(out.reshape(6, 8), x3.reshape(6, 64), packed, st)


def test_linear_4bit_gradients():
    packed, st = tilefuse.quantize_4bit(torch.randn(24, 64), "nf4", 32, double_quant=True)
    pd, sd = packed.to(DEV), st.to(DEV)
    x = torch.randn(5, 64, device=DEV, requires_grad=True)
    b = torch.randn(24, device=DEV, requires_grad=True)
    y = tilefuse.linear_4bit(x, pd, sd, b)
    g = torch.randn_like(y)
    y.backward(g)
    w = tilefuse.dequantize_4bit(pd, sd, torch.float32)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert torch.allclose(b.grad, g.sum(0), rtol=1e-5, atol=1e-5)


def test_4bit_bad_inputs():
    packed, st = tilefuse.quantize_4bit(torch.randn(8, 64), "nf4", 32)
    pd, sd = packed.to(DEV), st.to(DEV)
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ValueError, match="CUDA kernel got packed on cpu"):
        tilefuse.linear_4bit(x, packed, sd)
    with pytest.raises(ValueError, match="CUDA kernel got absmax on cpu"):
        tilefuse.linear_4bit(x, pd, dataclasses.replace(sd, absmax=st.absmax))
    with pytest.raises(ValueError, match="CUDA kernel got x on cpu"):
        tilefuse.linear_4bit(x.cpu(), pd, sd)
    with pytest.raises(ValueError, match="CUDA kernel got bias on cpu"):
        tilefuse.linear_4bit(x, pd, sd, torch.randn(8))
    _, st_dq = tilefuse.quantize_4bit(torch.randn(8, 64), "nf4", 32, double_quant=True)
    sdq = st_dq.to(DEV)
    with pytest.raises(ValueError, match="CUDA kernel got nested_offset on cpu"):
        tilefuse.dequantize_4bit(pd, dataclasses.replace(sdq, nested_offset=st_dq.nested_offset))
    with pytest.raises(ValueError, match="CUDA kernel got code on cpu"):
        torch.ops.tilefuse.quantize_blockwise_8bit(torch.randn(300, device=DEV),
                                                   ref.dynamic_map(), 256)
    # The CPU ops' checks and messages.
    with pytest.raises(ValueError, match=r"x.shape\[-1\]"):
        tilefuse.linear_4bit(torch.randn(2, 63, device=DEV), pd, sd)
    with pytest.raises(TypeError, match="packed must be uint8"):
        tilefuse.linear_4bit(x, pd.to(torch.int8), sd)
    with pytest.raises(ValueError, match="bias must have shape"):
        tilefuse.linear_4bit(x, pd, sd, torch.randn(9, device=DEV))
    with pytest.raises(ValueError, match="block_size"):
        tilefuse.linear_4bit(x, pd, dataclasses.replace(sd, block_size=33))
    with pytest.raises(ValueError, match="fmt"):
        tilefuse.linear_4bit(x, pd, dataclasses.replace(sd, fmt="nf5"))
    with pytest.raises(ValueError, match="packed has"):
        tilefuse.linear_4bit(x, pd, dataclasses.replace(sd, shape=torch.Size([9, 64])))
    with pytest.raises(ValueError, match="block_size"):
        tilefuse.quantize_4bit(torch.randn(8, 64, device=DEV), "nf4", 48)
    with pytest.raises(ValueError, match="needs zero"):
        tilefuse.dequantize_4bit(pd, dataclasses.replace(sd, fmt="int4"))
