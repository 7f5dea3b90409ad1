# SPDX-License-Identifier: Apache-2.0
"""Neighborhood and Swin window attention on CPU against its anchors, measured in one run.

Prints tables and saves bench/results/neighborhood_cpu.{md,json}. Sections:
  na       2-D / 3-D NA (fp32): forward against SDPA with a boolean mask, FlexAttention
           compiled on CPU with the NA block mask, and natten (if installed, eager Flex);
           forward+backward against SDPA with a boolean mask (Flex has no CPU backward)
  ideal    fraction of the ideal speedup over tilefuse's own dense attention on the same
           tokens (ideal = dense attended pairs / attended pairs), with both kernels'
           efficiency against the fp32 GEMM rate measured in the same run
  swin     Swin block attention (56x56, window 7, shift 3, 3 heads, D 32, rpb), forward and
           forward+backward, against the roll + partition + SDPA recipe (alternating rounds),
           with the FLOP-bound time of its GEMMs at the fp32 GEMM rate
Forward+backward rows time torch.autograd.grad (gradients returned, as for the intermediate
q, k, v of a model), for tilefuse and the anchors alike.
Usage: python bench/bench_neighborhood.py [--only na,ideal,swin] [--quick] [--cpu-time]

--cpu-time runs everything on one thread and times with the thread's CPU clock (min of N):
on a shared machine, wall-clock times of two-thread runs swing by 2-3x whenever another job
preempts one of the threads, while single-thread CPU time moves by a few percent. Results go
to neighborhood_cpu_1thread.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tilefuse  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402
from common import env_threads, machine_info, markdown_table, save  # noqa: E402

CPU_TIME = False


def timeit(fn, *, min_time=1.0, max_reps=20, warmup=1):
    """common.timeit, or with --cpu-time the same minimum over the thread's CPU clock."""
    if not CPU_TIME:
        return common.timeit(fn, min_time=min_time, max_reps=max_reps, warmup=warmup)
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 2):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return min(times)
from tilefuse.reference.neighborhood import na_window  # noqa: E402

HAS_NATTEN = importlib.util.find_spec("natten") is not None
NATTEN_MAX_TOKENS = 4096  # natten's CPU path (eager Flex) materialises all N^2 scores per head


def _t(x):
    return "n/a" if x is None else f"{x * 1e3:.2f}"


def timeit_alternating(fns, rounds=10, reps=5):
    """Minimum time of each of fns, measured in alternating rounds of `reps` calls (an int,
    or one count per function): on this shared host the load changes within seconds, and
    timing one function to completion before the next compared different loads (the Swin
    speedup moved by 1.3x between runs, a 2.5 ms forward read 2.6 and 4.0 ms in two runs)."""
    counts = reps if isinstance(reps, (list, tuple)) else [reps] * len(fns)
    best = [math.inf] * len(fns)
    for fn in fns:
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timeit(fn, min_time=math.inf, max_reps=counts[i], warmup=0))
    return best


def fwd_bwd(fn, inputs, grad_out):
    """Forward + backward as in a model: gradients returned by autograd.grad, not accumulated
    into existing ``.grad`` buffers (in a Swin / NAT block q, k, v are intermediate tensors,
    and optimizers reset parameter gradients to None), for tilefuse and the anchors alike."""
    return lambda: torch.autograd.grad(fn(), inputs, grad_out)


def gemm_rate():
    """fp32 GEMM rate of this machine (FLOP/s; torch.mm 1024^3, min of N), measured in the run:
    the FLOP-bound reference for the efficiency columns."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / timeit(lambda: torch.mm(a, b), max_reps=30)


def na_bool_mask(shape, kernel, dilation):
    """[N, N] boolean NA mask from the reference definition (row-major positions)."""
    r = len(shape)
    ks, ds = (kernel,) * r if isinstance(kernel, int) else kernel, (dilation,) * r if isinstance(dilation, int) else dilation
    grids = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    coords = [g.reshape(-1) for g in grids]
    ok = torch.ones(len(coords[0]), len(coords[0]), dtype=torch.bool)
    for a in range(r):
        s, e, g = na_window(shape[a], ks[a], ds[a])
        qi, kj = coords[a][:, None], coords[a][None, :]
        ok &= (g[qi] == g[kj]) & (kj // ds[a] >= s[qi]) & (kj // ds[a] < e[qi])
    return ok


def flex_block_mask(shape, kernel, dilation):
    from torch.nn.attention.flex_attention import create_block_mask

    r = len(shape)
    ks = (kernel,) * r if isinstance(kernel, int) else kernel
    ds = (dilation,) * r if isinstance(dilation, int) else dilation
    tables = [na_window(shape[a], ks[a], ds[a]) for a in range(r)]
    strides = [math.prod(shape[a + 1:]) for a in range(r)]

    def mask_mod(b, h, q_idx, kv_idx):
        ok = q_idx >= 0
        for a in range(r):
            qa = (q_idx // strides[a]) % shape[a]
            ka = (kv_idx // strides[a]) % shape[a]
            s, e, g = tables[a]
            kg = ka // ds[a]
            ok = ok & (g[qa] == g[ka]) & (kg >= s[qa]) & (kg < e[qa])
        return ok

    n = math.prod(shape)
    return create_block_mask(mask_mod, None, None, n, n, device="cpu", BLOCK_SIZE=64)


def section_na(rows, data, quick):
    cases = [((56, 56), 4, 32, 7, 1), ((32, 32), 4, 64, 7, 1), ((128, 128), 4, 32, 13, 1),
             ((128, 128), 4, 32, 13, 4), ((16, 32, 32), 4, 32, (3, 7, 7), 1)]
    if quick:
        cases = cases[:2]
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention)
    for shape, H, D, kernel, dil in cases:
        r = len(shape)
        n = math.prod(shape)
        na = getattr(tilefuse, f"na{r}d")
        name = f"na{r}d {'x'.join(map(str, shape))} H{H} D{D} k{kernel} d{dil}"
        q, k, v = (torch.randn(1, *shape, H, D) for _ in range(3))
        qh, kh, vh = (x.reshape(1, n, H, D).transpose(1, 2).contiguous() for x in (q, k, v))
        big = n > 8192
        reps = dict(max_reps=2, min_time=0.1) if big else {}
        t_tf = timeit(lambda: na(q, k, v, kernel, dil))
        mask = na_bool_mask(shape, kernel, dil)
        t_sdpa = timeit(lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), **reps)
        bm = flex_block_mask(shape, kernel, dil)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_flex = timeit(lambda: flex(qh, kh, vh, block_mask=bm), **reps)
        t_nat = None
        if HAS_NATTEN and n <= NATTEN_MAX_TOKENS:
            import natten

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_nat = timeit(lambda: getattr(natten, f"na{r}d")(q, k, v, kernel, dilation=dil),
                               max_reps=3)
        best = min(t_sdpa, t_flex)
        rows.append([name, "fwd", _t(t_tf), _t(t_sdpa), _t(t_flex), _t(t_nat), f"{best / t_tf:.1f}"])
        print(rows[-1], flush=True)
        # forward + backward: SDPA with the mask is the only anchor with a CPU backward.
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        qhg, khg, vhg = (x.clone().requires_grad_() for x in (qh, kh, vh))
        go = torch.randn(1, *shape, H, D)
        goh = go.reshape(1, n, H, D).transpose(1, 2).contiguous()
        t_tf_b = timeit(fwd_bwd(lambda: na(qg, kg, vg, kernel, dil), (qg, kg, vg), go), max_reps=5)
        t_sdpa_b = timeit(fwd_bwd(lambda: F.scaled_dot_product_attention(qhg, khg, vhg, attn_mask=mask),
                                  (qhg, khg, vhg), goh), max_reps=2, min_time=0.1)
        rows.append([name, "fwd+bwd", _t(t_tf_b), _t(t_sdpa_b), "no CPU bwd", "no CPU bwd",
                     f"{t_sdpa_b / t_tf_b:.1f}"])
        print(rows[-1], flush=True)
        data[name] = {"fwd": {"tilefuse": t_tf, "sdpa_mask": t_sdpa, "flex_compiled": t_flex,
                              "natten": t_nat},
                      "fwd+bwd": {"tilefuse": t_tf_b, "sdpa_mask": t_sdpa_b}}
        del mask, bm


def section_ideal(rows, data, quick, rate):
    # (label, shape, H, D, kernel, stride, kind): tilefuse against its own dense kernel.
    cases = [("sliding NA", (56, 56), 4, 32, 7, 1, "na"), ("blocked NA (stride = kernel)", (56, 56), 4, 32, 7, 7, "na"),
             ("Swin window, shift 3", (56, 56), 4, 32, 7, 3, "swin"),
             ("blocked NA (stride = kernel)", (64, 64), 4, 32, 8, 8, "na")]
    if not quick:
        cases.append(("sliding NA", (128, 128), 4, 32, 13, 1, "na"))
    # Local op and dense kernel in alternating rounds (40 and 2 calls per round): on this
    # shared host single calls swing by 1.5x and the load changes within seconds. The dense
    # reference of a shape is the minimum over every round of every case of that shape (the
    # same computation), so a slow round of the dense kernel cannot flatter a fraction.
    measured, dense = [], {}
    for label, shape, H, D, kernel, stride, kind in cases:
        n = math.prod(shape)
        q, k, v = (torch.randn(1, *shape, H, D) for _ in range(3))
        if kind == "na":
            local = lambda: tilefuse.na2d(q, k, v, kernel, stride=stride)  # noqa: E731
        else:
            local = lambda: tilefuse.window_attention(q, k, v, kernel, stride)  # noqa: E731
        qf, kf, vf = (x.reshape(1, n, H, D) for x in (q, k, v))
        t, td = timeit_alternating([local, lambda: tilefuse.attention(qf, kf, vf)], rounds=5, reps=[40, 2])
        dense[(shape, H, D)] = min(td, dense.get((shape, H, D), math.inf))
        measured.append(t)
        print(label, shape, f"local {t * 1e3:.2f} ms, dense {td * 1e3:.2f} ms", flush=True)
    for (label, shape, H, D, kernel, stride, kind), t in zip(cases, measured):
        n = math.prod(shape)
        td = dense[(shape, H, D)]
        if kind == "na":
            pairs = na_bool_mask(shape, kernel, 1).sum().item() if stride == 1 else n * kernel ** 2
        else:
            pairs = n * kernel ** 2  # windows tile the grid exactly (sizes are multiples)
        ideal = n * n / pairs
        # Efficiency: attended pairs x 4 D FLOP (QK^T and PV) per head over the fp32 GEMM rate.
        # fraction = local efficiency / dense efficiency, so the bar asks the local kernel for
        # bar x the dense kernel's efficiency.
        bar = 0.5 if stride == 1 and kind == "na" else 0.9
        eff_d = 4 * D * H * n * n / td / rate
        eff_l = 4 * D * H * pairs / t / rate
        name = f"{label} {'x'.join(map(str, shape))} k{kernel}"
        rows.append([name, _t(t), _t(td), f"{td / t:.1f}", f"{ideal:.1f}", f"{td / t / ideal:.2f}",
                     f"{bar}", f"{100 * eff_d:.0f} %", f"{100 * eff_l:.0f} %", f"{100 * bar * eff_d:.0f} %"])
        data[name] = {"tilefuse_s": t, "dense_s": td, "ideal": ideal, "bar": bar,
                      "dense_gemm_efficiency": eff_d, "local_gemm_efficiency": eff_l}
        print(rows[-1], flush=True)


def swin_recipe(x_q, x_k, x_v, rpb_table, rel_index, attn_mask, window, shift):
    """timm-style shifted-window attention on [B, H, W, heads, D]: roll, partition, SDPA with
    bias + shift mask, reverse, roll back (sizes are multiples of the window)."""
    B, Hh, Ww, nh, D = x_q.shape

    def part(x):
        x = torch.roll(x, (-shift, -shift), (1, 2))
        x = x.reshape(B, Hh // window, window, Ww // window, window, nh, D).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(-1, nh, window * window, D)

    bias = rpb_table[rel_index.reshape(-1)].reshape(window * window, window * window, nh).permute(2, 0, 1)
    nw = attn_mask.shape[0]
    mask = (bias.unsqueeze(0) + attn_mask.unsqueeze(1)).repeat(B, 1, 1, 1)
    o = F.scaled_dot_product_attention(part(x_q), part(x_k), part(x_v), attn_mask=mask)
    o = o.reshape(B, Hh // window, Ww // window, nh, window, window, D).permute(0, 1, 4, 2, 5, 3, 6)
    o = o.reshape(B, Hh, Ww, nh, D)
    assert nw == (Hh // window) * (Ww // window)
    return torch.roll(o, (shift, shift), (1, 2))


def swin_shift_mask(size, window, shift):
    img = torch.zeros(size, size)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[hs, ws] = cnt
            cnt += 1
    win = img.reshape(size // window, window, size // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    m = win.unsqueeze(1) - win.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def section_swin(rows, data, quick, rate):
    from tilefuse.reference.neighborhood import swin_relative_position_index

    size, window, shift, nh, D = 56, 7, 3, 3, 32
    q, k, v = (torch.randn(1, size, size, nh, D, requires_grad=True) for _ in range(3))
    rpb = torch.randn((2 * window - 1) ** 2, nh, requires_grad=True)
    rel = swin_relative_position_index((window, window))
    amask = swin_shift_mask(size, window, shift)
    go = torch.randn(1, size, size, nh, D)
    ref = swin_recipe(q, k, v, rpb, rel, amask, window, shift)
    out = tilefuse.window_attention(q, k, v, window, shift, rpb=rpb)
    err = (ref - out).abs().max().item()
    with torch.no_grad():
        t_tf, t_ref = timeit_alternating([lambda: tilefuse.window_attention(q, k, v, window, shift, rpb=rpb),
                                          lambda: swin_recipe(q, k, v, rpb, rel, amask, window, shift)])
    ins = (q, k, v, rpb)
    # The same with .backward() into the leaves' existing .grad (the table of sessions <= 6):
    # both sides then also pay three in-place adds of 1.2 MB gradients per step.
    t_tf_b, t_ref_b, t_tf_a, t_ref_a = timeit_alternating(
        [fwd_bwd(lambda: tilefuse.window_attention(q, k, v, window, shift, rpb=rpb), ins, go),
         fwd_bwd(lambda: swin_recipe(q, k, v, rpb, rel, amask, window, shift), ins, go),
         lambda: tilefuse.window_attention(q, k, v, window, shift, rpb=rpb).backward(go),
         lambda: swin_recipe(q, k, v, rpb, rel, amask, window, shift).backward(go)])
    # FLOP-bound times at the fp32 GEMM rate: forward QK^T + PV, backward five GEMMs of the
    # same size (S recomputed, dV, dP, dQ, dK), 2 D FLOP per attended pair each.
    pairs = nh * size * size * window * window
    floor_f, floor_b = 4 * D * pairs / rate, 14 * D * pairs / rate
    name = f"Swin {size}x{size} w{window} s{shift} H{nh} D{D} rpb"
    rows.append([name, "fwd", _t(t_tf), _t(t_ref), f"{t_ref / t_tf:.1f}", _t(floor_f),
                 f"{100 * floor_f / t_tf:.0f} %"])
    rows.append([name, "fwd+bwd", _t(t_tf_b), _t(t_ref_b), f"{t_ref_b / t_tf_b:.1f}", _t(floor_b),
                 f"{100 * floor_b / t_tf_b:.0f} %"])
    rows.append([name, "fwd+bwd, .backward() into .grad", _t(t_tf_a), _t(t_ref_a), f"{t_ref_a / t_tf_a:.1f}",
                 _t(floor_b), f"{100 * floor_b / t_tf_a:.0f} %"])
    print(*rows[-3:], f"max abs diff vs recipe {err:.2e}", sep="\n", flush=True)
    data[name] = {"fwd": {"tilefuse": t_tf, "recipe": t_ref, "flop_floor": floor_f},
                  "fwd+bwd": {"tilefuse": t_tf_b, "recipe": t_ref_b, "flop_floor": floor_b},
                  "fwd+bwd_accumulate": {"tilefuse": t_tf_a, "recipe": t_ref_a}, "max_abs_diff": err}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="na,ideal,swin")
    ap.add_argument("--quick", action="store_true", help="small cases only (smoke test)")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, CPU-clock timing")
    args = ap.parse_args()
    global CPU_TIME
    CPU_TIME = args.cpu_time
    env_threads()
    if CPU_TIME:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    only = set(args.only.split(","))
    info = machine_info()
    clock = "one thread, CPU time of the thread" if CPU_TIME else f"{torch.get_num_threads()} threads, wall clock"
    text = ["# Neighborhood and window attention on CPU", "", str(info), "", f"Timing: {clock}, min of N.", ""]
    data = {"machine": info}
    rate = None
    if only & {"ideal", "swin"}:
        rate = gemm_rate()
        data["gemm_fp32_flops"] = rate
        text += [f"fp32 GEMM rate (torch.mm 1024^3, same run): {rate / 1e9:.0f} GFLOP/s", ""]
    if "na" in only:
        rows = []
        section_na(rows, data, args.quick)
        text += ["## NA against the anchors (fp32, B=1; ms, min of N; speedup = best anchor / tilefuse)", "",
                 markdown_table(["case", "pass", "tilefuse", "SDPA + bool mask", "Flex compiled",
                                 "natten 0.21 (eager Flex)", "speedup"], rows), ""]
    if "ideal" in only:
        rows = []
        section_ideal(rows, data, args.quick, rate)
        text += ["## Fraction of the ideal speedup over tilefuse dense attention (forward, fp32)", "",
                 "Efficiency: 4 D FLOP per attended pair and head over the fp32 GEMM rate; fraction =",
                 "local efficiency / dense efficiency, so the bar needs bar x the dense efficiency.", "",
                 markdown_table(["case", "ms", "dense ms", "speedup", "ideal", "fraction", "bar",
                                 "dense eff.", "local eff.", "local eff. for the bar"], rows), ""]
    if "swin" in only:
        rows = []
        section_swin(rows, data, args.quick, rate)
        text += ["## Swin block attention against roll + partition + SDPA (bias + shift mask)", "",
                 "fwd+bwd: torch.autograd.grad of q, k, v, rpb (no accumulation into .grad); FLOP floor:",
                 "the GEMMs at the fp32 GEMM rate (forward 2, backward 5 per window and head).", "",
                 markdown_table(["case", "pass", "tilefuse ms", "recipe ms", "speedup", "FLOP floor ms",
                                 "floor / tilefuse"], rows), ""]
    out = "\n".join(text)
    print(out)
    if not args.quick:
        print("saved", save("neighborhood_cpu_1thread" if CPU_TIME else "neighborhood_cpu", out, data))


if __name__ == "__main__":
    main()
