# SPDX-License-Identifier: Apache-2.0
"""The CUDA backend against its anchors, measured in one run (the targets of the CUDA issue).

Sections (default --device cuda; CUDA-event timing, min of N):
  attention  dense forward fp16/bf16, B=4 H=16 D=64/128 S=4096, against torch SDPA forced to
             its flash backend (target: tilefuse >= 0.7x SDPA)
  ideal      blocked NA (stride = kernel) and Swin windows: fraction of the ideal speedup over
             our own dense kernel on the same tokens (target >= 0.8)
  int8       int8_linear at M = N = K = 4096 against bf16 torch.matmul (target >= 1.6x)
  gemv4      4-bit GEMV (NF4, int4), M = 1, K = N = 4096 against bf16 matmul (target >= 3x)
Saves bench/results/cuda.{md,json} with the device name and versions. `--device cpu --quick`
runs the same code paths on the CPU at small sizes (a smoke test of this script only).
Usage: python bench/bench_cuda.py [--device cuda] [--only attention,ideal,int8,gemv4] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import tilefuse  # noqa: E402
from common import machine_info, markdown_table, save  # noqa: E402


def timeit(fn, device, reps=20, warmup=3):
    """Minimum time of fn() in seconds (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def flash_only(device):
    if device != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def section_attention(rows, data, dev, quick):
    B, H, S = (1, 2, 256) if quick else (4, 16, 4096)
    for D in (64, 128):
        for dt in (torch.float16, torch.bfloat16):
            for causal in (False, True):
                q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dt) for _ in range(3))
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                fl = 4.0 * B * H * S * S * D / (2 if causal else 1)
                t_tf = timeit(lambda: tilefuse.attention(q, k, v, causal=causal), dev)
                with flash_only(dev):
                    t_sd = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt,
                                                                         is_causal=causal), dev)
                name = f"fwd D={D} {str(dt).split('.')[-1]}{' causal' if causal else ''}"
                rows.append([name, f"{t_tf*1e3:.3f}", f"{fl/t_tf/1e12:.1f}", f"{t_sd*1e3:.3f}",
                             f"{fl/t_sd/1e12:.1f}", f"{t_sd/t_tf:.2f}"])
                data[name] = {"tilefuse_s": t_tf, "sdpa_flash_s": t_sd, "flops": fl}
                print(rows[-1], flush=True)


def section_ideal(rows, data, dev, quick):
    n, k, heads, D = (16, 4, 2, 32) if quick else (64, 8, 8, 64)
    B = 1 if quick else 8
    q, kk, v = (torch.randn(B, n, n, heads, D, device=dev, dtype=torch.float16) for _ in range(3))
    flat = [x.reshape(B, n * n, heads, D) for x in (q, kk, v)]
    t_dense = timeit(lambda: tilefuse.attention(*flat), dev)
    ideal = (n * n) / (k * k)
    cases = {
        f"blocked NA {n}x{n} k{k}": lambda: tilefuse.na2d(q, kk, v, k, stride=k),
        f"Swin {n}x{n} w{k} s{k // 2}": lambda: tilefuse.window_attention(q, kk, v, k, k // 2),
    }
    for name, fn in cases.items():
        t = timeit(fn, dev)
        rows.append([name, f"{t*1e3:.3f}", f"{t_dense*1e3:.3f}", f"{t_dense/t:.1f}", f"{ideal:.1f}",
                     f"{t_dense/t/ideal:.2f}"])
        data[name] = {"tilefuse_s": t, "dense_s": t_dense, "ideal": ideal}
        print(rows[-1], flush=True)


def section_int8(rows, data, dev, quick):
    M = N = K = 256 if quick else 4096
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
    qw, sc = tilefuse.quantize_int8(w)
    t_bf = timeit(lambda: x @ w.t(), dev)
    t_i8 = timeit(lambda: tilefuse.int8_linear(x, qw, sc), dev)
    fl = 2.0 * M * N * K
    name = f"int8_linear M=N=K={M} (bf16 in/out)"
    rows.append([name, f"{t_i8*1e3:.3f}", f"{fl/t_i8/1e12:.1f}", f"{t_bf*1e3:.3f}",
                 f"{fl/t_bf/1e12:.1f}", f"{t_bf/t_i8:.2f}"])
    data[name] = {"tilefuse_s": t_i8, "bf16_matmul_s": t_bf, "flops": fl}
    print(rows[-1], flush=True)


def section_gemv4(rows, data, dev, quick):
    N = K = 512 if quick else 4096
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    # Eight weight sets, rotated, so the weights are not served from L2 (50 MB on an H100).
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(8)]
    it = iter(range(10**9))
    t_bf = timeit(lambda: x @ ws[next(it) % 8].t(), dev)
    for fmt in ("nf4", "int4"):
        qs = [tilefuse.quantize_4bit(w, fmt) for w in ws]
        it = iter(range(10**9))
        t4 = timeit(lambda: tilefuse.linear_4bit(x, *qs[next(it) % 8]), dev)
        name = f"linear_4bit {fmt} M=1 N=K={N}"
        gbs = (N * K / 2) / t4 / 1e9
        rows.append([name, f"{t4*1e3:.4f}", f"{gbs:.0f} GB/s", f"{t_bf*1e3:.4f}",
                     f"{2*N*K/t_bf/1e9:.0f} GB/s", f"{t_bf/t4:.2f}"])
        data[name] = {"tilefuse_s": t4, "bf16_matmul_s": t_bf}
        print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="attention,ideal,int8,gemv4")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_cuda: no CUDA device here (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    only = set(args.only.split(","))
    info = machine_info()
    if dev == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    data = {"machine": info, "device": dev}
    text = [f"# CUDA backend ({dev})\n\n{json.dumps(info)}\n"]
    sections = [
        ("attention", section_attention, "dense attention forward vs SDPA flash (target >= 0.7)",
         ["case", "tilefuse ms", "TFLOP/s", "SDPA flash ms", "TFLOP/s", "tilefuse / SDPA speed"]),
        ("ideal", section_ideal, "fraction of the ideal speedup over our dense kernel (target >= 0.8)",
         ["case", "ms", "dense ms", "speedup", "ideal", "fraction"]),
        ("int8", section_int8, "int8 GEMM vs bf16 matmul (target >= 1.6)",
         ["case", "tilefuse ms", "TOP/s", "bf16 matmul ms", "TFLOP/s", "speedup"]),
        ("gemv4", section_gemv4, "4-bit GEMV vs bf16 matmul, cold weights (target >= 3)",
         ["case", "tilefuse ms", "weight bytes/s", "bf16 ms", "weight bytes/s", "speedup"]),
    ]
    for key, fn, title, headers in sections:
        if key in only:
            rows = []
            fn(rows, data, dev, args.quick)
            text += [f"## {title}\n", markdown_table(headers, rows), ""]
    name = "cuda" if dev == "cuda" else f"cuda_script_smoke_{dev}"
    if dev != "cuda":  # a smoke run must not overwrite or pose as GPU results
        print("\n".join(text))
        return
    print(f"saved {save(name, chr(10).join(text), data)}")


if __name__ == "__main__":
    main()
