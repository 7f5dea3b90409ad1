# SPDX-License-Identifier: Apache-2.0
"""Block-sparse attention on CPU against SDPA with the expanded mask, FlexAttention compiled
with the same block mask, our own dense kernel and the ideal time, in one run.

S=16384, H=8, D=64, block 64, random layout of ~10% density (the issue's case). Saves
bench/results/block_sparse_cpu.{md,json}. Usage: python bench/bench_block_sparse.py [--seq N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tilefuse  # noqa: E402
from common import env_threads, machine_info, markdown_table, save, timeit  # noqa: E402

PEAK = 140e9  # SDPA's measured fp32 forward rate on this machine type, the practical ceiling


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--density", type=float, default=0.10)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--skip-flex", action="store_true")
    args = ap.parse_args()
    env_threads()
    torch.manual_seed(0)
    S, H, D, blk = args.seq, 8, 64, args.block
    n = math.ceil(S / blk)
    layout = torch.rand(1, H, n, n) < args.density
    bm = tilefuse.BlockMask.from_dense(layout, blk, (S, S))
    density = layout.float().mean().item()
    useful = 4.0 * S * S * D * H * density
    q, k, v = (torch.randn(1, S, H, D, requires_grad=True) for _ in range(3))
    go = torch.randn(1, S, H, D)
    rows, data = [], {"machine": machine_info(), "density": density, "S": S, "block": blk}

    def row(name, t, ref=None, flops=useful):
        rows.append([name, f"{t*1e3:.0f}", f"{flops/t/1e9:.0f}",
                     "-" if ref is None else f"{ref/t:.2f}"])
        data[name] = t
        print(rows[-1], flush=True)

    with torch.no_grad():
        t_bs = timeit(lambda: tilefuse.block_sparse_attention(q, k, v, bm), max_reps=5)
        t_dense = timeit(lambda: tilefuse.attention(q, k, v), max_reps=1, warmup=0)
        t_route = timeit(lambda: tilefuse.topk_block_mask(q, k, blk, max(1, round(density * n))),
                         max_reps=5)
    t_bs_fb = timeit(lambda: tilefuse.block_sparse_attention(q, k, v, bm).backward(go), max_reps=3)
    t_dense_fb = timeit(lambda: tilefuse.attention(q, k, v).backward(go), max_reps=1, warmup=0)
    ideal = useful / PEAK
    row("tilefuse block-sparse fwd", t_bs)
    row("tilefuse dense fwd (same tokens)", t_dense, flops=useful / density)
    row("ideal fwd at 140 GFLOP/s", ideal)
    row("tilefuse block-sparse fwd+bwd", t_bs_fb, flops=3.5 * useful)
    row("tilefuse dense fwd+bwd", t_dense_fb, flops=3.5 * useful / density)
    row("topk_block_mask routing", t_route, flops=0.0)
    data["sparse/dense fwd"] = t_bs / t_dense
    data["sparse/dense fwd+bwd"] = t_bs_fb / t_dense_fb

    # Anchors: SDPA with the expanded boolean mask (heads-first), FlexAttention compiled.
    el = tilefuse.reference.block_sparse_element_mask(bm)  # [1, H, S, S] bool
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v))
    with torch.no_grad():
        t_sdpa = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=el),
                        max_reps=1, warmup=0)
    row("SDPA + expanded bool mask fwd", t_sdpa)

    def sdpa_fb_per_head():  # one head at a time: all heads at once would need ~9 GB of scores
        for h in range(H):
            qh, kh, vh = (x[:, h:h + 1].clone().requires_grad_() for x in (qt, kt, vt))
            F.scaled_dot_product_attention(qh, kh, vh, attn_mask=el[:, h:h + 1]).backward(
                go[:, :, h:h + 1].transpose(1, 2))

    t_sdpa_fb = timeit(sdpa_fb_per_head, max_reps=1, warmup=0)
    row("SDPA + expanded bool mask fwd+bwd (per head)", t_sdpa_fb, flops=3.5 * useful)
    del el
    t_flex = None
    if not args.skip_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            lay = layout[0]
            fbm = create_block_mask(lambda b, h, qi, ki: lay[h, qi // blk, ki // blk], 1, H, S,
                                    S, device="cpu", BLOCK_SIZE=blk)
            flex = torch.compile(flex_attention, dynamic=False)
            with torch.no_grad():
                t_flex = timeit(lambda: flex(qt, kt, vt, block_mask=fbm), max_reps=5, warmup=1)
            row("FlexAttention compiled, same block mask, fwd", t_flex)
        except Exception as e:  # noqa: BLE001  (an anchor that cannot run is reported, not fatal)
            print(f"FlexAttention anchor failed: {type(e).__name__}: {e}")
            data["flex_error"] = f"{type(e).__name__}: {e}"

    summary = [
        ["fwd: sparse / dense time", f"{t_bs / t_dense:.3f}", "<= 0.15"],
        ["fwd: fraction of ideal speedup", f"{(t_dense / t_bs) / (1 / density):.2f}", ">= 0.67"],
        ["fwd+bwd: sparse / dense time", f"{t_bs_fb / t_dense_fb:.3f}", "<= 0.15"],
        ["fwd: speedup vs SDPA + mask", f"{t_sdpa / t_bs:.1f}x", ">= 5x"],
        ["fwd+bwd: speedup vs SDPA + mask", f"{t_sdpa_fb / t_bs_fb:.1f}x", ">= 5x"],
        ["fwd: speedup vs Flex compiled", "n/a" if t_flex is None else f"{t_flex / t_bs:.2f}x", ">= 1.5x"],
        ["routing / attention fwd", f"{t_route / t_bs:.3f}", "< 0.10"],
    ]
    text = "\n".join([
        f"# Block-sparse attention on CPU\n\n{json.dumps(data['machine'])}\n",
        f"S={S}, H={H}, D={D}, block {blk}, random layout, density {density:.3f}. GFLOP/s count "
        "useful (unmasked) work; fwd+bwd = 3.5x fwd. Times are minima over repetitions.\n",
        markdown_table(["case", "ms", "useful GFLOP/s", "-"], [r[:3] + [""] for r in rows]), "",
        markdown_table(["criterion", "measured", "target"], summary), ""])
    print(text)
    print(f"saved {save('block_sparse_cpu', text, data)}")


if __name__ == "__main__":
    main()
