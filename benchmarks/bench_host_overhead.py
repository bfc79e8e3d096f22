"""The host's share of a Triton-backend call, two versions of attnc side by side, on CPU.

    git worktree add /tmp/old/attnc REV        # a tree whose folder is named attnc
    python benchmarks/bench_host_overhead.py --old /tmp/old --new .. [--quick] [--repeat 5] [--out FILE.md]

Cost on a 2-core CPU: ``--quick`` (the 2-D case, 2 processes per version, 5 calls) took 21 s wall
(17 s CPU, 2026-11-25, load average 5 from other jobs); the full run (3 cases x 5 processes per
version, 20 calls) about 3-8 minutes (an estimate, not measured).

``--old`` / ``--new``: folders that CONTAIN an ``attnc`` package folder (put first on PYTHONPATH).

What is timed: ``backend="triton"`` calls of the GPU suite's three neighborhoods (their sizes and windows),
with the kernel launches replaced by no-ops (``KL.launch_kernel``), so that what remains is the host's
work per call: binding and checking the call, finding the plan, preparing the launch (tile lists, inputs,
placeholders, the kernel module), autograd. One head of 16 channels keeps the torch arithmetic of the
backward's pre-pass negligible. The median of ``--calls`` calls after a warm-up, per process; the
versions alternate, one process each, ``--repeat`` times; the table holds the medians. CPU tensors: the
host-to-device copies a version makes per call cost nothing here, so on a GPU the older version's
overhead is larger than this shows (each pageable copy also waits for the queued kernels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_flex import emit  # noqa: E402

#: name -> (stdlib pattern, params, sizes): the GPU suite's cases (benchmarks/gpu_suite.py)
CASES = {
    "1-D 32K, window 2,048": ("stdlib:neighborhood_1d", {"kernel_size": 2048}, {"seq": 32768}),
    "2-D 128x128, 33x33": ("stdlib:neighborhood_2d", {"kernel_size_y": 33, "kernel_size_x": 33},
                           {"height": 128, "width": 128}),
    "3-D 30x48x80, 18x24x24": ("stdlib:neighborhood_3d", {"kernel_size_t": 18, "kernel_size_y": 24,
                                                          "kernel_size_x": 24}, {"frames": 30, "height": 48, "width": 80}),
}

CHILD = r"""
import json, math, os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
import torch
import attnc
from attnc.runtime.backends.triton import kernel_launch as KL
KL.launch_kernel = lambda *a, **kw: None  # the host's work only
spec, params, sizes, calls = json.loads(sys.argv[1])
n = math.prod(sizes.values())
kw = {} if "seq" in sizes else {"sizes": sizes}
mod = attnc.compile_attention(attnc.load(spec, **params), backend="triton", **kw)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 1, n, 16, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))


def forward():
    with torch.no_grad():
        mod(q, k, v)


def training():
    out = mod(q, k, v)
    out.backward(torch.ones_like(out))


result = {"file": attnc.__file__}
for name, fn in (("forward", forward), ("training", training)):
    fn()
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    result[name] = sorted(times)[len(times) // 2]
print(json.dumps(result))
"""


def measure(root: str, case: tuple, calls: int) -> dict:
    env = dict(os.environ, PYTHONPATH=root)
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps([*case, calls])], capture_output=True, text=True,
                         env=env, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"{root}: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="folder containing the older attnc package")
    ap.add_argument("--new", required=True, help="folder containing the newer attnc package")
    ap.add_argument("--quick", action="store_true", help="the 2-D case, --repeat 2 --calls 5 (unless given)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="processes per version and case (alternating; default 5, --quick 2)")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per process (default 20, --quick 5)")
    ap.add_argument("--out", default=None, help="results file (Markdown)")
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 5)
    args.calls = args.calls or (5 if args.quick else 20)
    cases = {k: c for k, c in CASES.items() if k.startswith("2-D")} if args.quick else CASES
    rows = ["| case | old forward us | new forward us | new / old | old training step us | new training step us "
            "| new / old |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, case in cases.items():
        got: dict = {"old": [], "new": []}
        for _ in range(args.repeat):
            for which in ("old", "new"):
                got[which].append(measure(getattr(args, which), case, args.calls))
        med = {w: {k: statistics.median(r[k] for r in got[w]) for k in ("forward", "training")} for w in got}
        rows.append(f"| {name} | {med['old']['forward'] * 1e6:.0f} | {med['new']['forward'] * 1e6:.0f} | "
                    f"{med['new']['forward'] / med['old']['forward']:.2f} | {med['old']['training'] * 1e6:.0f} | "
                    f"{med['new']['training'] * 1e6:.0f} | {med['new']['training'] / med['old']['training']:.2f} |")
        print(rows[-1], flush=True)
    head = [f"# Host overhead of a Triton-backend call ({datetime.date.today().isoformat()})", "",
            f"`python benchmarks/bench_host_overhead.py --old {args.old} --new {args.new} --repeat {args.repeat} "
            f"--calls {args.calls}`; {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}. Kernel launches stubbed (the host's work only), 1 head of 16 channels, "
            "bf16, CPU tensors: the per-call host-to-device copies of the old version cost nothing here (see the "
            "module docstring). Medians of per-process medians.", ""]
    emit(head + rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
