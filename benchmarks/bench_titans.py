"""Titans' neural memory on CPU: the chunked form (``backend="cpu"``) against the token-by-token rule
(``backend="reference"``), forward and forward + backward (recorded, not a timed test).

    python benchmarks/bench_titans.py [--quick] [--t 1024,4096] [--heads 8] [--dim 64] [--repeat 3] [--out FILE.md]

No public implementation computes this rule (flash-linear-attention's naive titans and lucidrains' titans-pytorch
take the gradient per chunk, or train an MLP: ``docs/seeds.md``), so the baseline is attnc's own token loop, in
the same process. fp32, batch 1, ``stdlib:titans`` with random log decays, learning rates and momenta; interleaved
rounds, the median; outputs checked against each other first. Cost on a 2-core CPU (2026-11-26, otherwise
idle): ``--quick`` (T = 256, 1,024) took 16 s wall (25 s CPU); the full run (T = 1,024, 4,096) 47 s (with the
chunked form's gamma as one product), most of it the token loop's backward.
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


def tensors(T: int, H: int, D: int):
    g = torch.Generator().manual_seed(0)
    q, v = (torch.randn(1, H, T, D, generator=g) for _ in "qv")
    k = torch.randn(1, H, T, D, generator=g) / D ** 0.5
    rates = {"a": torch.log1p(-0.1 * torch.rand(H, T, generator=g)), "theta": 0.5 * torch.rand(H, T, generator=g),
             "eta": 0.5 + 0.5 * torch.rand(H, T, generator=g)}
    return q, k, v, rates


def step(attn, q, k, v, rates, backward: bool):
    def run():
        if not backward:
            with torch.no_grad():
                return attn(q, k, v, **rates)
        leaves = [x.clone().requires_grad_() for x in (q, k, v, *rates.values())]
        out = attn(*leaves[:3], **dict(zip(rates, leaves[3:], strict=True)))
        out.sum().backward()
        return out.detach()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T = 256 and 1,024")
    ap.add_argument("--t", default=None, help="sequence lengths, comma-separated (default 1024,4096)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lengths = [int(t) for t in args.t.split(",")] if args.t else [256, 1024] if args.quick else [1024, 4096]
    chunked, loop = (attnc.compile_attention("stdlib:titans", backend=b) for b in ("cpu", "reference"))
    lines = [f"# Titans' neural memory on CPU: chunked against token by token ({datetime.date.today()})", "",
             f"- {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 1, "
             f"{args.heads} heads, d {args.dim}, fp32; median of {args.repeat} interleaved rounds after a warm-up",
             f"- `python benchmarks/bench_titans.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| T | pass | token by token ms | chunked ms | speedup | max abs diff |", "|---|---|---|---|---|---|"]
    for T in lengths:
        q, k, v, rates = tensors(T, args.heads, args.dim)
        diff = float((chunked(q, k, v, **rates) - loop(q, k, v, **rates)).abs().max())
        for backward in (False, True):
            times = interleaved({"loop": step(loop, q, k, v, rates, backward),
                                 "chunked": step(chunked, q, k, v, rates, backward)}, args.repeat)
            a, b = (statistics.median(times[n]) for n in ("loop", "chunked"))
            lines.append(f"| {T:,} | {'forward + backward' if backward else 'forward'} | {a * 1e3:,.1f} | "
                         f"{b * 1e3:,.1f} | {a / b:.1f}x | {diff:.1e} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
