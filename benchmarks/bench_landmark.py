"""Landmark Attention's grouped softmax on CPU: ``stdlib:landmark`` (one softmax with the landmark gates as a bias,
the gates a table made from q and k) against the grouped softmax written densely in torch, as the authors' torch
paths compute it (every score, a softmax over the own block and the landmarks, a softmax within every block),
and against SDPA's plain causal attention at the same size; forward and forward + backward (recorded, not a
timed test).

    python benchmarks/bench_landmark.py [--quick] [--t 2048,4096] [--heads 8] [--dim 64] [--block 64]
                                        [--repeat 3] [--out FILE.md]

fp32, batch 1; interleaved rounds after a warm-up, the median; attnc's output checked against the dense form's
first. Cost on a 2-core CPU (2026-11-26): ``--quick`` (T = 1,024) about 15 s; the full run (T = 2,048, 4,096)
about 2 minutes.
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

import attnc  # noqa: E402


def grouped_dense(q, k, v, block: int) -> torch.Tensor:
    """The grouped softmax over every score (n x n): the landmark last in each block of ``block`` tokens."""
    n, d = q.shape[2], q.shape[3]
    pos = torch.arange(n)
    landmark, blk = pos % block == block - 1, pos // block
    s = q @ k.transpose(-1, -2) / d ** 0.5
    direct = (pos[None] <= pos[:, None]) & (blk[None] == blk[:, None]) & ~landmark[None]
    gate = (blk[None] < blk[:, None]) & landmark[None]
    p = torch.softmax(s.masked_fill(~(direct | gate), float("-inf")), -1).nan_to_num(0.0)
    whole = n // block
    inner = torch.softmax(s[..., :whole * block].unflatten(-1, (whole, block))[..., :-1], -1)
    members = p[..., block - 1:whole * block:block, None] * inner  # the landmark's probability, shared
    weights = p * direct
    weights = torch.cat([(weights[..., :whole * block].unflatten(-1, (whole, block))
                          + torch.nn.functional.pad(members, (0, 1))).flatten(-2), weights[..., whole * block:]], -1)
    return weights @ v


def step(fn, q, k, v, backward: bool):
    def run():
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        out.sum().backward()
        return out.detach()
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
    attn = attnc.compile_attention("stdlib:landmark", block=args.block, backend="cpu")
    dense = lambda q, k, v: grouped_dense(q, k, v, args.block)  # noqa: E731
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    lines = [f"# Landmark Attention on CPU: attnc against the dense grouped softmax and SDPA ({datetime.date.today()})",
             "", f"- {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 1, "
             f"{args.heads} heads, d {args.dim}, blocks of {args.block} (a landmark closing each), fp32; median of "
             f"{args.repeat} interleaved rounds after a warm-up",
             f"- `python benchmarks/bench_landmark.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| T | pass | attnc cpu ms | dense grouped softmax ms | SDPA causal ms | attnc / dense | attnc / SDPA "
             "| max abs diff |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for T in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, T, args.dim, generator=g) for _ in range(3))
        with torch.no_grad():
            diff = float((attn(q, k, v) - dense(q, k, v)).abs().max())
        for backward in (False, True):
            times = interleaved({name: step(fn, q, k, v, backward)
                                 for name, fn in (("attnc", attn), ("dense", dense), ("sdpa", sdpa))}, args.repeat)
            a, b, c = (statistics.median(times[n]) * 1e3 for n in ("attnc", "dense", "sdpa"))
            lines.append(f"| {T:,} | {'forward + backward' if backward else 'forward'} | {a:,.1f} | {b:,.1f} | "
                         f"{c:,.1f} | {a / b:.2f} | {a / c:.2f} | {diff:.1e} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
