# SPDX-License-Identifier: Apache-2.0
"""BlockMask constructors, top-k routing and the block-sparse reference."""

import math

import pytest
import torch

import tilefuse
from tilefuse import BlockMask, topk_block_mask
from tilefuse import reference as R


def test_from_dense_round_trip_and_indices():
    layout = torch.rand(2, 3, 4, 5) > 0.5
    layout[0, 0, 1] = False  # an empty row
    bm = BlockMask.from_dense(layout, (32, 64), (100, 300))
    assert torch.equal(bm.to_dense(), layout)
    assert bm.kv_num_blocks.dtype == torch.int32 and bm.kv_num_blocks[0, 0, 1] == 0
    for b, h, i in [(0, 0, 0), (1, 2, 3)]:
        n = int(bm.kv_num_blocks[b, h, i])
        assert bm.kv_indices[b, h, i, :n].tolist() == layout[b, h, i].nonzero().flatten().tolist()
    again = BlockMask.from_indices(bm.kv_num_blocks, bm.kv_indices, (32, 64), (100, 300))
    assert torch.equal(again.to_dense(), layout)
    assert abs(bm.density() - layout.float().mean().item()) < 1e-6


def test_bad_block_masks():
    layout = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"block_size entries must be in \[16, 256\]"):
        BlockMask.from_dense(layout, 8, (16, 16))
    with pytest.raises(ValueError, match="must have 4 x 2 blocks"):
        BlockMask.from_dense(layout, (16, 64), (64, 128))
    with pytest.raises(TypeError, match="layout must be a bool tensor"):
        BlockMask.from_dense(layout.int(), 64, (128, 128))
    with pytest.raises(ValueError, match="layout must be 4-D"):
        BlockMask.from_dense(layout[0], 64, (128, 128))
    with pytest.raises(ValueError, match="kv_num_blocks entries must be in"):
        BlockMask.from_indices(torch.full((1, 1, 2), 3, dtype=torch.int32),
                               torch.zeros(1, 1, 2, 2, dtype=torch.int32), 64, (128, 128))
    with pytest.raises(ValueError, match="must be a multiple of tile_shape"):
        BlockMask.from_tiles(torch.ones(1, 1, 4, 4, dtype=torch.bool), (30, 32), (8, 8))


def test_from_flex():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    causal = flex.create_block_mask(lambda b, h, q, k: q >= k, 1, 2, 256, 256, device="cpu",
                                    BLOCK_SIZE=64)
    bm = BlockMask.from_flex(causal, causal=True)
    assert torch.equal(bm.to_dense()[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(bm.partial[0, 0], torch.eye(4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="partial blocks"):
        BlockMask.from_flex(causal)
    # A block-aligned mask has full blocks only and converts exactly.
    aligned = flex.create_block_mask(lambda b, h, q, k: (q // 64) % 2 == (k // 64) % 2, 1, 1,
                                     256, 256, device="cpu", BLOCK_SIZE=64)
    expect = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(BlockMask.from_flex(aligned).to_dense()[0, 0], expect)


@pytest.mark.parametrize("spatial,tile", [((16, 16), (4, 4)), ((8, 16, 16), (2, 4, 4)), ((64,), (16,))])
def test_from_tiles_matches_hand_written_layout(spatial, tile):
    grid = [s // t for s, t in zip(spatial, tile)]
    n = math.prod(grid)
    layout = torch.rand(1, 2, n, n) > 0.6
    bm = BlockMask.from_tiles(layout, spatial, tile)
    el = R.block_sparse_element_mask(bm)
    # Hand-written: token t (row-major) lies in tile number tile_of[t].
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij"), -1)
    tcoords = coords.reshape(-1, len(spatial)) // torch.tensor(tile)
    tile_of = torch.zeros(tcoords.shape[0], dtype=torch.long)
    for ax, g in enumerate(grid):
        tile_of = tile_of * g + tcoords[:, ax]
    hand = layout[:, :, tile_of][:, :, :, tile_of]
    assert torch.equal(el, hand)
    # The multi-dimensional layout form gives the same mask.
    bm2 = BlockMask.from_tiles(layout.reshape(1, 2, *grid, *grid), spatial, tile)
    assert torch.equal(R.block_sparse_element_mask(bm2), hand)


def _literal_topk(q, k, bq, bk, topk, causal, always_local):
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    nq, nk = math.ceil(Sq / bq), math.ceil(Sk / bk)
    layout = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    off = Sk - Sq
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                qs = q[b, i * bq:(i + 1) * bq, h].double().mean(0)
                q_first, q_last = i * bq + off, min((i + 1) * bq, Sq) - 1 + off
                cands, forced = [], []
                for j in range(nk):
                    k_first, k_last = j * bk, min((j + 1) * bk, Sk) - 1
                    if causal and k_first > q_last:
                        continue
                    if always_local and k_first <= q_last and k_last >= q_first:
                        forced.append(j)
                        continue
                    ks = k[b, j * bk:(j + 1) * bk, h // (H // Hkv)].double().mean(0)
                    cands.append((float(qs @ ks), j))
                cands.sort(key=lambda t: -t[0])
                for j in forced + [j for _, j in cands[:topk]]:
                    layout[b, h, i, j] = True
    return layout


@pytest.mark.parametrize("causal,always_local", [(False, True), (True, True), (False, False), (True, False)])
def test_topk_routing_matches_literal(causal, always_local):
    q = torch.randn(2, 150, 4, 16)
    k = torch.randn(2, 200, 2, 16)
    bm = topk_block_mask(q, k, (32, 16), 3, causal=causal, always_local=always_local)
    expect = _literal_topk(q, k, 32, 16, 3, causal, always_local)
    assert torch.equal(bm.to_dense(), expect)
    assert (bm.partial is not None) == causal


def test_topk_routing_bad_input():
    q = torch.randn(1, 64, 4, 16)
    with pytest.raises(ValueError, match="topk must be an int"):
        topk_block_mask(q, q, 16, -1)
    with pytest.raises(ValueError, match="incompatible"):
        topk_block_mask(q, torch.randn(1, 64, 3, 16), 16, 2)


def test_reference_full_layout_is_plain_attention():
    q, k, v = torch.randn(1, 70, 4, 16), torch.randn(1, 90, 2, 16), torch.randn(1, 90, 2, 8)
    full = BlockMask.from_dense(torch.ones(1, 1, 3, 6, dtype=torch.bool), (32, 16), (70, 90))
    for causal in (False, True):
        out = R.block_sparse_attention(q.double(), k.double(), v.double(), full, causal=causal)
        ref = R.attention(q.double(), k.double(), v.double(), causal=causal)
        assert torch.allclose(out, ref)


def test_reference_empty_rows():
    q = k = v = torch.randn(1, 64, 1, 16)
    layout = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    layout[0, 0, 0, 0] = True
    out, lse = R.block_sparse_attention(q, k, v, BlockMask.from_dense(layout, 16, (64, 64)),
                                        return_lse=True)
    assert torch.all(out[0, 16:] == 0) and torch.all(torch.isneginf(lse[0, 16:]))
    assert torch.isfinite(lse[0, :16]).all()


# ----------------------------------------------------------------------------------------
# The fused kernel against the reference

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _inputs(B, Sq, Sk, H, Hkv, D, Dv, dtype=torch.float32, grad=False):
    q = torch.randn(B, Sq, H, D).to(dtype).requires_grad_(grad)
    k = torch.randn(B, Sk, Hkv, D).to(dtype).requires_grad_(grad)
    v = torch.randn(B, Sk, Hkv, Dv).to(dtype).requires_grad_(grad)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("blocks,density", [((64, 64), 0.3), ((32, 128), 0.5), ((256, 16), 0.2),
                                            ((48, 80), 0.6)], ids=["64x64", "32x128", "256x16", "48x80"])
def test_block_sparse_forward_matches_reference(blocks, density, causal, dtype, cpu_isa):
    B, Sq, Sk, H, Hkv, D, Dv = 2, 300, 270, 4, 2, 32, 48
    q, k, v = _inputs(B, Sq, Sk, H, Hkv, D, Dv, dtype)
    nq, nk = math.ceil(Sq / blocks[0]), math.ceil(Sk / blocks[1])
    layout = torch.rand(B, H, nq, nk) < density
    layout[0, 1, 0] = False  # an empty row: zeros and LSE -inf
    bm = BlockMask.from_dense(layout, blocks, (Sq, Sk))
    out, lse = tilefuse.block_sparse_attention(q, k, v, bm, causal=causal, return_lse=True)
    ref, ref_lse = R.block_sparse_attention(q.double(), k.double(), v.double(), bm, causal=causal,
                                            return_lse=True)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max().item() <= TOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert (lse.double()[fin] - ref_lse[fin]).abs().max().item() < 1e-4
    assert torch.all(out[0, :blocks[0], 1] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_backward_matches_reference(causal, cpu_isa):
    q, k, v = _inputs(2, 200, 230, 4, 1, 32, 32, grad=True)
    bm = BlockMask.from_dense(torch.rand(1, 4, 7, 8) < 0.4, (32, 32), (200, 230))
    out, lse = tilefuse.block_sparse_attention(q, k, v, bm, causal=causal, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    fin = torch.isfinite(lse)
    grads = torch.autograd.grad((out * go).sum() + (torch.where(fin, lse, 0) * gl).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = R.block_sparse_attention(qd, kd, vd, bm, causal=causal, return_lse=True)
    rgrads = torch.autograd.grad((ro * go.double()).sum() + (torch.where(fin, rl, 0) * gl.double()).sum(),
                                 (qd, kd, vd))
    for g, rg in zip(grads, rgrads):
        assert (g.double() - rg).abs().max().item() < 1e-4


def test_block_sparse_gradcheck_opcheck_compile():
    q, k, v = _inputs(1, 40, 40, 2, 1, 8, 8, torch.float64, grad=True)
    bm = BlockMask.from_dense(torch.tensor([[[[1, 0, 1], [0, 1, 0], [1, 1, 0]]]], dtype=torch.bool),
                              16, (40, 40))
    assert torch.autograd.gradcheck(
        lambda q, k, v: tilefuse.block_sparse_attention(q, k, v, bm, causal=True), (q, k, v))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.tilefuse.block_sparse_attention_fwd,
                          (qf, kf, vf, bm.kv_num_blocks, bm.kv_indices, 16, 16, True, 0.35))
    compiled = torch.compile(lambda q, k, v: tilefuse.block_sparse_attention(q, k, v, bm).sum(),
                             fullgraph=True, backend="aot_eager")
    loss = compiled(qf, kf, vf)
    loss.backward()
    assert torch.allclose(loss, tilefuse.block_sparse_attention(qf, kf, vf, bm).sum(), atol=1e-5)


def test_block_sparse_spatial_tiles_and_routing():
    q, k, v = _inputs(1, 16 * 16, 16 * 16, 2, 2, 16, 16)
    layout = torch.rand(1, 2, 16, 16) < 0.3
    layout[..., torch.arange(16), torch.arange(16)] = True
    bm = BlockMask.from_tiles(layout, (16, 16), (4, 4))
    out = tilefuse.block_sparse_attention(q, k, v, bm)
    ref = R.block_sparse_attention(q.double(), k.double(), v.double(), bm)
    assert (out.double() - ref).abs().max() < 2e-5
    routed = topk_block_mask(q, k, 32, 2, causal=True)
    out = tilefuse.block_sparse_attention(q, k, v, routed, causal=True)
    ref = R.block_sparse_attention(q.double(), k.double(), v.double(), routed, causal=True)
    assert (out.double() - ref).abs().max() < 2e-5


def test_block_sparse_bad_input():
    q, k, v = _inputs(1, 64, 64, 2, 2, 16, 16)
    bm = BlockMask.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16, (64, 64))
    with pytest.raises(ValueError, match=r"the block mask is for seq_lens \(64, 64\)"):
        tilefuse.block_sparse_attention(q[:, :32], k, v, bm)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        tilefuse.block_sparse_attention(q[0], k[0], v[0], bm, cu_seqlens=torch.tensor([0, 64]))
    with pytest.raises(ValueError, match=r"q must be \[total, heads, head_dim\] \(varlen\)"):
        tilefuse.block_sparse_attention(q, k, v, bm, cu_seqlens=torch.tensor([0, 64], dtype=torch.int32))
    op = torch.ops.tilefuse.block_sparse_attention_fwd
    with pytest.raises(ValueError, match="ascending block indices"):
        op(q, k, v, bm.kv_num_blocks, bm.kv_indices.flip(-1).contiguous(), 16, 16, False, 0.25)
    with pytest.raises(ValueError, match=r"kv_num_blocks entries must be in \[0, 4\]"):
        op(q, k, v, bm.kv_num_blocks + 1, bm.kv_indices, 16, 16, False, 0.25)
    with pytest.raises(ValueError, match="block sizes must be in"):
        op(q, k, v, bm.kv_num_blocks, bm.kv_indices, 8, 16, False, 0.25)
    with pytest.raises(ValueError, match=r"kv_num_blocks must be \[B\|1, H\|1, 2\]"):
        op(q, k, v, bm.kv_num_blocks, bm.kv_indices, 32, 16, False, 0.25)
    with pytest.raises(TypeError, match="must be int32"):
        op(q, k, v, bm.kv_num_blocks.long(), bm.kv_indices, 16, 16, False, 0.25)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        op(q, k.double(), v, bm.kv_num_blocks, bm.kv_indices, 16, 16, False, 0.25)
    with pytest.raises(ValueError, match="must be a multiple of k/v heads"):
        op(torch.randn(1, 64, 3, 16), k, v, bm.kv_num_blocks, bm.kv_indices, 16, 16, False, 0.25)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_varlen(causal, cpu_isa):
    lens = [100, 0, 37, 64]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, 4, 16, requires_grad=True)
    k = torch.randn(T, 2, 16, requires_grad=True)
    v = torch.randn(T, 2, 16, requires_grad=True)
    layout = torch.rand(len(lens), 4, 7, 7) < 0.5
    bm = BlockMask.from_dense(layout, 16, (100, 100))
    out = tilefuse.block_sparse_attention(q, k, v, bm, causal=causal, cu_seqlens=cu)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = R.block_sparse_attention(qd, kd, vd, bm, causal=causal, cu_seqlens=cu)
    assert (out.double() - ref).abs().max() < 2e-5
    go = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, (q, k, v), go),
                     torch.autograd.grad(ref, (qd, kd, vd), go.double())):
        assert (g.double() - rg).abs().max() < 1e-4
