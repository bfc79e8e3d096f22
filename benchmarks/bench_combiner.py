"""Combiner-Fixed on CPU: ``stdlib:combiner`` (its own block and the earlier blocks' max summaries in one softmax:
two branches merged by their log-sum-exps) against the code's dense formulation in torch (every query against
every key and every summary, one masked softmax over the n + n / block columns, as google-research's
``_SelfAttSqrtn`` computes it in JAX), the same rule from three plain attnc calls (the docs/seeds.md recipe) and
SDPA's plain causal attention at the same size; forward and forward + backward (recorded, not a timed test).

    python benchmarks/bench_combiner.py [--quick] [--t 2048,4096] [--heads 8] [--dim 64] [--block 64]
                                        [--repeat 3] [--out FILE.md]

fp32, batch 1; interleaved rounds after a warm-up, the median; attnc's output checked against the dense form's
first. Cost on a 2-core CPU (2026-11-26): ``--quick`` (T = 1,024) about 10 s; the full run (T = 2,048, 4,096)
about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_flex import emit, interleaved  # noqa: E402
from bench_landmark import step  # noqa: E402

import attnc  # noqa: E402

LOCAL = "pattern own_block(L >= 1 = 128)\n  tokens seq\n  mask causal and q // L == k // L"
SUMMARY = "pattern block_summary(L >= 1 = 128)\n  queries seq\n  keys seq\n  mask k // L == q"
EARLIER = "pattern earlier_blocks(L >= 1 = 128)\n  queries seq\n  keys seq\n  mask k < q // L"


def summaries(q, k, v, block: int):
    """The blocks' max keys and their attention by their max queries (T a multiple of ``block``)."""
    B, H, T, d = q.shape
    runs = lambda x: x.view(B, H, T // block, block, d)  # noqa: E731
    qmax, kr, vr = runs(q).amax(3), runs(k), runs(v)
    w = torch.softmax(torch.einsum("bhrd,bhrsd->bhrs", qmax, kr) / d ** 0.5, -1)
    return kr.amax(3), torch.einsum("bhrs,bhrsd->bhrd", w, vr)


def combiner_dense(q, k, v, block: int) -> torch.Tensor:
    """One masked softmax over every key and every summary (T x (T + T / block) scores)."""
    T, d = q.shape[2], q.shape[3]
    sk, sv = summaries(q, k, v, block)
    pos, run = torch.arange(T), torch.arange(T // block)
    own = (pos[None] <= pos[:, None]) & (pos[None] // block == pos[:, None] // block)
    earlier = run[None] < pos[:, None] // block
    s = torch.cat([q @ k.transpose(-1, -2), q @ sk.transpose(-1, -2)], -1) / d ** 0.5
    p = torch.softmax(s.masked_fill(~torch.cat([own, earlier], -1), float("-inf")), -1)
    return p @ torch.cat([v, sv], -2)


def three_calls(block: int):
    """The docs/seeds.md recipe: the own block, the summaries' values and the earlier summaries, merged."""
    local, summary, earlier = (attnc.compile_attention(s, L=block, backend="cpu") for s in (LOCAL, SUMMARY, EARLIER))

    def run(q, k, v):
        B, H, T, d = q.shape
        values = summary(q.view(B, H, T // block, block, d).amax(3), k, v)
        o1, lse1 = local(q, k, v, return_lse=True)
        o2, lse2 = earlier(q, k.view(B, H, T // block, block, d).amax(3), values, return_lse=True)
        lse = torch.logaddexp(lse1, lse2)
        return (lse1 - lse).exp()[..., None] * o1 + (lse2 - lse).exp()[..., None] * o2
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T = 1,024")
    ap.add_argument("--t", default=None, help="sequence lengths, comma-separated (default 2048,4096)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lengths = [int(t) for t in args.t.split(",")] if args.t else [1024] if args.quick else [2048, 4096]
    attn = attnc.compile_attention("stdlib:combiner", block=args.block)
    fns = {"attnc": attn, "dense": lambda q, k, v: combiner_dense(q, k, v, args.block),
           "recipe": three_calls(args.block),
           "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)}
    lines = [f"# Combiner-Fixed on CPU: attnc against the dense formulation, the three-call recipe and SDPA "
             f"({datetime.date.today()})", "",
             f"- {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 1, "
             f"{args.heads} heads, d {args.dim}, blocks of {args.block}, fp32; attnc's auto backend; median of "
             f"{args.repeat} interleaved rounds after a warm-up",
             f"- `python benchmarks/bench_combiner.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| T | pass | attnc ms | dense ms | three calls ms | SDPA causal ms | attnc / dense | attnc / three "
             "calls | attnc / SDPA | max abs diff |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for T in lengths:
        T -= T % args.block
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, T, args.dim, generator=g) for _ in range(3))
        with torch.no_grad():
            diff = float((attn(q, k, v) - combiner_dense(q, k, v, args.block)).abs().max())
        for backward in (False, True):
            times = interleaved({name: step(fn, q, k, v, backward) for name, fn in fns.items()}, args.repeat)
            a, b, c, s = (statistics.median(times[n]) * 1e3 for n in ("attnc", "dense", "recipe", "sdpa"))
            lines.append(f"| {T:,} | {'forward + backward' if backward else 'forward'} | {a:,.1f} | {b:,.1f} | "
                         f"{c:,.1f} | {s:,.1f} | {a / b:.2f} | {a / c:.2f} | {a / s:.2f} | {diff:.1e} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
