# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the benchmark scripts: timing, tables, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, *, min_time=1.0, max_reps=20, warmup=1):
    """Minimum wall time of fn() over repetitions (after warm-up). The minimum, not the mean,
    because this 2-core machine is shared and noise only ever adds time."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 2):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import tilefuse

    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tilefuse": tilefuse.__version__,
        "tilefuse_cpu_tier": tilefuse.cpu_isa(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def save(name: str, text: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    md = RESULTS / f"{name}.md"
    md.write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return md


def env_threads():
    n = int(os.environ.get("TILEFUSE_BENCH_THREADS", "0"))
    if n > 0:
        torch.set_num_threads(n)
