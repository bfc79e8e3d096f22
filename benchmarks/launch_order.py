"""What the kernels' launch order is predicted to be worth: per case, the schedule the search picks on a
GPU model, which of its kernels launch longest first (``compiler.cost.launch_order.choose_order``), and the
simulator's forward and backward time with those orders against every kernel in tile order (as attnc's
kernels launched before order tables). A prediction, not a measurement: the GPU suite measures.

    python benchmarks/launch_order.py [--hardware h100] [--out benchmarks/results/launch-order-DATE.md]

Cost on a 2-core CPU: under half a minute (measured 2026-11-25: 32 s wall, 14 s CPU on a machine
loaded 7x by other jobs; 9 s idle, recorded); ``--quick`` is accepted and runs the same.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time

import torch

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.cost import launch_order
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.search import ScheduleSearch

#: name -> (pattern, params, sizes or n, heads): the GPU suite's three cases, then causal and uneven ones.
CASES = {
    "1-D 32K, window 2,048 (suite)": ("stdlib:neighborhood_1d", {"kernel_size": 2048}, {"seq": 32768}, 8),
    "2-D 128x128, 33x33 (suite)": ("stdlib:neighborhood_2d", {"kernel_size_y": 33, "kernel_size_x": 33},
                                   {"height": 128, "width": 128}, 8),
    "3-D 30x48x80, 18x24x24 (suite)": ("stdlib:neighborhood_3d", {"kernel_size_t": 18, "kernel_size_y": 24,
                                                                  "kernel_size_x": 24},
                                       {"frames": 30, "height": 48, "width": 80}, 8),
    "causal 32K, 8 heads": ("stdlib:sliding_window", {"window": 32768}, 32768, 8),
    "causal 8K, 16 heads": ("stdlib:sliding_window", {"window": 8192}, 8192, 16),
    "causal 4K, 32 heads": ("stdlib:sliding_window", {"window": 4096}, 4096, 32),
    "sliding window 4,096 at 32K, 8 heads": ("stdlib:sliding_window", {"window": 4096}, 32768, 8),
    "power (block 256) at 32K, 8 heads": ("stdlib:power", {"block": 256}, 32768, 8),
    "prefix LM (prefix 4,096) at 16K, 8 heads": ("stdlib:prefix_lm", {"prefix": 4096}, 16384, 8),
}


def case_row(name: str, spec: str, params: dict, size, heads: int, hw, head_dim: int) -> list[str]:
    pat = attnc.load(spec, **params)
    kw = {"sizes": size} if isinstance(size, dict) and "seq" not in size else {"n": size["seq"] if isinstance(
        size, dict) else size}
    bound = E.bind_sizes(pat, heads=heads, **kw)
    search = ScheduleSearch(pat, bound, hw, head_dim=head_dim)
    best = search.run(None, None, top=1)[0]
    cfg, sched = best.config, best.schedule
    bwd, dq = cfg.backward_config(), cfg.dq_config()
    flat = len(cfg.q_tile) == 1 and search.grid
    bsched = search.schedule(bwd.q_tile, bwd.kv_tile, flat) if cfg.own_backward_tiles else sched
    dsched = search.schedule(dq.q_tile, dq.kv_tile, flat) if cfg.own_dq_tiles else bsched
    ordered = []
    for kernel, s, t in (("fwd", sched, False), ("dQ", dsched, False), ("dK/dV", bsched, True)):
        full, part = (s.t_full_count, s.t_partial_count) if t else (s.full_count, s.partial_count)
        if t and full.shape[0] != 1:
            continue
        repeat = heads // full.shape[0]
        if launch_order.ordered_arch(hw.arch) and launch_order.choose_order(full, part, repeat, hw.sms) is not None:
            ordered.append(kernel)
    now = search.evaluate(cfg, flat).prediction
    tile_order = search.evaluate(cfg, flat, ordered=False).prediction
    f0, f1 = tile_order.forward.time_s * 1e3, now.forward.time_s * 1e3
    b0, b1 = tile_order.backward.time_s * 1e3, now.backward.time_s * 1e3
    return [name, f"{'x'.join(map(str, cfg.q_tile))} / {'x'.join(map(str, cfg.kv_tile))}",
            str(sched.num_q_tiles * heads), ", ".join(ordered) or "none",
            f"{f0:.3f}", f"{f1:.3f}", f"{f1 / f0:.3f}", f"{b0:.3f}", f"{b1:.3f}", f"{b1 / b0:.3f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="accepted for uniformity: the full run already takes under a minute, --quick runs the same")
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    hw = get_hardware(args.hardware)
    t0 = time.time()
    rows = [case_row(name, *case, hw, args.head_dim) for name, case in CASES.items()]
    head = ["case", "tiles (q / kv)", "forward CTAs", "longest first", "fwd ms, tile order", "fwd ms, as launched",
            "ratio", "bwd ms, tile order", "bwd ms, as launched", "ratio"]
    lines = [f"# Launch order: predicted effect ({datetime.date.today().isoformat()})", "",
             f"`python benchmarks/launch_order.py --hardware {args.hardware}`: the simulator's {hw.name} model "
             f"({hw.sms} SMs), bf16, head dim {args.head_dim}, batch 1; attnc {attnc.__version__}, torch "
             f"{torch.__version__}, Python {platform.python_version()}; {time.time() - t0:.0f} s. Predicted, "
             "not measured: `python benchmarks/gpu_suite.py` measures on a GPU.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
