# SPDX-License-Identifier: Apache-2.0
"""tilefuse.na1d/na2d/na3d against tilefuse.reference.na (float64, explicit masks), the index
math against its Python formula, and natten 0.21 (when installed) as an outside cross-check."""

import importlib.util
import math

import pytest
import torch

import tilefuse
from tilefuse import reference as R
from tilefuse.reference.neighborhood import na_window

# Tolerances against the float64 reference, inputs already rounded to the test dtype (same
# reasons as tests/test_attention.py: fp32 accumulation and a polynomial exp2; bf16/fp16 are
# computed in fp32 and dominated by one output rounding).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float64: 1e-10}

NA = {1: tilefuse.na1d, 2: tilefuse.na2d, 3: tilefuse.na3d}


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _inputs(shape, H, Hkv, D, Dv, B=2, dtype=torch.float32, grad=False):
    q = _rand(B, *shape, H, D, dtype=dtype).requires_grad_(grad)
    k = _rand(B, *shape, Hkv, D, dtype=dtype).requires_grad_(grad)
    v = _rand(B, *shape, Hkv, Dv, dtype=dtype).requires_grad_(grad)
    return q, k, v


def _rpb(H, kernel, rank, dtype=torch.float32, grad=False):
    ks = (kernel,) * rank if isinstance(kernel, int) else kernel
    return _rand(H, *[2 * k - 1 for k in ks], dtype=dtype).requires_grad_(grad)


# id, spatial shape, H, Hkv, D, Dv, kernel, dilation, stride, causal
CASES = [
    ("1d", (37,), 2, 2, 16, 16, 7, 1, 1, False),
    ("1d-even-dil-stride", (50,), 2, 1, 32, 24, 6, 3, 4, False),
    ("1d-causal", (70,), 2, 2, 16, 16, 9, 2, 3, True),
    ("1d-long", (300,), 1, 1, 16, 16, 33, 1, 1, False),
    ("1d-blocked", (100,), 2, 2, 16, 16, 10, 1, 10, False),
    ("2d", (13, 17), 4, 4, 32, 32, 5, 1, 1, False),
    ("2d-even", (12, 9), 2, 2, 16, 16, (4, 6), 1, 1, False),
    ("2d-dilation", (19, 16), 2, 2, 16, 16, 3, (3, 2), 1, False),
    ("2d-stride", (20, 21), 2, 2, 16, 16, (5, 7), 1, (2, 7), False),
    ("2d-causal-axis0", (11, 14), 2, 2, 16, 16, (4, 5), 1, 1, (True, False)),
    ("2d-causal-both-stride", (15, 15), 2, 2, 16, 16, 5, 1, (2, 3), (True, True)),
    ("2d-kernel=size", (7, 9), 2, 2, 16, 16, (7, 9), 1, 1, False),
    ("2d-gqa", (10, 10), 6, 2, 32, 16, 3, 1, 1, False),
    ("2d-blocked", (24, 16), 2, 2, 16, 16, 8, 1, 8, False),
    ("2d-big-kernel", (30, 30), 1, 1, 16, 16, 13, 2, 1, False),
    ("3d", (5, 6, 7), 2, 2, 16, 16, 3, 1, 1, False),
    ("3d-mixed", (6, 9, 8), 2, 1, 16, 16, (2, 3, 4), (1, 2, 2), (1, 3, 2), (True, False, False)),
    ("3d-causal-t", (6, 7, 7), 2, 2, 16, 16, (3, 5, 5), 1, 1, (True, False, False)),
]


def _case(case):
    _, shape, H, Hkv, D, Dv, kernel, dil, stride, causal = case
    return shape, H, Hkv, D, Dv, dict(kernel_size=kernel, dilation=dil, stride=stride,
                                      is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(case, dtype, cpu_isa):
    shape, H, Hkv, D, Dv, kw = _case(case)
    q, k, v = _inputs(shape, H, Hkv, D, Dv, dtype=dtype)
    rpb = _rpb(H, kw["kernel_size"], len(shape), dtype=dtype)
    out, lse = NA[len(shape)](q, k, v, rpb=rpb, return_lse=True, **kw)
    ref, ref_lse = R.na(q.double(), k.double(), v.double(), rpb=rpb.double(), return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == ref.shape and lse.shape == ref_lse.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs err {err:.3g}"
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_reference(case, cpu_isa):
    shape, H, Hkv, D, Dv, kw = _case(case)
    q, k, v = _inputs(shape, H, Hkv, D, Dv, grad=True)
    rpb = _rpb(H, kw["kernel_size"], len(shape), grad=True)
    out, lse = NA[len(shape)](q, k, v, rpb=rpb, return_lse=True, **kw)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v, rpb))
    qd, kd, vd, rd = (t.detach().double().requires_grad_() for t in (q, k, v, rpb))
    ro, rl = R.na(qd, kd, vd, rpb=rd, return_lse=True, **kw)
    rgrads = torch.autograd.grad((ro * go.double()).sum() + (rl * gl.double()).sum(), (qd, kd, vd, rd))
    for name, g, rg in zip(["q", "k", "v", "rpb"], grads, rgrads):
        err = (g.double() - rg).abs().max().item()
        assert err < 1e-4 * max(1.0, rg.abs().max().item()), f"d{name}: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_low_precision(dtype, cpu_isa):
    q, k, v = _inputs((9, 10), 2, 2, 16, 16, dtype=dtype, grad=True)
    out = tilefuse.na2d(q, k, v, 5, dilation=(1, 2))
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rgrads = torch.autograd.grad(R.na(qd, kd, vd, 5, dilation=(1, 2)), (qd, kd, vd), go.double())
    for g, rg in zip(grads, rgrads):
        assert g.dtype == dtype
        assert (g.double() - rg).abs().max().item() < 50 * TOL[dtype]


def test_kernel_equal_to_size_is_dense_attention(cpu_isa):
    q, k, v = _inputs((6, 7), 2, 2, 16, 16)
    out = tilefuse.na2d(q, k, v, (6, 7))
    dense = tilefuse.attention(q.reshape(2, 42, 2, 16), k.reshape(2, 42, 2, 16), v.reshape(2, 42, 2, 16))
    assert (out.reshape(2, 42, 2, 16) - dense).abs().max().item() < 1e-5


def test_blocked_equals_windowed_attention(cpu_isa):
    # stride == kernel_size is Swin's W-MSA without shift (sizes a multiple of the window).
    q, k, v = _inputs((14, 21), 2, 2, 16, 16)
    a = tilefuse.na2d(q, k, v, 7, stride=7)
    b = tilefuse.window_attention(q, k, v, 7)
    assert (a - b).abs().max().item() < 1e-6


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_additional_tokens(rank, cpu_isa):
    shape = {1: (20,), 2: (6, 7), 3: (3, 4, 5)}[rank]
    q, k, v = _inputs(shape, 4, 2, 16, 16, grad=True)
    ak, av = _rand(2, 5, 2, 16).requires_grad_(), _rand(2, 5, 2, 16).requires_grad_()
    out, lse = NA[rank](q, k, v, 3, additional_keys=ak, additional_values=av, return_lse=True)
    qd, kd, vd, akd, avd = (t.detach().double().requires_grad_() for t in (q, k, v, ak, av))
    ref, ref_lse = R.na(qd, kd, vd, 3, additional_keys=akd, additional_values=avd, return_lse=True)
    assert (out.double() - ref).abs().max().item() < 2e-5
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, ak, av), go)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd, akd, avd), go.double())
    for g, rg in zip(grads, rgrads):
        assert (g.double() - rg).abs().max().item() < 1e-4


def test_non_contiguous_inputs(cpu_isa):
    base = _rand(2, 9, 11, 3, 2, 16)  # a packed qkv projection [B, X, Y, 3, H, D]
    q, k, v = base[:, :, :, 0], base[:, :, :, 1], base[:, :, :, 2, :, ::2]
    assert not q.is_contiguous() and not v.is_contiguous()
    out = tilefuse.na2d(q, k, v, 3, dilation=2)
    ref = R.na(q.double(), k.double(), v.double(), 3, dilation=2)
    assert (out.double() - ref).abs().max().item() < 2e-5


# Extra shapes for the lane-vectorised forward (stride 1 on the innermost axis): rows narrower
# than a vector, one past a multiple of 8, value dims that are not multiples of 8.
LANE_CASES = CASES + [
    ("2d-narrow", (9, 3), 2, 2, 8, 12, 3, 1, 1, False),
    ("2d-width-8k+1", (6, 17), 3, 1, 16, 20, (3, 4), 1, (2, 1), (False, True)),
    ("1d-dv5", (41,), 2, 2, 8, 5, 11, 1, 1, True),
]


@pytest.mark.parametrize("case", LANE_CASES, ids=[c[0] for c in LANE_CASES])
def test_lane_forward_matches_tile_loop(case, cpu_isa, monkeypatch):
    """Sliding NA (stride 1 on the innermost axis) runs with the queries in vector lanes by
    default (TILEFUSE_NA_LANES unset or 1); =0 sends it through the tile loop. Both must equal
    the reference."""
    shape, H, Hkv, D, Dv, kw = _case(case)
    q, k, v = _inputs(shape, H, Hkv, D, Dv)
    rpb = _rpb(H, kw["kernel_size"], len(shape))
    ref, ref_lse = R.na(q.double(), k.double(), v.double(), rpb=rpb.double(), return_lse=True, **kw)
    outs = {}
    for flag in ["1", "0"]:
        monkeypatch.setenv("TILEFUSE_NA_LANES", flag)
        out, lse = NA[len(shape)](q, k, v, rpb=rpb, return_lse=True, **kw)
        assert (out.double() - ref).abs().max().item() < 2e-5
        assert (lse.double() - ref_lse).abs().max().item() < 1e-4
        outs[flag] = out
    assert (outs["1"] - outs["0"]).abs().max().item() < 1e-5
    # float64 through the lane kernel, and the backward from its output and LSE.
    monkeypatch.setenv("TILEFUSE_NA_LANES", "1")
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    rpb = rpb.double().requires_grad_()
    out, lse = NA[len(shape)](q, k, v, rpb=rpb, return_lse=True, **kw)
    assert (out - ref).abs().max().item() < 1e-10 and (lse - ref_lse).abs().max().item() < 1e-10
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v, rpb))
    ref, ref_lse = R.na(q, k, v, rpb=rpb, return_lse=True, **kw)
    ref_grads = torch.autograd.grad((ref * go).sum() + (ref_lse * gl).sum(), (q, k, v, rpb))
    for g, rg in zip(grads, ref_grads):
        assert (g - rg).abs().max().item() < 1e-9


def _op_and_ref(op, ref, *args, **kwargs):
    """op(q, k, v, *args, **kwargs), or the float64 reference with reference=True."""
    return lambda q, k, v, reference=False: (ref if reference else op)(q, k, v, *args, **kwargs)


NAN_CASES = [  # (id, TILEFUSE_NA_LANES, op on q, k, v)
    ("sliding-lanes", "1", _op_and_ref(tilefuse.na2d, R.na, (5, 7))),
    ("sliding-tile-loop", "0", _op_and_ref(tilefuse.na2d, R.na, (5, 7))),
    ("strided", "1", _op_and_ref(tilefuse.na2d, R.na, (5, 7), stride=(1, 3))),
    ("blocked", "1", _op_and_ref(tilefuse.na2d, R.na, 4, stride=4)),
    ("swin-shift", "1", _op_and_ref(tilefuse.window_attention, R.window_attention, (5, 7), (2, 3))),
]


@pytest.mark.parametrize("case", NAN_CASES, ids=[c[0] for c in NAN_CASES])
def test_nan_key_reaches_only_its_window(case, cpu_isa, monkeypatch):
    """Documented IEEE behaviour (as for tilefuse.attention): a NaN key poisons exactly the
    queries that see it; every other output equals the reference. The key sits at a border
    column, where lane border blocks, tile-loop tiles and shifted Swin windows all compute
    logits of keys that some of their queries do not see."""
    _, lanes, op = case
    monkeypatch.setenv("TILEFUSE_NA_LANES", lanes)
    shape = (20, 21)
    q, k, v = _inputs(shape, 2, 2, 16, 16)
    ref = op(q.double(), k.double(), v.double(), reference=True)
    k2 = k.clone()
    k2[0, 0, shape[1] - 1, 1] *= 2  # which outputs depend on key (0, last) of head 1
    sees = (op(q.double(), k2.double(), v.double(), reference=True) - ref)[0, ..., 1, :].abs().amax(-1) > 0
    k[0, 0, shape[1] - 1, 1, 3] = float("nan")
    out = op(q, k, v)
    nan_rows = torch.isnan(out).any(-1)
    assert sees.any() and not sees.all()
    assert torch.equal(nan_rows[0, ..., 1], sees) and not nan_rows[0, ..., 0].any()
    assert (out.double() - ref)[~nan_rows].abs().max().item() < 2e-5


@pytest.mark.skipif(tilefuse.cpu_isa() != "cpu-avx2", reason="this CPU has only the generic tier")
def test_tiers_agree():
    q, k, v = _inputs((16, 16), 2, 2, 32, 32)
    outs = []
    for isa in ["cpu-avx2", "cpu-generic"]:
        with tilefuse.backend.use_cpu_isa(isa):
            outs.append(tilefuse.na2d(q, k, v, 5, stride=2))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


def test_rpb_gradient_is_deterministic():
    q, k, v = _inputs((16, 16), 2, 2, 16, 16, B=3, grad=True)
    rpb = _rpb(2, 5, 2, grad=True)
    grads = []
    for _ in range(3):
        out = tilefuse.na2d(q, k, v, 5, rpb=rpb)
        grads.append(torch.autograd.grad(out.square().sum(), rpb)[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


# ----------------------------------------------------------------------------------------
# Index math: the debug op (C++ header) against the Python formula, and properties of the
# definition that do not depend on either.


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_window_index_math(causal):
    for L in range(1, 23):
        for kernel in range(1, L + 1):
            for dil in range(1, L // kernel + 1):
                for stride in range(1, kernel + 1):
                    got = torch.ops.tilefuse._na_window(L, kernel, dil, stride, causal)
                    start, end, g = na_window(L, kernel, dil, stride, causal)
                    want = torch.stack([g + dil * start, g + dil * (end - 1) + 1], 1)
                    assert torch.equal(got, want), (L, kernel, dil, stride, causal)
                    x = torch.arange(L)
                    keys = (got[:, 1] - got[:, 0] - 1) // dil + 1
                    assert torch.all(got[:, 0] % dil == x % dil)  # same dilation group
                    if causal:
                        assert torch.all(got[:, 1] == x + 1) and torch.all(keys <= kernel)
                    else:
                        # Every query sees exactly `kernel` keys, inside the axis, its own
                        # stride-group leader's window.
                        assert torch.all(keys == kernel)
                        assert torch.all(got[:, 0] >= 0) and torch.all(got[:, 1] <= L)
                    if stride == 1 and not causal:
                        assert torch.all((got[:, 0] <= x) & (x < got[:, 1]))


def test_swin_window_index_math():
    # Against the literal recipe: positions sharing a rolled window and a region.
    for L in range(1, 20):
        for W in range(1, 9):
            for s in range(W):
                got = torch.ops.tilefuse._swin_window(L, W, s)
                Lp = math.ceil(L / W) * W
                y = torch.arange(Lp)
                r = (y - s) % Lp
                region = torch.zeros(Lp, dtype=torch.long)
                if s > 0:
                    region[(r >= Lp - W) & (r < Lp - s)] = 1
                    region[r >= Lp - s] = 2
                same = (r[:, None] // W == r[None, :] // W) & (region[:, None] == region[None, :])
                for i in range(Lp):
                    keys = y[same[i]]
                    assert keys.min().item() == got[i, 0].item() and keys.max().item() + 1 == got[i, 1].item()
                    assert len(keys) == keys.max().item() - keys.min().item() + 1  # an interval


# ----------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile


@pytest.mark.parametrize("rank,kw", [
    (1, dict(kernel_size=4, dilation=2, stride=3)),
    (2, dict(kernel_size=(3, 2), is_causal=(True, False), stride=(2, 1))),
    (3, dict(kernel_size=2, dilation=(1, 2, 1))),
], ids=["1d", "2d", "3d"])
def test_gradcheck_float64(rank, kw, cpu_isa):
    shape = {1: (11,), 2: (5, 4), 3: (3, 4, 3)}[rank]
    q, k, v = (t.double().requires_grad_() for t in _inputs(shape, 2, 1, 4, 3, B=1))
    rpb = _rpb(2, kw["kernel_size"], rank).double().requires_grad_()

    def f(q, k, v, rpb):
        return NA[rank](q, k, v, rpb=rpb, return_lse=True, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v, rpb))


def test_opcheck():
    q, k, v = _inputs((6, 7), 4, 2, 16, 24, grad=True)
    rpb = _rpb(4, 3, 2, grad=True)
    args = ([3, 3], [2, 1], [1, 2], [False, True], 0.25)
    torch.library.opcheck(torch.ops.tilefuse.na_fwd, (q, k, v, rpb, *args))
    torch.library.opcheck(torch.ops.tilefuse.na_fwd, (q, k, v, None, *args))
    out, lse = torch.ops.tilefuse.na_fwd(q, k, v, rpb, *args)
    torch.library.opcheck(torch.ops.tilefuse.na_bwd,
                          (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                           v.detach(), rpb.detach(), out.detach(), lse.detach(), *args))


def test_torch_compile_fullgraph():
    def f(q, k, v, rpb):
        o, lse = tilefuse.na2d(q, k, v, 3, dilation=(1, 2), rpb=rpb, return_lse=True)
        return o.square().sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = _inputs((6, 8), 2, 2, 16, 16, grad=True)
    rpb = _rpb(2, 3, 2, grad=True)
    loss = compiled(q, k, v, rpb)
    grads = torch.autograd.grad(loss, (q, k, v, rpb))
    ref_loss = f(q, k, v, rpb)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v, rpb))
    assert torch.allclose(loss, ref_loss)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, atol=1e-5)


def test_torch_compile_inductor_with_additional_tokens():
    q, k, v = _inputs((5, 6), 2, 2, 16, 16)
    ak, av = _rand(2, 3, 2, 16), _rand(2, 3, 2, 16)

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return tilefuse.na2d(q * 2, k, v, 3, additional_keys=ak, additional_values=av)

    ref = tilefuse.na2d(q * 2, k, v, 3, additional_keys=ak, additional_values=av)
    assert torch.allclose(f(q, k, v), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------
# natten 0.21 cross-check (its Flex backend runs on CPU in eager mode; forward only there).

HAS_NATTEN = importlib.util.find_spec("natten") is not None


@pytest.mark.skipif(not HAS_NATTEN, reason="natten is not installed (pip download --no-deps "
                    "--no-build-isolation natten==0.21.7, then pip install --no-build-isolation "
                    "--no-deps the sdist)")
@pytest.mark.parametrize("shape,kw", [
    ((40,), dict(kernel_size=7, dilation=2, stride=3)),
    ((24,), dict(kernel_size=6, stride=2, is_causal=True)),
    ((12, 14), dict(kernel_size=(4, 5), dilation=(2, 1), stride=(3, 2))),
    ((13, 11), dict(kernel_size=3, is_causal=(True, False))),
    ((6, 8, 8), dict(kernel_size=(2, 3, 4), dilation=(1, 2, 1), stride=(1, 3, 2), is_causal=(True, False, False))),
], ids=["1d", "1d-causal-even", "2d", "2d-causal", "3d"])
def test_matches_natten(shape, kw):
    import natten

    q, k, v = _inputs(shape, 2, 2, 16, 16)
    ref = getattr(natten, f"na{len(shape)}d")(q, k, v, **kw)
    out = NA[len(shape)](q, k, v, **kw)
    assert (out - ref).abs().max().item() < 1e-5


# ----------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, for each check.


def test_bad_rank_and_shapes():
    q, k, v = _inputs((8, 8), 2, 2, 16, 16)
    with pytest.raises(ValueError, match=r"na2d: q must be \[batch"):
        tilefuse.na2d(q[0], k, v, 3)
    with pytest.raises(ValueError, match="na2d: k must be"):
        tilefuse.na2d(q, k[0], v, 3)
    with pytest.raises(ValueError, match="na2d: v must be"):
        tilefuse.na2d(q, k, v[0], 3)
    with pytest.raises(ValueError, match="spatial shape of q"):
        tilefuse.na2d(q, k[:, :4], v[:, :4], 3)
    with pytest.raises(ValueError, match="batch sizes differ"):
        tilefuse.na2d(q, k[:1], v[:1], 3)
    with pytest.raises(ValueError, match=r"k head_dim \(8\) must equal q head_dim"):
        tilefuse.na2d(q, k[..., :8], v, 3)
    with pytest.raises(ValueError, match="v heads"):
        tilefuse.na2d(q, k, v[..., :1, :], 3)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple"):
        tilefuse.na2d(_rand(2, 8, 8, 3, 16), k, v, 3)
    with pytest.raises(ValueError, match="head_dim of q must be > 0"):
        tilefuse.na2d(q[..., :0], k[..., :0], v, 3)


def test_bad_parameters():
    q, k, v = _inputs((8, 8), 2, 2, 16, 16)
    with pytest.raises(ValueError, match="kernel_size \\* dilation must be <= the input size"):
        tilefuse.na2d(q, k, v, 9)
    with pytest.raises(ValueError, match="kernel_size \\* dilation must be <= the input size"):
        tilefuse.na2d(q, k, v, 3, dilation=3)
    with pytest.raises(ValueError, match="stride must be in \\[1, kernel_size\\]"):
        tilefuse.na2d(q, k, v, 3, stride=4)
    with pytest.raises(ValueError, match="stride must be in"):
        tilefuse.na2d(q, k, v, 3, stride=0)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        tilefuse.na2d(q, k, v, 0)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        tilefuse.na2d(q, k, v, 3, dilation=0)
    with pytest.raises(ValueError, match="na2d: kernel_size must have 2 entries"):
        tilefuse.na2d(q, k, v, (3, 3, 3))
    with pytest.raises(ValueError, match="is_causal must have 2 entries"):
        tilefuse.na2d(q, k, v, 3, is_causal=(True,))
    with pytest.raises(ValueError, match="scale must be finite"):
        tilefuse.na2d(q, k, v, 3, scale=float("inf"))
    with pytest.raises(ValueError, match="dilation must have 2 entries"):
        torch.ops.tilefuse.na_fwd(q, k, v, None, [3, 3], [1], [1, 1], [False, False], 1.0)


def test_bad_dtypes_devices_and_rpb():
    q, k, v = _inputs((8, 8), 2, 2, 16, 16)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        tilefuse.na2d(q, k.half(), v, 3)
    with pytest.raises(TypeError, match="q must be float32, bfloat16, float16 or float64"):
        tilefuse.na2d(q.int(), k.int(), v.int(), 3)
    with pytest.raises(ValueError, match="one device"):
        tilefuse.na2d(q, k.to("meta"), v, 3)
    with pytest.raises(ValueError, match=r"rpb must have shape \[2, 5, 5\]"):
        tilefuse.na2d(q, k, v, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(TypeError, match="rpb must have the dtype of q"):
        tilefuse.na2d(q, k, v, 3, rpb=torch.zeros(2, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="additional_keys and additional_values must be given together"):
        tilefuse.na2d(q, k, v, 3, additional_keys=torch.zeros(2, 3, 2, 16))
    with pytest.raises(ValueError, match="additional_keys/values must be"):
        tilefuse.na2d(q, k, v, 3, additional_keys=torch.zeros(2, 3, 16),
                      additional_values=torch.zeros(2, 3, 16))


def test_bad_backward_inputs():
    q, k, v = _inputs((6, 6), 2, 2, 16, 16)
    args = ([3, 3], [1, 1], [1, 1], [False, False], 0.25)
    out, lse = torch.ops.tilefuse.na_fwd(q, k, v, None, *args)
    with pytest.raises(ValueError, match="grad_out and out must have shape"):
        torch.ops.tilefuse.na_bwd(out[:1], None, q, k, v, None, out, lse, *args)
    with pytest.raises(ValueError, match="lse must be"):
        torch.ops.tilefuse.na_bwd(out, None, q, k, v, None, out, lse.double(), *args)


# ----------------------------------------------------------------------------------------
# Seeded random sweep (NA and Swin, float64, forward and every gradient), sized by
# TILEFUSE_TEST_SWEEP (conftest.SWEEP): partial tiles, key slabs longer than a tile, padding.


def _random_config(rng):
    rank = rng.choice([1, 1, 2, 2, 3])
    if rank == 1:
        shape = (rng.randint(1, 300),)
    elif rank == 2:
        shape = (rng.randint(1, 30), rng.randint(1, 30))
    else:
        shape = tuple(rng.randint(1, 8) for _ in range(3))
    ks, ds, ss, cs = [], [], [], []
    for n in shape:
        k = rng.randint(1, n)
        ks.append(k)
        ds.append(rng.randint(1, max(1, n // k)))
        ss.append(rng.randint(1, k))
        cs.append(rng.random() < 0.3)
    H = rng.choice([1, 2, 4])
    Hkv = rng.choice([h for h in (1, 2, 4) if H % h == 0])
    window = [rng.randint(1, n + 3) for n in shape]
    shift = [rng.randint(0, w - 1) for w in window]
    return shape, H, Hkv, (ks, ds, ss, cs), (window, shift)


def test_random_sweep_float64():
    import random

    from conftest import SWEEP

    rng = random.Random(1234)
    for _ in range(8 * SWEEP):
        shape, H, Hkv, (ks, ds, ss, cs), (window, shift) = _random_config(rng)
        q, k, v = (t.double().requires_grad_() for t in _inputs(shape, H, Hkv, 8, 8))
        rpb = torch.randn(H, *[2 * x - 1 for x in ks], dtype=torch.float64, requires_grad=True)
        out = NA[len(shape)](q, k, v, ks, ds, ss, cs, rpb=rpb)
        ref = R.na(q, k, v, ks, ds, ss, cs, rpb=rpb)
        go = torch.randn_like(out)
        for a, b in zip((out, *torch.autograd.grad(out, (q, k, v, rpb), go)),
                        (ref, *torch.autograd.grad(ref, (q, k, v, rpb), go))):
            assert (a - b).abs().max().item() < 1e-9, (shape, ks, ds, ss, cs)
        table = torch.randn(math.prod(2 * w - 1 for w in window), H, dtype=torch.float64,
                            requires_grad=True)
        pads = (torch.randn(Hkv, 8, dtype=torch.float64, requires_grad=True),
                torch.randn(Hkv, 8, dtype=torch.float64, requires_grad=True))
        out = tilefuse.window_attention(q, k, v, window, shift, rpb=table, pad_kv=pads)
        ref = R.window_attention(q, k, v, window, shift, rpb=table, pad_kv=pads)
        leaves = (q, k, v, table, *pads)
        for a, b in zip((out, *torch.autograd.grad(out, leaves, go)),
                        (ref, *torch.autograd.grad(ref, leaves, go))):
            assert (a - b).abs().max().item() < 1e-9, (shape, window, shift)
