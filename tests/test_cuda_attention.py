# SPDX-License-Identifier: Apache-2.0
"""CUDA attention kernels (csrc/*/cuda/, one main loop in tilefuse/cuda/attention_loop.cuh).

Every attention family runs on the GPU and on the CPU on the same inputs: the CPU kernels in
float64 are the oracle (they are themselves checked against tilefuse.reference in the CPU test
files), outputs, LSE and all gradients are compared with dtype-sized tolerances. Plus gradcheck
in float64 on the GPU, opcheck, torch.compile(fullgraph=True), and device errors. Skipped
without a GPU; on a GPU machine a CPU-only build of the extension fails here instead of
skipping (the CUDA kernels must be there).
"""

import pytest
import torch

import tilefuse
from tilefuse import BlockMask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |a - b| <= TOL * max(|b|, 1): fp32 is a SIMT fp32 path; fp16/bf16 round q, k, v and P.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _close(got, want, dtype, what, slack=1.0):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{what}: non-finite entries differ"
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    tol = slack * TOL[dtype] * max(want[fin].abs().max().item() if fin.any() else 0.0, 1.0)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def _cross_check(fn, tensors, dtype, grads=True):
    """fn(*tensors) -> (out, lse) on CUDA in `dtype` vs on the CPU in float64, forward and
    gradients of every floating tensor (the loss weights out and lse with random tensors)."""
    base = [t.detach().double() for t in tensors]
    cpu = [t.clone().requires_grad_(grads) for t in base]
    gpu = [t.to(DEV, dtype).requires_grad_(grads) for t in base]
    out_c, lse_c = fn(*cpu)
    out_g, lse_g = fn(*gpu)
    assert out_g.device.type == "cuda" and out_g.dtype == dtype
    _close(out_g, out_c, dtype, "out")
    _close(lse_g, lse_c, dtype, "lse")
    if not grads:
        return
    w_out = torch.randn_like(out_c)
    w_lse = torch.randn_like(lse_c)
    lse_fin = torch.isfinite(lse_c)
    loss_c = (out_c * w_out).sum() + (lse_c.where(lse_fin, 0) * w_lse).sum()
    loss_g = (out_g.double() * w_out.to(DEV)).sum() + (
        lse_g.double().where(lse_fin.to(DEV), 0) * w_lse.to(DEV)).sum()
    g_c = torch.autograd.grad(loss_c, cpu)
    g_g = torch.autograd.grad(loss_g, gpu)
    for i, (a, b) in enumerate(zip(g_g, g_c)):
        _close(a, b, dtype, f"grad {i}", slack=2.5)  # dS is rounded once more (GEMM operand)


def _qkv(shape_q, shape_kv, dv=None):
    q = torch.randn(shape_q, dtype=torch.float64)
    k = torch.randn(shape_kv, dtype=torch.float64)
    vshape = list(shape_kv)
    if dv is not None:
        vshape[-1] = dv
    v = torch.randn(vshape, dtype=torch.float64)
    return q, k, v


# ------------------------------------------------------------------------- dense / band


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (17, 5)),
                                           (True, (40, -1))])
@pytest.mark.parametrize("sq,sk,h,hkv,d,dv", [
    (1, 77, 4, 4, 64, 64), (130, 130, 4, 2, 64, 64), (97, 200, 6, 1, 80, 48),
    (200, 64, 2, 2, 128, 128), (33, 33, 2, 1, 16, 32), (64, 64, 2, 2, 256, 256)])
def test_attention_matches_cpu(dtype, causal, window, sq, sk, h, hkv, d, dv):
    q, k, v = _qkv((2, sq, h, d), (2, sk, hkv, d), dv)
    _cross_check(lambda q, k, v: tilefuse.attention(q, k, v, causal=causal, window=window,
                                                    return_lse=True), [q, k, v], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_varlen_and_key_mask(dtype):
    lens = [0, 5, 130, 1, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _qkv((sum(lens), 4, 64), (sum(lens), 2, 64))

    def varlen(q, k, v):
        c = cu.to(q.device)
        return tilefuse.attention(q, k, v, causal=True, cu_seqlens_q=c, cu_seqlens_k=c,
                                  max_seqlen_q=max(lens), max_seqlen_k=max(lens),
                                  return_lse=True)
    _cross_check(varlen, [q, k, v], dtype)

    qb, kb, vb = _qkv((3, 50, 4, 32), (3, 70, 4, 32))
    mask = torch.rand(3, 70) > 0.4
    mask[1] = False  # a sequence without keys: output 0, LSE -inf
    _cross_check(lambda q, k, v: tilefuse.attention(q, k, v, key_mask=mask.to(q.device),
                                                    return_lse=True), [qb, kb, vb], dtype)


def test_attention_non_contiguous_inputs():
    q, k, v = _qkv((2, 4, 70, 64), (2, 4, 90, 64))  # [B, H, S, D] transposed views
    _cross_check(lambda q, k, v: tilefuse.attention(q.transpose(1, 2), k.transpose(1, 2),
                                                    v.transpose(1, 2), return_lse=True),
                 [q, k, v], torch.float16)


def test_attention_gradcheck_float64():
    q, k, v = (t.to(DEV).requires_grad_() for t in _qkv((1, 19, 2, 8), (1, 23, 1, 8)))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tilefuse.attention(q, k, v, causal=True, window=(6, -1)), (q, k, v))


def test_attention_opcheck_and_compile():
    q, k, v = (t.to(DEV, torch.float16) for t in _qkv((2, 40, 4, 64), (2, 40, 2, 64)))
    torch.library.opcheck(torch.ops.tilefuse.attention_fwd.default,
                          (q, k, v, None, None, -1, -1, 0.125, -1, 0))
    f = torch.compile(lambda q, k, v: tilefuse.attention(q, k, v, causal=True), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), tilefuse.attention(q, k, v, causal=True))


def test_attention_device_errors():
    q = torch.randn(1, 8, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="one device"):
        tilefuse.attention(q, q.cpu(), q)
    with pytest.raises(ValueError, match="must be on the device of q"):  # the C++ check
        torch.ops.tilefuse.attention_fwd.default(q, q.cpu(), q, None, None, -1, -1, 1.0, -1, -1)


# --------------------------------------------------------------- neighborhood / Swin


NA_CASES = [  # (rank, size, kernel, dilation, stride, is_causal, with rpb)
    (1, (75,), 7, 2, 1, False, True),
    (1, (64,), 8, 1, 3, True, False),
    (2, (14, 17), 5, (1, 2), (2, 1), False, True),
    (2, (16, 16), 4, 1, 4, False, True),
    (2, (12, 13), 3, 1, 1, (True, False), False),
    (3, (6, 7, 8), 3, (1, 2, 1), 1, False, True),
    (3, (6, 7, 8), 3, 1, (1, 3, 2), False, False),
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rank,size,kernel,dilation,stride,causal,bias", NA_CASES)
def test_na_matches_cpu(dtype, rank, size, kernel, dilation, stride, causal, bias):
    fn = {1: tilefuse.na1d, 2: tilefuse.na2d, 3: tilefuse.na3d}[rank]
    q, k, v = _qkv((2, *size, 4, 32), (2, *size, 2, 32))
    tensors = [q, k, v]
    if bias:
        tensors.append(torch.randn(4, *(2 * kernel - 1,) * rank, dtype=torch.float64))

    def run(q, k, v, rpb=None):
        return fn(q, k, v, kernel, dilation=dilation, stride=stride, is_causal=causal, rpb=rpb,
                  return_lse=True)
    _cross_check(run, tensors, dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("size,window,shift", [((14, 14), 7, 3), ((13, 10), (4, 5), (2, 0)),
                                               ((56,), 7, 0), ((4, 6, 6), (2, 3, 3), (1, 1, 2))])
def test_window_attention_matches_cpu(dtype, size, window, shift):
    rank = len(size)
    w = window if isinstance(window, tuple) else (window,) * rank
    q, k, v = _qkv((2, *size, 3, 32), (2, *size, 3, 32))
    table = 1
    for x in w:
        table *= 2 * x - 1
    rpb = torch.randn(table, 3, dtype=torch.float64)
    kp, vp = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)

    def run(q, k, v, rpb, kp, vp):
        return tilefuse.window_attention(q, k, v, window, shift, rpb=rpb, pad_kv=(kp, vp),
                                         return_lse=True)
    _cross_check(run, [q, k, v, rpb, kp, vp], dtype)


def test_na_and_window_gradcheck_float64():
    q, k, v = (t.to(DEV).requires_grad_() for t in _qkv((1, 6, 7, 2, 4), (1, 6, 7, 2, 4)))
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: tilefuse.na2d(q, k, v, 3, dilation=(1, 2), rpb=b), (q, k, v, rpb))
    table = torch.randn(9, 2, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: tilefuse.window_attention(q, k, v, 2, 1, rpb=b), (q, k, v, table))


def test_na_compile():
    q, k, v = (t.to(DEV, torch.float16) for t in _qkv((1, 16, 16, 2, 32), (1, 16, 16, 2, 32)))
    f = torch.compile(lambda q, k, v: tilefuse.na2d(q, k, v, 5), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), tilefuse.na2d(q, k, v, 5))


# ---------------------------------------------------------------------- block-sparse


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [(64, 64), (32, 128), (128, 16)])
def test_block_sparse_matches_cpu(dtype, causal, block):
    S, H = 300, 4
    nq, nk = -(-S // block[0]), -(-S // block[1])
    layout = torch.rand(2, H, nq, nk) < 0.4
    layout[:, :, 0] = False  # empty rows: output 0, LSE -inf
    bm = BlockMask.from_dense(layout, block, (S, S))
    q, k, v = _qkv((2, S, H, 64), (2, S, 2, 64))
    _cross_check(lambda q, k, v: tilefuse.block_sparse_attention(q, k, v, bm, causal=causal,
                                                                 return_lse=True),
                 [q, k, v], dtype)


def test_block_sparse_gradcheck_float64_and_compile():
    layout = torch.rand(1, 2, 3, 3) < 0.6
    bm = BlockMask.from_dense(layout, 16, (40, 40))
    q, k, v = (t.to(DEV).requires_grad_() for t in _qkv((1, 40, 2, 8), (1, 40, 2, 8)))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tilefuse.block_sparse_attention(q, k, v, bm, causal=True), (q, k, v))
    qh, kh, vh = (t.detach().half() for t in (q, k, v))
    f = torch.compile(lambda q, k, v: tilefuse.block_sparse_attention(q, k, v, bm),
                      fullgraph=True)
    torch.testing.assert_close(f(qh, kh, vh), tilefuse.block_sparse_attention(qh, kh, vh, bm))
