"""What Blackwell's tensor memory is predicted to be worth to the backward: per case, the schedule the search
picks on the B200 model now (dK/dV weighed on 128 KV rows, that kernel's accumulators counted in tensor
memory rather than registers: ``compiler.cost.search.wide_kv_backward``) against the one it picked before (no
128-row dK/dV candidate), and the simulator's forward and backward time of each. A prediction on an
assumed B200 model (H100's fitted fractions, 64-row MMAs at half rate: nearly all of the predicted gain
comes from that assumption), not a measurement: no Blackwell GPU has run these kernels.

    python benchmarks/blackwell_backward.py [--out benchmarks/results/blackwell-backward-DATE.md]

Cost on a 2-core CPU: about half a minute (measured 2026-11-25: 53 s wall, 29 s CPU on a machine
loaded 7x by other jobs); ``--quick`` is accepted and runs the same (``--only`` picks cases).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.cost import search as SR
from attnc.compiler.cost.hardware import get_hardware
from attnc.runtime.gpu_check import describe_launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_order import CASES  # noqa: E402 - the suite's cases and the causal ones, one table


@contextlib.contextmanager
def before_tensor_memory():
    """The search as it was: no 128-row dK/dV candidate."""
    saved = SR.wide_kv_backward
    SR.wide_kv_backward = lambda *args, **kwargs: None
    try:
        yield
    finally:
        SR.wide_kv_backward = saved


def pick(spec: str, params: dict, size, heads: int, hw, head_dim: int):
    pat = attnc.load(spec, **params)
    kw = {"sizes": size} if isinstance(size, dict) and "seq" not in size else {"n": size["seq"] if isinstance(
        size, dict) else size}
    bound = E.bind_sizes(pat, heads=heads, **kw)
    return SR.ScheduleSearch(pat, bound, hw, head_dim=head_dim).run(None, None, top=1)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="accepted for uniformity: the full run already takes under a minute, --quick runs the same")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--only", nargs="*", default=None, help="cases whose name contains one of these")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    hw = get_hardware("b200")
    lines = [f"# Blackwell's backward on tensor memory: predicted (B200 model), {datetime.date.today()}", "",
             "A prediction, not a measurement (no Blackwell GPU ran these kernels): the B200 model takes H100's "
             "fitted fractions and runs 64-row MMAs at half rate (tcgen05's M is 128): nearly all of the gain "
             "below comes from that assumption. Before: no dK/dV on 128 KV rows; now: dK/dV weighed on 64 Q x "
             "128 KV tokens with dQ on the forward's tiles, that dK/dV's accumulators counted in tensor memory "
             "(512 columns) rather than registers (compiled offline for sm_100 at d 64 and 128, Triton 3.9: "
             "`gpu-compile-blackwell-backward-3.9.0-2026-11-24.md`). bf16, d "
             f"{args.head_dim}. `python benchmarks/blackwell_backward.py`; torch {torch.__version__}, "
             f"{platform.machine()}.", "",
             "| case | before: config | fwd ms | bwd ms | now: config | fwd ms | bwd ms | bwd now / before |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (spec, params, size, heads) in CASES.items():
        if args.only and not any(o in name for o in args.only):
            continue
        start = time.perf_counter()
        with before_tensor_memory():
            old = pick(spec, params, size, heads, hw, args.head_dim)
        new = pick(spec, params, size, heads, hw, args.head_dim)
        cell = lambda c: describe_launch(c.config).replace("|", "/")  # noqa: E731
        lines.append(f"| {name} | {cell(old)} | {old.forward_s * 1e3:.3f} | {old.backward_s * 1e3:.3f} | {cell(new)} | "
                     f"{new.forward_s * 1e3:.3f} | {new.backward_s * 1e3:.3f} | {new.backward_s / old.backward_s:.3f}x |")
        print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
