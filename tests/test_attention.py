# SPDX-License-Identifier: Apache-2.0
"""tilefuse.attention against tilefuse.reference.attention (float64 oracle)."""

import pytest
import torch

import tilefuse
from tilefuse import reference as R

# Tolerances against the float64 reference, with inputs already rounded to the test dtype.
# fp32: the kernel accumulates in fp32 and uses a polynomial exp2 (rel. err < 2e-7).
# bf16/fp16: the kernel computes in fp32; the output is rounded to 8 (bf16) or 11 (fp16)
# mantissa bits, so the error is dominated by one output rounding (|o| <~ 3 here).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-10}


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _check(out, ref, dtype, what="out"):
    assert out.dtype == dtype
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= TOL[dtype], f"{what}: max abs err {err:.3g} > {TOL[dtype]}"


def _ref(q, k, v, **kw):
    return R.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)


CASES = [
    # id, B, Sq, Sk, H, Hkv, D, Dv, causal, window
    ("dense", 2, 100, 100, 4, 4, 64, 64, False, None),
    ("sq1", 2, 1, 300, 4, 4, 64, 64, False, None),
    ("sq1-causal", 1, 1, 257, 2, 2, 32, 32, True, None),
    ("d16-ragged", 1, 65, 129, 2, 2, 16, 16, False, None),
    ("d80-dv48", 1, 70, 200, 3, 3, 80, 48, False, None),
    ("d128", 1, 130, 130, 2, 2, 128, 128, True, None),
    ("dv-neq-d", 2, 33, 47, 2, 1, 32, 72, False, None),
    ("gqa", 2, 90, 90, 8, 2, 64, 64, True, None),
    ("mqa", 1, 64, 200, 6, 1, 32, 32, False, None),
    ("causal-sq<sk", 1, 50, 300, 2, 2, 64, 64, True, None),
    ("causal-sq>sk", 1, 300, 50, 2, 2, 64, 64, True, None),
    ("window", 1, 400, 400, 2, 2, 64, 64, False, (37, 20)),
    ("window-left-only", 1, 300, 260, 2, 1, 32, 32, False, (64, -1)),
    ("window+causal", 2, 333, 333, 2, 2, 48, 48, True, (100, -1)),
    ("window-sq>sk", 1, 200, 80, 2, 2, 32, 32, False, (10, 10)),
    # long enough for the head-major / panel-major operand copies, with padded head dims
    ("long-odd-dims", 2, 300, 290, 3, 1, 40, 24, False, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(case, dtype, cpu_isa):
    _, B, Sq, Sk, H, Hkv, D, Dv, causal, window = case
    q, k, v = _rand(B, Sq, H, D, dtype=dtype), _rand(B, Sk, Hkv, D, dtype=dtype), _rand(B, Sk, Hkv, Dv, dtype=dtype)
    out, lse = tilefuse.attention(q, k, v, causal=causal, window=window, return_lse=True)
    ref, ref_lse = _ref(q, k, v, causal=causal, window=window)
    _check(out, ref.to(torch.float64), dtype)
    assert lse.dtype == torch.float32 and lse.shape == (B, Sq, H)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys differ"
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max().item() < 1e-4 if fin.any() else True


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(case, cpu_isa):
    _, B, Sq, Sk, H, Hkv, D, Dv, causal, window = case
    q = _rand(B, Sq, H, D).requires_grad_()
    k = _rand(B, Sk, Hkv, D).requires_grad_()
    v = _rand(B, Sk, Hkv, Dv).requires_grad_()
    out, lse = tilefuse.attention(q, k, v, causal=causal, window=window, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(lse)
    loss = (out * go).sum() + (torch.where(fin, lse, 0) * gl).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = R.attention(qd, kd, vd, causal=causal, window=window, return_lse=True)
    rloss = (ro * go.double()).sum() + (torch.where(fin, rl, 0) * gl.double()).sum()
    rgrads = torch.autograd.grad(rloss, (qd, kd, vd))
    for name, g, rg in zip("qkv", grads, rgrads):
        err = (g.double() - rg).abs().max().item()
        assert err < 1e-4 * max(1.0, rg.abs().max().item()), f"d{name}: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_low_precision(dtype, cpu_isa):
    q, k, v = (_rand(1, 70, 2, 32, dtype=dtype).requires_grad_() for _ in range(3))
    out = tilefuse.attention(q, k, v, causal=True)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rgrads = torch.autograd.grad(R.attention(qd, kd, vd, causal=True), (qd, kd, vd), go.double())
    for g, rg in zip(grads, rgrads):
        assert g.dtype == dtype
        assert (g.double() - rg).abs().max().item() < 50 * TOL[dtype]


def _varlen(seqlens_q, seqlens_k, H=4, Hkv=2, D=32, Dv=32, dtype=torch.float32):
    cu_q = torch.tensor([0] + seqlens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = _rand(int(cu_q[-1]), H, D, dtype=dtype)
    k = _rand(int(cu_k[-1]), Hkv, D, dtype=dtype)
    v = _rand(int(cu_k[-1]), Hkv, Dv, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (20, 5))],
                         ids=["dense", "causal", "window"])
def test_varlen_with_empty_segments(causal, window, cpu_isa):
    q, k, v, cu_q, cu_k = _varlen([70, 0, 1, 130, 5], [90, 10, 0, 130, 64])
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = tilefuse.attention(q, k, v, causal=causal, window=window, cu_seqlens_q=cu_q,
                                  cu_seqlens_k=cu_k, max_seqlen_q=130, max_seqlen_k=130,
                                  return_lse=True)
    ref, ref_lse = R.attention(q.double(), k.double(), v.double(), causal=causal, window=window,
                               cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    _check(out, ref, torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    # The sequence with no keys (index 2, one query) gets zeros and LSE -inf.
    assert torch.all(out[70] == 0) and torch.all(torch.isneginf(lse[70]))
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rgrads = torch.autograd.grad(
        R.attention(qd, kd, vd, causal=causal, window=window, cu_seqlens_q=cu_q,
                    cu_seqlens_k=cu_k), (qd, kd, vd), go.double())
    for g, rg in zip(grads, rgrads):
        assert (g.double() - rg).abs().max().item() < 1e-4


def test_varlen_matches_padded_batch(cpu_isa):
    # Packing two equal-length sequences must give the batched result exactly.
    q, k, v = _rand(2, 50, 2, 32), _rand(2, 60, 2, 32), _rand(2, 60, 2, 32)
    cu_q = torch.tensor([0, 50, 100], dtype=torch.int32)
    cu_k = torch.tensor([0, 60, 120], dtype=torch.int32)
    packed = tilefuse.attention(q.reshape(100, 2, 32), k.reshape(120, 2, 32), v.reshape(120, 2, 32),
                                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    batched = tilefuse.attention(q, k, v, causal=True)
    assert torch.equal(packed.reshape(2, 50, 2, 32), batched)


def test_non_contiguous_inputs(cpu_isa):
    base = _rand(2, 3, 90, 4, 64)  # e.g. a packed qkv projection
    qkv = base.permute(1, 0, 2, 3, 4)
    q, k, v = qkv[0], qkv[1], qkv[2][..., ::2]  # v also strided in the feature dim
    assert not q.is_contiguous() and not v.is_contiguous()
    out = tilefuse.attention(q, k, v, causal=True)
    _check(out, R.attention(q.double(), k.double(), v.double(), causal=True), torch.float32)
    qt = _rand(2, 4, 90, 64).transpose(1, 2)  # heads-first storage
    out = tilefuse.attention(qt, qt, qt)
    _check(out, R.attention(qt.double(), qt.double(), qt.double()), torch.float32)


def test_scale_argument(cpu_isa):
    q, k, v = _rand(1, 40, 2, 16), _rand(1, 40, 2, 16), _rand(1, 40, 2, 16)
    out = tilefuse.attention(q, k, v, scale=0.37)
    _check(out, R.attention(q.double(), k.double(), v.double(), scale=0.37), torch.float32)


@pytest.mark.skipif(tilefuse.cpu_isa() != "cpu-avx2", reason="this CPU has only the generic tier")
def test_tiers_agree():
    q, k, v = _rand(1, 200, 2, 64), _rand(1, 200, 2, 64), _rand(1, 200, 2, 64)
    outs = []
    for isa in ["cpu-avx2", "cpu-generic"]:
        with tilefuse.backend.use_cpu_isa(isa):
            outs.append(tilefuse.attention(q, k, v, causal=True))
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-5


def test_empty_batch_and_zero_length():
    q = torch.randn(0, 10, 2, 16)
    assert tilefuse.attention(q, q, q).shape == (0, 10, 2, 16)
    q = torch.randn(2, 0, 2, 16)
    k = torch.randn(2, 5, 2, 16)
    assert tilefuse.attention(q, k, k).shape == (2, 0, 2, 16)
    q = torch.randn(1, 3, 2, 16)
    k = torch.randn(1, 0, 2, 16)
    out, lse = tilefuse.attention(q, k, k, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_nan_propagates_only_to_rows_that_see_it(cpu_isa):
    # Documented IEEE behaviour: a NaN key poisons exactly the query rows that attend to it.
    q, k, v = _rand(1, 8, 1, 16), _rand(1, 8, 1, 16), _rand(1, 8, 1, 16)
    k[0, 5, 0, 0] = float("nan")
    out = tilefuse.attention(q, k, v, causal=True)
    nan_rows = torch.isnan(out[0, :, 0]).any(-1)
    assert nan_rows.tolist() == [False] * 5 + [True] * 3


# ----------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile


@pytest.mark.parametrize("causal,window,gqa", [(False, None, False), (True, None, True),
                                                (False, (3, 2), False), (True, (4, -1), True)])
def test_gradcheck_float64(causal, window, gqa, cpu_isa):
    q = torch.randn(1, 9, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 13, 1 if gqa else 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 13, 1 if gqa else 2, 6, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        out, lse = tilefuse.attention(q, k, v, causal=causal, window=window, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_gradcheck_varlen_float64(cpu_isa):
    q, k, v, cu_q, cu_k = _varlen([5, 0, 7], [6, 3, 4], H=2, Hkv=1, D=8, Dv=8, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tilefuse.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
        (q, k, v))


def test_opcheck():
    q = torch.randn(2, 20, 4, 16, requires_grad=True)
    k = torch.randn(2, 30, 2, 16, requires_grad=True)
    v = torch.randn(2, 30, 2, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.tilefuse.attention_fwd,
                          (q, k, v, None, None, -1, -1, 0.25, -1, 0))
    out, lse = torch.ops.tilefuse.attention_fwd(q, k, v, None, None, -1, -1, 0.25, 5, 3)
    torch.library.opcheck(
        torch.ops.tilefuse.attention_bwd,
        (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(), out.detach(),
         lse.detach(), None, None, -1, -1, 0.25, 5, 3))
    qv, kv, vv, cu_q, cu_k = _varlen([5, 0, 7], [6, 3, 4])
    torch.library.opcheck(torch.ops.tilefuse.attention_fwd,
                          (qv.requires_grad_(), kv, vv, cu_q, cu_k, 7, 6, 0.3, -1, -1))


def test_torch_compile_fullgraph():
    def f(q, k, v):
        o, lse = tilefuse.attention(q, k, v, causal=True, window=(16, -1), return_lse=True)
        return o.square().sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 40, 2, 16, requires_grad=True) for _ in range(3))
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    qe, ke, ve = (t.detach().requires_grad_() for t in (q, k, v))
    ref_loss = f(qe, ke, ve)
    ref_grads = torch.autograd.grad(ref_loss, (qe, ke, ve))
    assert torch.allclose(loss, ref_loss)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, atol=1e-6)


def test_torch_compile_inductor_varlen():
    q, k, v, cu_q, cu_k = _varlen([30, 20], [25, 40])

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return tilefuse.attention(q * 2, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)

    out = f(q, k, v)
    ref = tilefuse.attention(q * 2, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    assert torch.allclose(out, ref, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, for each check.

def _qkv(B=1, S=8, H=2, D=16):
    return torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, D)


def test_bad_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be \[batch, seq, heads, head_dim\]"):
        tilefuse.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must be"):
        tilefuse.attention(q, k[0], v)
    with pytest.raises(ValueError, match="v must be"):
        tilefuse.attention(q, k, v[..., None])


def test_bad_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k head_dim"):
        tilefuse.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="v heads"):
        tilefuse.attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="v tokens"):
        tilefuse.attention(q, k, v[:, :5])
    with pytest.raises(ValueError, match="batch sizes differ"):
        tilefuse.attention(q, torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16))


def test_heads_not_divisible():
    q = torch.randn(1, 8, 3, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        tilefuse.attention(q, k, k)


def test_zero_head_dim():
    q = torch.randn(1, 8, 2, 0)
    with pytest.raises(ValueError, match="head_dim of q must be > 0"):
        tilefuse.attention(q, q, q)


def test_bad_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        tilefuse.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must be float32, bfloat16, float16 or float64"):
        tilefuse.attention(q.int(), k.int(), v.int())


def test_mismatched_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one device"):
        tilefuse.attention(q, k.to("meta"), v)


def test_bad_window_and_scale():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="window"):
        tilefuse.attention(q, k, v, window=(-3, 2))
    with pytest.raises(ValueError, match="window must be a"):
        tilefuse.attention(q, k, v, window=4)
    with pytest.raises(ValueError, match="scale must be finite"):
        tilefuse.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="window sizes must be >= -1"):
        torch.ops.tilefuse.attention_fwd(q, k, v, None, None, -1, -1, 1.0, -5, 0)


def test_bad_cu_seqlens():
    q, k, v, cu_q, cu_k = _varlen([5, 3], [4, 4])
    with pytest.raises(ValueError, match="given together"):
        tilefuse.attention(q, k, v, cu_seqlens_q=cu_q)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        tilefuse.attention(q, k, v, cu_seqlens_q=cu_q.long(), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[0\] must be 0"):
        tilefuse.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k + 1)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        tilefuse.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 6, 5, 8], dtype=torch.int32),
                           cu_seqlens_k=torch.tensor([0, 2, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 7 must equal the number of packed tokens \(8\)"):
        tilefuse.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 5, 7], dtype=torch.int32), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="same number of sequences"):
        tilefuse.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32), cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="max_seqlen_q = 2 is smaller than the longest sequence"):
        tilefuse.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=2)
    with pytest.raises(ValueError, match=r"q must be \[total, heads, head_dim\] \(varlen\)"):
        tilefuse.attention(q[None], k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match="only apply with cu_seqlens"):
        tilefuse.attention(*_qkv(), max_seqlen_q=3)


def test_bad_backward_inputs():
    q, k, v = _qkv()
    out, lse = torch.ops.tilefuse.attention_fwd(q, k, v, None, None, -1, -1, 0.25, -1, -1)
    with pytest.raises(ValueError, match="grad_out and out must have shape"):
        torch.ops.tilefuse.attention_bwd(out[:, :4], None, q, k, v, out, lse, None, None, -1, -1,
                                         0.25, -1, -1)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.tilefuse.attention_bwd(out, None, q, k, v, out, lse.double(), None, None, -1, -1,
                                         0.25, -1, -1)


# ----------------------------------------------------------------------------------------
# key_mask (padding masks)


def test_key_mask_matches_reference(cpu_isa):
    B, Sq, Sk, H, Hkv, D = 3, 40, 70, 4, 2, 32
    q = _rand(B, Sq, H, D).requires_grad_()
    k = _rand(B, Sk, Hkv, D).requires_grad_()
    v = _rand(B, Sk, Hkv, D).requires_grad_()
    key_mask = torch.rand(B, Sk) > 0.4
    key_mask[1, 50:] = False  # right padding
    key_mask[2] = False  # a sequence with no visible key: zeros and LSE -inf
    out, lse = tilefuse.attention(q, k, v, key_mask=key_mask, return_lse=True)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = R.attention(qd, kd, vd, key_mask=key_mask, return_lse=True)
    _check(out, ref.detach(), torch.float32)
    assert torch.all(out[2] == 0) and torch.all(torch.isneginf(lse[2]))
    assert (lse[:2].double() - ref_lse[:2]).abs().max() < 1e-4
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    for g, rg in zip(grads, rgrads):
        assert (g.double() - rg).abs().max().item() < 1e-4
    assert torch.all(grads[1][~key_mask] == 0) and torch.all(grads[2][~key_mask] == 0)


def test_key_mask_gradcheck_and_opcheck():
    q = torch.randn(2, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 7, 1, 8, dtype=torch.float64, requires_grad=True)
    km = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda q, k, v: tilefuse.attention(q, k, v, key_mask=km),
                                    (q, k, v))
    torch.library.opcheck(torch.ops.tilefuse.attention_fwd,
                          (q.float(), k.float(), v.float(), None, None, -1, -1, 0.3, -1, -1, km))


def test_key_mask_bad_input():
    q, k, v = _qkv(B=2)
    with pytest.raises(TypeError, match="key_mask must be bool"):
        tilefuse.attention(q, k, v, key_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"key_mask must have shape \[batch, seq_k\] = \[2, 8\]"):
        tilefuse.attention(q, k, v, key_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="key_mask combined with causal or window"):
        tilefuse.attention(q, k, v, key_mask=torch.ones(2, 8, dtype=torch.bool), causal=True)
    qv, kv, vv, cu_q, cu_k = _varlen([5, 3], [4, 4])
    with pytest.raises(ValueError, match="key_mask applies to"):
        tilefuse.attention(qv, kv, vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           key_mask=torch.ones(2, 4, dtype=torch.bool))


def test_overlapping_expanded_inputs(cpu_isa):
    # Stride-0 (expanded) inputs read overlapping memory: e.g. one K/V shared by every batch
    # element. They are read as they are; gradients flow back through the expand.
    q = _rand(3, 40, 2, 32)
    k1 = _rand(1, 50, 2, 32).requires_grad_()
    v1 = _rand(1, 50, 2, 32).requires_grad_()
    k, v = k1.expand(3, -1, -1, -1), v1.expand(3, -1, -1, -1)
    assert k.stride(0) == 0
    out = tilefuse.attention(q, k, v, causal=True)
    ref = R.attention(q.double(), k.double(), v.double(), causal=True)
    _check(out, ref, torch.float32)
    g = torch.autograd.grad(out.sum(), (k1, v1))
    k1d, v1d = k1.detach().double().requires_grad_(), v1.detach().double().requires_grad_()
    rg = torch.autograd.grad(R.attention(q.double(), k1d.expand(3, -1, -1, -1),
                                         v1d.expand(3, -1, -1, -1), causal=True).sum(), (k1d, v1d))
    for a, b in zip(g, rg):
        assert (a.double() - b).abs().max() < 1e-4
