"""Front-end latency: parse + check + lower every stdlib pattern (cold, in a
fresh process), and exact mask materialisation at a small size against a
dense torch mask built by hand in the same process (the baseline).

    python benchmarks/bench_frontend.py [--quick] [--out benchmarks/results/frontend-cpu.md]

Cost on a 2-core CPU: ``--quick`` (the cold load of 6 patterns, ``QUICK``) took 34 s wall (24 s CPU,
2026-11-25, load average 6 from other jobs); the full run (every stdlib pattern, a fresh process
each: most of the time is importing torch) about 2-3 minutes (an estimate: 34 patterns at the quick
run's 4 s each).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch

import attnc
from attnc.spec.library import stdlib_index

#: Values for parameters that have no default.
REQUIRED = {"prefix_lm": {"prefix": 128}, "grid": {"vision_end": 4000}, "seer": {"topk": 8}}
#: ``--quick``'s patterns: one of each kind (a mask, a grid, a route, a bias, a recurrence, a combination)
QUICK = ("sliding_window", "neighborhood_2d", "moba", "alibi", "mamba2", "nsa")


def cold_load_seconds(name: str) -> float:
    code = (
        "import time; t = time.perf_counter(); import attnc; t1 = time.perf_counter(); "
        f"attnc.load('stdlib:{name}', **{REQUIRED.get(name, {})!r}); print(time.perf_counter() - t1)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def warm_load_seconds(name: str, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        attnc.load(f"stdlib:{name}", **REQUIRED.get(name, {}))
        best = min(best, time.perf_counter() - t)
    return best


def sliding_window_ratio(n: int = 4096, window: int = 256) -> tuple[float, float]:
    """materialize_mask against the same mask written directly in torch."""
    pat = attnc.load("stdlib:sliding_window", window=window)
    t = time.perf_counter()
    ours = attnc.materialize_mask(pat, n=n)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    i = torch.arange(n)
    base = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    t_base = time.perf_counter() - t
    assert torch.equal(ours[0], base)
    return t_ours, t_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for name, (_, decl) in sorted(stdlib_index().items()):
        if args.quick and name not in QUICK:
            continue
        rows.append((name, decl.kind, cold_load_seconds(name), warm_load_seconds(name)))
    t_ours, t_base = sliding_window_ratio()
    lines = [
        "# Front-end latency (CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {torch.get_num_threads()} threads;"
        f" python {platform.python_version()}; torch {torch.__version__}",
        "",
        "| pattern | kind | first load in a fresh process (s) | repeated load (ms) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {k} | {c:.3f} | {w * 1e3:.1f} |" for n, k, c, w in rows]
    lines += [
        "",
        f"materialize_mask, sliding_window 256 on 4096 tokens: {t_ours * 1e3:.1f} ms; the same mask written"
        f" directly in torch: {t_base * 1e3:.1f} ms (ratio {t_ours / t_base:.1f}x).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
