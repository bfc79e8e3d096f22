"""Compile time of a model whose layers differ in their window: the kernels of each window compiled for ``sm_<arch>``
offline (no GPU: ``triton.compile`` for a CUDA target, as ``attnc check-gpu`` does), with the window a run-time
parameter against the window baked into the kernel's text.

    python benchmarks/compile_windows.py [--arch 90] [--n 4096] [--windows 256,512,1024,2048] [--out FILE.md]
    python benchmarks/compile_windows.py --quick    # two windows (256, 512) at 2,048 tokens

Two patterns per window, interleaved in one process with a fresh Triton cache (``TRITON_CACHE_DIR``):

- ``stdlib:sliding_window`` at that window: the mask reads ``window`` at run time (``p_window``,
  ``compiler/codegen/triton/run_values.py``), so every window's kernels have one text;
- the same mask with the window written as a number (``mask causal and q - k < W``): a constant of the text, as every
  window's was before the parameters were read at run time, so each window compiles its own kernels.

Each pattern's forward and backward launches (one call at n tokens, d 128, fp16, the config the search picks for the
arch) are recorded on CPU tensors and each compiled with ``triton.compile``. The tiles are the search's pick for each
window: where two windows' picks differ (at 1,024 tokens, windows 512 and 1,024), their kernels differ too and each
compiles; the table holds each window's seconds
and the totals (a causal mask is compiled first, untimed: the process's first compile sets Triton's backend up). Cost
on a 2-core CPU: about 6 s per window for the baked masks (4 kernels each), under a minute in all; ``--quick``
about 25 s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time


def _compile_seconds(pattern, arch: int, n: int) -> tuple[float, int]:
    """Seconds to compile ``pattern``'s recorded launches for ``sm_<arch>``, and how many launches."""
    from attnc.runtime import gpu_check, gpu_compile

    records, _ = gpu_check.record_call(pattern, arch=arch, head_dim=128, dtype="fp16", n=n)
    start = time.perf_counter()
    for rec in records:
        gpu_compile.compile_launch(rec, arch)
    return time.perf_counter() - start, len(records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--windows", default="256,512,1024,2048")
    ap.add_argument("--out", default=None, help="results file (Markdown)")
    ap.add_argument("--quick", action="store_true", help="two windows (256, 512) at 2,048 tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.windows = 2048, "256,512"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnc-compile-windows-")  # before Triton reads it
    import torch

    import attnc

    windows = [int(w) for w in args.windows.split(",")]
    # the process's first compile sets Triton's backend up: done on another mask, not timed
    _compile_seconds(attnc.load("pattern warm_up\n  tokens seq\n  mask causal\n"), args.arch, args.n)
    rows = ["| window | run-time `p_window`: s (launches) | baked literal: s (launches) |", "| --- | --- | --- |"]
    totals = [0.0, 0.0]
    for w in windows:  # interleaved: the run-time parameter's pattern, then the literal one
        lifted = attnc.load("stdlib:sliding_window", window=w)
        baked = attnc.load(f"pattern baked_{w}\n  tokens seq\n  mask causal and q - k < {w}\n")
        (t_lift, n_lift), (t_bake, n_bake) = (_compile_seconds(p, args.arch, args.n) for p in (lifted, baked))
        totals[0] += t_lift
        totals[1] += t_bake
        rows.append(f"| {w} | {t_lift:.2f} ({n_lift}) | {t_bake:.2f} ({n_bake}) |")
        print(rows[-1], flush=True)
    rows.append(f"| all | {totals[0]:.2f} | {totals[1]:.2f} |")
    print(rows[-1])
    import triton

    lines = [f"# Compile time of several windows ({datetime.date.today().isoformat()})", "",
             f"`python benchmarks/compile_windows.py --arch {args.arch} --n {args.n} --windows {args.windows}`; "
             f"sm_{args.arch} offline (no GPU), Triton {triton.__version__}, torch {torch.__version__}, "
             f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. A fresh Triton "
             "cache; each window's forward and backward launches of one call (d 128, fp16) compiled by "
             "`triton.compile`, the two patterns interleaved, after an untimed compile of a causal mask.", "", *rows]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
