"""The host's and the selection's share of a routed decode step on the Triton backend, over a growing cache
(recorded, not a timed test).

    python benchmarks/bench_routed_decode.py [--quick] [--out FILE] [--rounds R] [--steps S]

Every step is one new query per batch row after a KV cache of nk keys, the cache growing by one key a step (a
new length every step, as in generation). The kernels' launches are stubbed (their output is not read), so a
step's time is what runs outside the kernels: the plan of the step, the route's selection and the tile lists.
The tensors are CPU tensors (Triton's interpreter is imported, never launched): the selection's torch ops,
which a GPU runs asynchronously beside the host, are counted here too.

Three ways of the same code, interleaved in rotated order in every round, the median step time over
``--rounds`` rounds after a warm-up round:
- ``kept summary`` (attnc now, for the routes scored by a summary of their key blocks: Quest, MoBA): the device
  template below with an ``attnc.KeySummary`` passed at every step, the blocks' bounds or means kept across
  steps (``runtime.plan.kept_summary``): a step summarises the keys after the last complete block;
- ``device template``: one decode template for every length, the route's constants, selection and lists made
  by torch ops from positions at each step (``device_routes.decode_route_plan``), the key blocks' summaries
  made from every key at each step;
- ``host plan per length`` (the baseline, attnc before it): the same call with routed patterns sent down the
  path they took until then (``decode_lists.applies`` false for a route): the step's block classified and its
  route constants made on the host at every new length.

Patterns: Quest (page 16, budget 1024), MoBA (block 256, top 3) and token top-k (64), 8 query heads over 2 K/V
heads, d 64, fp32, batch 1, at nk 4096 and 16384 (``--quick``: 1024).

Cost on a 2-core CPU (2026-11-26): ``--quick`` about 20 s; the full run about 2 minutes."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import attnc  # noqa: E402
from attnc.runtime.backends.triton import forward as F  # noqa: E402
from attnc.runtime.backends.triton import kernel_launch as KL  # noqa: E402
from attnc.runtime.plan import decode_lists, kept_summary  # noqa: E402

PATTERNS = {"quest": {"page": 16, "token_budget": 1024}, "moba": {"block": 256, "topk": 3},
            "token_topk": {"topk": 64}}
HQ, HKV, D = 8, 2, 64
APPLIES = decode_lists.applies


def _per_length(pat) -> bool:
    """The baseline's rule: no route takes the decode template."""
    return APPLIES(pat) and pat.route is None


#: The ways, in their order in the table
WAYS = ("kept", "template", "host")


def step_time(attn, q, k, v, start: int, steps: int, way: str, kept) -> float:
    """Seconds a step of ``steps`` steps from a cache of ``start`` keys, growing by one key a step; ``kept`` the
    sequence's ``KeySummary`` (the ``kept`` way)."""
    decode_lists.applies = _per_length if way == "host" else APPLIES
    extra = {"key_summary": kept} if way == "kept" else {}
    try:
        t = time.perf_counter()
        for i in range(steps):
            attn(q, k[:, :, :start + i], v[:, :, :start + i], **extra)
        return (time.perf_counter() - t) / steps
    finally:
        decode_lists.applies = APPLIES


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="nk 1024, 2 rounds of 4 steps")
    parser.add_argument("--out", default=None, help="write the markdown table to this file")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    lengths = (1024,) if args.quick else (4096, 16384)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (4 if args.quick else 10)
    real = KL.launch_kernel
    KL.launch_kernel = F.KL.launch_kernel = lambda *a, **kw: None  # the kernels are not what is timed
    lines = [f"# Routed decode steps outside the kernels: kept key summaries, the device template and a host plan "
             f"per length ({datetime.date.today()})", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
             f"{platform.platform()}",
             f"- python {sys.version.split()[0]}, torch {torch.__version__}",
             f"- `benchmarks/bench_routed_decode.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"- batch 1, {HQ} query heads over {HKV} K/V heads, d {D}, fp32, CPU tensors, launches stubbed; "
             f"one query a step, the cache growing by a key a step; ms a step: the median of {rounds} rounds of "
             f"{steps} steps (min-max), the ways interleaved", "",
             "| pattern | nk | kept summary (ms) | device template (ms) | host plan per length (ms) | "
             "kept / template | template / host plan |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for name, params in PATTERNS.items():
                attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
                for nk in lengths:
                    total = nk + (rounds + 1) * len(WAYS) * steps + 1
                    q = torch.randn(1, HQ, 1, D, generator=g)
                    k, v = torch.randn(1, HKV, total, D, generator=g), torch.randn(1, HKV, total, D, generator=g)
                    ways = WAYS if kept_summary.keeps(attn.pattern) is None else WAYS[1:]
                    times = {w: [] for w in ways}
                    start, kept = nk, attnc.KeySummary()
                    for r in range(rounds + 1):
                        for way in ways[r % len(ways):] + ways[:r % len(ways)]:
                            took = step_time(attn, q, k, v, start, steps, way, kept)
                            start += steps
                            if r:  # round 0 warms every way up
                                times[way].append(took)
                    med = {w: statistics.median(t) * 1e3 for w, t in times.items()}
                    cell = {w: f"{med[w]:,.2f} ({min(t) * 1e3:,.1f}-{max(t) * 1e3:,.1f})" for w, t in times.items()}
                    ratio = f"{med['kept'] / med['template']:.2f}" if "kept" in med else "-"
                    lines.append(f"| {name} {params} | {nk:,} | {cell.get('kept', '-')} | {cell['template']} | "
                                 f"{cell['host']} | {ratio} | {med['template'] / med['host']:.2f} |")
                    print(lines[-1], flush=True)
    finally:
        KL.launch_kernel = F.KL.launch_kernel = real
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
