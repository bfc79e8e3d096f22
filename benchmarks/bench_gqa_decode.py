"""A decode step with K/V heads shared: 16 query heads over 2 K/V heads against 2 over 2, on the Triton backend
under the interpreter (CPU). Recorded, not a timed test.

    python benchmarks/bench_gqa_decode.py [--repeats 7] [--nk 2048] [--out benchmarks/results/gqa-decode-interpreter-DATE.md]
    python benchmarks/bench_gqa_decode.py --quick      # 2 repeats after 256 keys

The grouped forward (``attnc_fwd_grouped``) packs the query heads sharing a K/V head into one tile, so each K/V
tile is read once per K/V head, whatever the group: the 16-over-2 step launches as many programs over as many
tiles as the 2-over-2 one and should cost about as much. With one program per query head (``--one-head``: the
grouped forward turned off) it launches 8 times as many. One query after a causal cache of ``--nk`` keys, batch 1,
head dim 64, fp32, ``torch.no_grad`` (the forward-only path: split-KV as the runner chooses it). Per case, in one
process, interleaved, median of ``--repeats`` after a warm-up call; the outputs are checked against the reference
backend in float64.

Cost: about a minute on a 2-core CPU at the defaults (7 repeats, 2048 keys); ``--quick`` (2 repeats, 256 keys)
24 s wall (24 s CPU, 2026-11-27, a quiet machine).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite as base  # noqa: E402  (attnc's import from a checkout)

attnc = base.attnc
from attnc.runtime.backends.triton import grouped  # noqa: E402

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"
HEAD_DIM = 64


def case(heads: int, kv_heads: int, nk: int):
    """(attention, q, k, v) of one decode step: one query after ``nk`` cached keys."""
    g = torch.Generator().manual_seed(heads * 100 + kv_heads)
    q = torch.randn(1, heads, 1, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, kv_heads, nk, HEAD_DIM, generator=g) for _ in range(2))
    return attnc.compile_attention(CAUSAL, backend="triton"), q, k, v


def check(attn, q, k, v) -> float:
    """The largest difference from the float64 reference's last row."""
    ref = attnc.compile_attention(CAUSAL, backend="reference")
    nk = k.shape[2]
    qf = torch.zeros(1, q.shape[1], nk, HEAD_DIM, dtype=torch.float64)
    qf[:, :, -1:] = q.double()
    want = ref(qf, k.double(), v.double())[:, :, -1:]
    with torch.no_grad():
        return float((attn(q, k, v).double() - want).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--nk", type=int, default=2048)
    ap.add_argument("--one-head", action="store_true", help="turn the grouped forward off (one program per query head)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="2 repeats after 256 keys")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.nk = 2, 256
    if args.one_head:
        grouped.packed_block_m = lambda *a: None
    cases = {(16, 2): case(16, 2, args.nk), (2, 2): case(2, 2, args.nk)}
    errors = {key: check(*c) for key, c in cases.items()}  # also the warm-up: kernels loaded, plans made
    times: dict = {key: [] for key in cases}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved: drifts of the machine's load reach both alike
            for key, (attn, q, k, v) in cases.items():
                t0 = time.perf_counter()
                attn(q, k, v)
                times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(t) for key, t in times.items()}
    ratio = med[(16, 2)] / med[(2, 2)]
    kernel = "one program per query head" if args.one_head else "grouped forward (attnc_fwd_grouped)"
    lines = [f"# GQA decode step under the Triton interpreter ({datetime.date.today().isoformat()})", "",
             f"`python benchmarks/bench_gqa_decode.py --repeats {args.repeats} --nk {args.nk}"
             f"{' --one-head' if args.one_head else ''}`: {kernel}; one query after a causal cache of {args.nk} keys, "
             f"batch 1, head dim {HEAD_DIM}, fp32, no grad; median of {args.repeats}, interleaved. "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
             "", "| query heads / K/V heads | median step (s) | runs (s) | max abs error vs float64 |",
             "|---|---|---|---|"]
    for key in cases:
        runs = ", ".join(f"{t:.3f}" for t in times[key])
        lines.append(f"| {key[0]} / {key[1]} | {med[key]:.3f} | {runs} | {errors[key]:.1e} |")
    lines += ["", f"Ratio 16/2 over 2/2: **{ratio:.2f}x**", ""]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
