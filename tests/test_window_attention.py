# SPDX-License-Identifier: Apache-2.0
"""tilefuse.window_attention against the literal Swin recipe (tilefuse.reference.window_attention:
pad, roll, partition, rpb + shifted-window mask, reverse, roll back, crop) in float64."""

import math

import pytest
import torch

import tilefuse
from tilefuse import reference as R

# Same tolerance reasoning as tests/test_attention.py.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _tuple(x, r):
    return (x,) * r if isinstance(x, int) else tuple(x)


# id, spatial shape, H, Hkv, D, Dv, window, shift, pad_kv
CASES = [
    ("1d", (30,), 2, 2, 16, 16, 6, 0, False),
    ("1d-shift-pad", (29,), 2, 2, 16, 16, 8, 3, True),
    ("2d-swin", (14, 14), 3, 3, 32, 32, 7, 3, False),
    ("2d-no-shift", (14, 21), 2, 2, 16, 16, 7, 0, False),
    ("2d-pad-no-shift", (10, 13), 2, 2, 16, 16, (4, 5), 0, True),
    ("2d-pad-shift", (11, 9), 2, 2, 16, 16, (4, 4), (2, 1), True),
    ("2d-pad-default", (9, 9), 2, 2, 16, 16, 4, 2, False),
    ("2d-shift-one-axis", (12, 12), 2, 2, 16, 16, 6, (0, 3), False),
    ("2d-gqa", (8, 8), 6, 2, 32, 16, 4, 2, True),
    ("2d-window>size", (5, 6), 2, 2, 16, 16, 8, 4, True),
    ("2d-big-window", (24, 24), 1, 1, 16, 16, 12, 6, False),
    ("3d", (4, 8, 8), 2, 2, 16, 16, (2, 4, 4), (1, 2, 2), False),
    ("3d-pad", (5, 7, 6), 2, 1, 16, 16, (2, 3, 4), (1, 1, 2), True),
]


def _make(case, dtype=torch.float32, grad=False):
    _, shape, H, Hkv, D, Dv, window, shift, pad = case
    r = len(shape)
    q = _rand(2, *shape, H, D, dtype=dtype).requires_grad_(grad)
    k = _rand(2, *shape, Hkv, D, dtype=dtype).requires_grad_(grad)
    v = _rand(2, *shape, Hkv, Dv, dtype=dtype).requires_grad_(grad)
    n_rel = math.prod(2 * w - 1 for w in _tuple(window, r))
    rpb = _rand(n_rel, H, dtype=dtype).requires_grad_(grad)
    pad_kv = None
    if pad:
        pad_kv = (_rand(Hkv, D, dtype=dtype).requires_grad_(grad),
                  _rand(Hkv, Dv, dtype=dtype).requires_grad_(grad))
    return q, k, v, rpb, pad_kv, dict(window_size=window, shift_size=shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_swin_recipe(case, dtype, cpu_isa):
    q, k, v, rpb, pad_kv, kw = _make(case, dtype)
    out, lse = tilefuse.window_attention(q, k, v, rpb=rpb, pad_kv=pad_kv, return_lse=True, **kw)
    dpad = None if pad_kv is None else tuple(t.double() for t in pad_kv)
    ref, ref_lse = R.window_attention(q.double(), k.double(), v.double(), rpb=rpb.double(),
                                      pad_kv=dpad, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs err {err:.3g}"
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_swin_recipe(case, cpu_isa):
    q, k, v, rpb, pad_kv, kw = _make(case, grad=True)
    out, lse = tilefuse.window_attention(q, k, v, rpb=rpb, pad_kv=pad_kv, return_lse=True, **kw)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    leaves = [q, k, v, rpb] + ([] if pad_kv is None else list(pad_kv))
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), leaves)
    dl = [t.detach().double().requires_grad_() for t in leaves]
    dpad = None if pad_kv is None else (dl[4], dl[5])
    ro, rl = R.window_attention(dl[0], dl[1], dl[2], rpb=dl[3], pad_kv=dpad, return_lse=True, **kw)
    rgrads = torch.autograd.grad((ro * go.double()).sum() + (rl * gl.double()).sum(), dl)
    for name, g, rg in zip(["q", "k", "v", "rpb", "k_pad", "v_pad"], grads, rgrads):
        err = (g.double() - rg).abs().max().item()
        assert err < 1e-4 * max(1.0, rg.abs().max().item()), f"d{name}: {err:.3g}"


def test_no_bias_no_pad_kv(cpu_isa):
    q, k, v = _rand(1, 9, 10, 2, 16), _rand(1, 9, 10, 2, 16), _rand(1, 9, 10, 2, 16)
    out = tilefuse.window_attention(q, k, v, (4, 4), (2, 2))
    ref = R.window_attention(q.double(), k.double(), v.double(), (4, 4), (2, 2))
    assert (out.double() - ref).abs().max().item() < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backward_low_precision(dtype, cpu_isa):
    q, k, v, rpb, pad_kv, kw = _make(CASES[5], dtype, grad=True)
    out = tilefuse.window_attention(q, k, v, rpb=rpb, pad_kv=pad_kv, **kw)
    go = torch.randn_like(out)
    leaves = [q, k, v, rpb, *pad_kv]
    grads = torch.autograd.grad(out, leaves, go)
    dl = [t.detach().double().requires_grad_() for t in leaves]
    ref = R.window_attention(dl[0], dl[1], dl[2], rpb=dl[3], pad_kv=(dl[4], dl[5]), **kw)
    rgrads = torch.autograd.grad(ref, dl, go.double())
    for g, rg in zip(grads, rgrads):
        assert g.dtype == dtype
        assert (g.double() - rg).abs().max().item() < 50 * TOL[dtype] * max(1.0, rg.abs().max().item())


def test_gradients_are_deterministic():
    q, k, v, rpb, pad_kv, kw = _make(CASES[5], grad=True)
    results = []
    for _ in range(3):
        out = tilefuse.window_attention(q, k, v, rpb=rpb, pad_kv=pad_kv, **kw)
        results.append(torch.autograd.grad(out.square().sum(), [rpb, *pad_kv]))
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[12]], ids=["1d", "2d", "3d"])
def test_gradcheck_float64(case, cpu_isa):
    _, shape, H, Hkv, D, Dv, window, shift, _ = case
    small = tuple(min(s, 5) for s in shape)
    case = (case[0], small, 2, 1, 4, 3, window, shift, True)
    q, k, v, rpb, pad_kv, kw = _make(case)
    leaves = [t.detach()[:1].double().requires_grad_() if t.dim() > 2 else t.detach().double().requires_grad_()
              for t in (q, k, v, rpb, *pad_kv)]

    def f(q, k, v, rpb, kp, vp):
        return tilefuse.window_attention(q, k, v, rpb=rpb, pad_kv=(kp, vp), return_lse=True, **kw)

    assert torch.autograd.gradcheck(f, leaves)


def test_opcheck():
    q, k, v, rpb, pad_kv, kw = _make(CASES[5], grad=True)
    args = ([4, 4], [2, 1], 0.25)
    torch.library.opcheck(torch.ops.tilefuse.window_attention_fwd, (q, k, v, rpb, *pad_kv, *args))
    torch.library.opcheck(torch.ops.tilefuse.window_attention_fwd, (q, k, v, None, None, None, *args))
    out, lse = torch.ops.tilefuse.window_attention_fwd(q, k, v, rpb, *pad_kv, *args)
    torch.library.opcheck(torch.ops.tilefuse.window_attention_bwd,
                          (torch.randn_like(out), None, q.detach(), k.detach(), v.detach(),
                           rpb.detach(), *(t.detach() for t in pad_kv), out.detach(),
                           lse.detach(), *args))


def test_torch_compile_fullgraph():
    q, k, v, rpb, pad_kv, kw = _make(CASES[5], grad=True)

    def f(q, k, v, rpb, kp, vp):
        return tilefuse.window_attention(q, k, v, rpb=rpb, pad_kv=(kp, vp), **kw).square().sum()

    leaves = [q, k, v, rpb, *pad_kv]
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(f(*leaves), leaves)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, atol=1e-5)
    compiled = torch.compile(lambda q: tilefuse.window_attention(q * 2, k, v, rpb=rpb, **kw),
                             fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(q), tilefuse.window_attention(q * 2, k, v, rpb=rpb, **kw),
                              atol=1e-5)


def test_bad_input():
    q, k, v = _rand(1, 8, 8, 2, 16), _rand(1, 8, 8, 2, 16), _rand(1, 8, 8, 2, 16)
    with pytest.raises(ValueError, match="window_attention: q must be"):
        tilefuse.window_attention(q[0, 0, 0], k, v, 4)
    with pytest.raises(ValueError, match="window_size must have 2 entries"):
        tilefuse.window_attention(q, k, v, (4, 4, 4))
    with pytest.raises(ValueError, match="shift_size must be in \\[0, window_size\\)"):
        tilefuse.window_attention(q, k, v, 4, 4)
    with pytest.raises(ValueError, match="shift_size must be in"):
        tilefuse.window_attention(q, k, v, 4, -1)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        tilefuse.window_attention(q, k, v, 0)
    with pytest.raises(ValueError, match=r"rpb must have shape \[49, 2\]"):
        tilefuse.window_attention(q, k, v, 4, rpb=torch.zeros(2, 49))
    with pytest.raises(ValueError, match=r"k_pad must have shape \[2, 16\]"):
        tilefuse.window_attention(q, k, v, 4, pad_kv=(torch.zeros(2, 8), torch.zeros(2, 16)))
    with pytest.raises(ValueError, match=r"v_pad must have shape \[2, 16\]"):
        tilefuse.window_attention(q, k, v, 4, pad_kv=(torch.zeros(2, 16), torch.zeros(3, 16)))
    with pytest.raises(TypeError, match="k_pad must have the dtype of q"):
        tilefuse.window_attention(q, k, v, 4, pad_kv=(torch.zeros(2, 16).double(), torch.zeros(2, 16)))
    with pytest.raises(ValueError, match="pad_kv must be a"):
        tilefuse.window_attention(q, k, v, 4, pad_kv=(torch.zeros(2, 16),))
    with pytest.raises(ValueError, match="spatial shape of q"):
        tilefuse.window_attention(q, k[:, :4], v[:, :4], 4)
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        tilefuse.window_attention(q, k, v.half(), 4)
    with pytest.raises(ValueError, match="one device"):
        tilefuse.window_attention(q, k, v.to("meta"), 4)
    with pytest.raises(ValueError, match="scale must be finite"):
        tilefuse.window_attention(q, k, v, 4, scale=float("nan"))
