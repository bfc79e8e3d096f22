"""Deformable attention (D2ST-Adapter's form): sampled keys + SDPA against sampled keys + attnc's
compiled cross-attention, on CPU (recorded, not a timed test).

    python benchmarks/bench_deformable.py [--quick] [--batch 4] [--dim 192] [--heads 4] [--repeat 5] [--out FILE.md]

Cost on a 2-core CPU: ``--quick`` (batch 1, 3 rounds) took 21 s wall (12 s CPU, 2026-11-25, load
average 8 from other jobs); the full run took 10 s wall (10 s CPU, load average 7): already quick.

The module of docs/examples/deformable_attention.py on a [B, C, 8, 14, 14] clip (ViT-B/16 patches of
8 frames), three reference grids: D2ST's spatial path (kernel (4, 4, 4), stride (4, 3, 3): 32 keys),
its temporal path (kernel (1, 7, 7), stride (1, 7, 7): 32 keys) and a denser grid (kernel and stride
(2, 2, 2): 196 keys). Timed: the attention alone (q, k, v given) and the whole module's training step
(forward + backward, sampling and projections included); fp32; interleaved rounds, the median. The
two modules share their weights and their outputs are compared before timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "docs", "examples"))
from bench_flex import emit, interleaved  # noqa: E402
from deformable_attention import DeformableAttention3D  # noqa: E402

GRIDS = {"spatial (32 keys)": ((4, 4, 4), (4, 3, 3)), "temporal (32 keys)": ((1, 7, 7), (1, 7, 7)),
         "dense (196 keys)": ((2, 2, 2), (2, 2, 2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1, 3 rounds (unless given)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (--quick 1)")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=None, help="default 5 (--quick 3)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.batch = args.batch or (1 if args.quick else 4)
    args.repeat = args.repeat or (3 if args.quick else 5)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.dim, 8, 14, 14)
    rows = []
    for grid, (kernel, stride) in GRIDS.items():
        mods = {"sdpa": DeformableAttention3D(args.dim, args.heads, args.heads, kernel, stride)}
        mods["attnc"] = DeformableAttention3D(args.dim, args.heads, args.heads, kernel, stride, attention="attnc")
        mods["attnc"].load_state_dict(mods["sdpa"].state_dict())
        with torch.no_grad():
            err = (mods["sdpa"](x) - mods["attnc"](x)).abs().max().item()
        hd = args.dim // args.heads
        m = mods["sdpa"].sample_points(mods["sdpa"].proj_q(x)).shape[1:4].numel()
        q = torch.randn(args.batch, args.heads, 8 * 14 * 14, hd)
        k, v = torch.randn(2, args.batch, args.heads, m, hd).unbind(0)
        attend = {"sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                  "attnc": lambda q=q, k=k, v=v, attn=mods["attnc"].attn: attn(q, k, v)}

        def step(mod):
            def run():
                mod.zero_grad(set_to_none=True)
                mod(x).square().mean().backward()
            return run

        with torch.no_grad():
            t_attn = interleaved(attend, args.repeat)
        t_step = interleaved({name: step(mod) for name, mod in mods.items()}, args.repeat)
        med = lambda t: {n: statistics.median(v) for n, v in t.items()}  # noqa: E731
        a, s = med(t_attn), med(t_step)
        rows.append((grid, m, a["sdpa"], a["attnc"], s["sdpa"], s["attnc"], err))
        print(grid, a, s, file=sys.stderr)
    lines = [f"# Deformable attention on CPU: sampled keys + SDPA against sampled keys + attnc, {datetime.date.today()}",
             "", f"- command: `python benchmarks/bench_deformable.py {' '.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}); "
             f"python {platform.python_version()}, torch {torch.__version__}",
             f"- fp32, batch {args.batch}, {args.dim} channels, {args.heads} heads, 8 x 14 x 14 = 1,568 queries; "
             f"median of {args.repeat} interleaved rounds", "",
             "| reference grid | keys | attention: SDPA (ms) | attention: attnc (ms) | attnc / SDPA "
             "| module training step: SDPA (ms) | attnc (ms) | attnc / SDPA | max abs difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for grid, m, a_s, a_a, s_s, s_a, err in rows:
        lines.append(f"| {grid} | {m} | {a_s * 1e3:.2f} | {a_a * 1e3:.2f} | {a_a / a_s:.2f}x | {s_s * 1e3:.1f} | "
                     f"{s_a * 1e3:.1f} | {s_a / s_s:.2f}x | {err:.1e} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
