# SPDX-License-Identifier: Apache-2.0
"""Fused attention on CPU against torch SDPA (its CPU flash kernel), measured in one run.

Prints a table, saves bench/results/attention_cpu.{md,json} and a PNG plot. Sections:
  sdpa     fp32 B=1 H=8 D=64 S=4096: forward and forward+backward, causal and not
  bf16     the same in bf16 inputs against our fp32 time (target: within 1.3x)
  window   sliding window (256, 256) at S=16384 against our own dense kernel
  memory   peak resident memory of forward+backward at S=32768 (subprocess)
Usage: python bench/bench_attention.py [--only sdpa,bf16,window,memory] [--seq 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import tilefuse  # noqa: E402
from common import env_threads, machine_info, markdown_table, save, timeit  # noqa: E402


def attn_flops(B, H, Sq, Sk, D, causal):
    f = 4.0 * B * H * Sq * Sk * D
    return f / 2 if causal else f


def _inputs(B, S, H, D, dtype, grad=False):
    q, k, v = (torch.randn(B, S, H, D).to(dtype).requires_grad_(grad) for _ in range(3))
    return q, k, v


def _heads_first(*xs):
    return [x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in xs]


def section_sdpa(rows, data, S, H=8, D=64, B=1):
    for causal in (False, True):
        fl = attn_flops(B, H, S, S, D, causal)
        q, k, v = _inputs(B, S, H, D, torch.float32)
        qt, kt, vt = _heads_first(q, k, v)
        t_tf = timeit(lambda: tilefuse.attention(q, k, v, causal=causal))
        t_sd = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
        name = f"fwd fp32 S={S}{' causal' if causal else ''}"
        rows.append([name, f"{t_tf*1e3:.1f}", f"{fl/t_tf/1e9:.0f}", f"{t_sd*1e3:.1f}",
                     f"{fl/t_sd/1e9:.0f}", f"{t_sd/t_tf:.2f}"])
        data[name] = {"tilefuse_s": t_tf, "sdpa_s": t_sd, "flops": fl}

        q, k, v = _inputs(B, S, H, D, torch.float32, grad=True)
        qt, kt, vt = _heads_first(q, k, v)
        go = torch.randn(B, S, H, D)
        got = go.transpose(1, 2).contiguous()
        t_tf = timeit(lambda: tilefuse.attention(q, k, v, causal=causal).backward(go), max_reps=5)
        t_sd = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).backward(got),
                      max_reps=5)
        name = f"fwd+bwd fp32 S={S}{' causal' if causal else ''}"
        rows.append([name, f"{t_tf*1e3:.1f}", f"{3.5*fl/t_tf/1e9:.0f}", f"{t_sd*1e3:.1f}",
                     f"{3.5*fl/t_sd/1e9:.0f}", f"{t_sd/t_tf:.2f}"])
        data[name] = {"tilefuse_s": t_tf, "sdpa_s": t_sd, "flops": 3.5 * fl}
        print(rows[-2], rows[-1], sep="\n", flush=True)


def section_bf16(rows, data, S, H=8, D=64, B=1):
    for causal in (False, True):
        for grad in (False, True):
            times = {}
            for dt in (torch.float32, torch.bfloat16):
                q, k, v = _inputs(B, S, H, D, dt, grad=grad)
                if grad:
                    go = torch.randn(B, S, H, D).to(dt)
                    fn = lambda: tilefuse.attention(q, k, v, causal=causal).backward(go)  # noqa: E731
                else:
                    fn = lambda: tilefuse.attention(q, k, v, causal=causal)  # noqa: E731
                times[dt] = timeit(fn, max_reps=5 if grad else 20)
            name = f"{'fwd+bwd' if grad else 'fwd'} S={S}{' causal' if causal else ''}"
            ratio = times[torch.bfloat16] / times[torch.float32]
            rows.append([name, f"{times[torch.float32]*1e3:.1f}", f"{times[torch.bfloat16]*1e3:.1f}",
                         f"{ratio:.2f}"])
            data[f"bf16 {name}"] = {"fp32_s": times[torch.float32], "bf16_s": times[torch.bfloat16]}
            print(rows[-1], flush=True)


def section_window(rows, data, S=16384, H=8, D=64, w=256):
    i = torch.arange(S)
    pairs = int(((i[None, :] - i[:, None]).abs() <= w).sum())
    ideal = S * S / pairs
    for grad in (False, True):
        q, k, v = _inputs(1, S, H, D, torch.float32, grad=grad)
        go = torch.randn(1, S, H, D)

        def run(window):
            out = tilefuse.attention(q, k, v, window=window)
            if grad:
                out.backward(go)

        # The denominator of the fraction: the fastest of two runs (one run swung by 15% here).
        t_dense = timeit(lambda: run(None), max_reps=2, warmup=0, min_time=0)
        t_win = timeit(lambda: run((w, w)), max_reps=5)
        speedup = t_dense / t_win
        name = f"{'fwd+bwd' if grad else 'fwd'} S={S} window=({w},{w})"
        rows.append([name, f"{t_dense*1e3:.0f}", f"{t_win*1e3:.1f}", f"{speedup:.1f}",
                     f"{ideal:.1f}", f"{speedup/ideal:.2f}"])
        data[name] = {"dense_s": t_dense, "window_s": t_win, "ideal_speedup": ideal}
        print(rows[-1], flush=True)


MEMORY_CHILD = r"""
import sys, json, torch, tilefuse


def hwm_mib():
    # VmHWM: this process's peak resident set. (ru_maxrss would carry the parent's peak
    # across fork + exec.)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024


S, H, D = int(sys.argv[1]), 8, 64
q, k, v = (torch.randn(1, S, H, D, requires_grad=True) for _ in range(3))
go = torch.randn(1, S, H, D)
base = hwm_mib()
out = tilefuse.attention(q, k, v, causal=sys.argv[2] == "causal")
out.backward(go)
peak = hwm_mib()
print(json.dumps({"baseline_MiB": base, "peak_MiB": peak, "extra_MiB": peak - base}))
"""


def section_memory(rows, data, S=32768):
    for mode in ("causal", "dense"):
        res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(S), mode],
                             capture_output=True, text=True, check=True)
        m = json.loads(res.stdout.strip().splitlines()[-1])
        name = f"fwd+bwd S={S} H=8 D=64 {mode}"
        rows.append([name, f"{m['peak_MiB']:.0f}", f"{m['baseline_MiB']:.0f}", f"{m['extra_MiB']:.0f}",
                     f"{S*S*8*4/2**30:.0f} GiB"])
        data[name] = m
        print(rows[-1], flush=True)


def plot(sdpa_rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    names = [r[0] for r in sdpa_rows]
    ours = [float(r[2]) for r in sdpa_rows]
    theirs = [float(r[4]) for r in sdpa_rows]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="tilefuse")
    ax.bar([i + 0.2 for i in x], theirs, 0.4, label="torch SDPA (flash, CPU)")
    ax.axhline(180, color="gray", ls="--", lw=1, label="fp32 GEMM peak (~180)")
    ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("GFLOP/s")
    ax.set_title("Fused attention on CPU, B=1 H=8 D=64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="sdpa,bf16,window,memory")
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args()
    env_threads()
    torch.manual_seed(0)
    only = set(args.only.split(","))
    info = machine_info()
    data = {"machine": info}
    text = [f"# Fused attention on CPU\n\n{json.dumps(info)}\n"]
    if "sdpa" in only:
        rows = []
        section_sdpa(rows, data, args.seq)
        text += ["## vs torch SDPA (fp32, B=1 H=8 D=64; fwd+bwd FLOPs = 3.5x fwd)\n",
                 markdown_table(["case", "tilefuse ms", "GFLOP/s", "SDPA ms", "GFLOP/s",
                                 "speedup vs SDPA"], rows), ""]
        plot(rows, __import__("common").RESULTS / "attention_cpu.png")
    if "bf16" in only:
        rows = []
        section_bf16(rows, data, args.seq)
        text += ["## bf16 inputs against fp32 inputs (tilefuse; target ratio <= 1.3)\n",
                 markdown_table(["case", "fp32 ms", "bf16 ms", "bf16/fp32"], rows), ""]
    if "window" in only:
        rows = []
        section_window(rows, data)
        text += ["## sliding window against our dense kernel (ideal = dense pairs / window pairs)\n",
                 markdown_table(["case", "dense ms", "window ms", "speedup", "ideal",
                                 "fraction of ideal"], rows), ""]
    if "memory" in only:
        rows = []
        section_memory(rows, data)
        text += ["## peak memory, forward+backward (VmHWM of a fresh process)\n",
                 markdown_table(["case", "peak MiB", "after inputs MiB", "added by fwd+bwd MiB",
                                 "dense fp32 S x S scores, 8 heads"], rows), ""]
    out = "\n".join(text)
    print(out)
    print(f"saved {save('attention_cpu', out, data)}")


if __name__ == "__main__":
    main()
