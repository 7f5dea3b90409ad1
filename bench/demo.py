# SPDX-License-Identifier: Apache-2.0
"""`make demo`: tilefuse.attention next to torch's SDPA on this machine, numbers and speed.

(A later issue turns this into the model-conversion demo.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tilefuse  # noqa: E402
from common import timeit  # noqa: E402


def main():
    torch.manual_seed(0)
    B, S, H, D = 1, 2048, 8, 64
    print(f"tilefuse {tilefuse.__version__}, CPU tier {tilefuse.cpu_isa()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"shape q/k/v [B={B}, S={S}, H={H}, D={D}] (heads-last)\n")
    print(f"{'case':34s} {'tilefuse':>10s} {'SDPA':>10s} {'speedup':>8s} {'max |diff|':>11s}")
    for causal in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(B, S, H, D).to(dtype).requires_grad_() for _ in range(3))
            qt, kt, vt = (x.detach().float().transpose(1, 2).contiguous().requires_grad_()
                          for x in (q, k, v))
            go = torch.randn(B, S, H, D)
            out = tilefuse.attention(q, k, v, causal=causal)
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
            diff = (out.float() - ref).abs().max().item()
            t_tf = timeit(lambda: tilefuse.attention(q, k, v, causal=causal).backward(go.to(dtype)),
                          max_reps=3)
            # SDPA gets fp32 inputs: its bf16 CPU path is not the anchor we compare against.
            t_sd = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                          .backward(go.transpose(1, 2)), max_reps=3)
            name = f"fwd+bwd {'causal' if causal else 'dense '} {str(dtype).split('.')[-1]}"
            print(f"{name:34s} {t_tf*1e3:8.1f}ms {t_sd*1e3:8.1f}ms {t_sd/t_tf:7.2f}x {diff:11.2e}")
    print("\n(SDPA runs in fp32 in every row; the bf16 rows show tilefuse's bf16 path, which "
          "widens to fp32 inside the kernel.)")
    q, k, v = (torch.randn(1, 16384, 8, 64) for _ in range(3))
    t_d = timeit(lambda: tilefuse.attention(q, k, v), max_reps=1, warmup=0)
    t_w = timeit(lambda: tilefuse.attention(q, k, v, window=(256, 256)), max_reps=3)
    print(f"\nsliding window (256, 256) at S=16384: {t_w*1e3:.0f} ms vs dense {t_d*1e3:.0f} ms "
          f"({t_d/t_w:.1f}x faster; {16384/513:.1f}x fewer attended pairs)")


if __name__ == "__main__":
    main()
