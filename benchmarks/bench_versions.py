"""Two versions of attnc side by side on CPU: the first call (load + compile_attention + one call, in a
fresh process) and the steady state (median of later calls), each measurement in its own process,
the versions alternating (recorded, not a timed test).

    git worktree add /tmp/old/attnc REV        # a tree whose folder is named attnc
    python benchmarks/bench_versions.py --old /tmp/old --new .. [--quick] [--repeat 5] [--out FILE.md]

Cost on a 2-core CPU: ``--quick`` (the first case, ``backend="auto"``, 2 processes per version, 3
steady calls) took 25 s wall (23 s CPU, 2026-11-25, load average 5 from other jobs); the full run (3
cases x 2 backends x 5 processes per version: 60 fresh processes, each importing torch and attnc)
about 6-10 minutes (an estimate from the quick run's 6 s a process).

``--old`` / ``--new``: folders that CONTAIN an ``attnc`` package folder (put first on PYTHONPATH).
Cases: fp32, batch 1, head dim 64, forward under no_grad, ``backend="auto"`` and ``"cpu"``.
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
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench_flex import emit  # noqa: E402

CASES = {
    "sliding window 512, 8K tokens, 8 heads": ("stdlib:sliding_window", {"window": 512}, None, 8192, 8),
    "document (4 docs), 8K tokens, 8 heads": ("stdlib:document", {}, None, 8192, 8),
    "2-D neighborhood 13x13, 64x64, 4 heads": ("stdlib:neighborhood_2d", {"kernel_size": 13},
                                               {"height": 64, "width": 64}, 4096, 4),
}

CHILD = r"""
import json, sys, time, torch
t0 = time.perf_counter()
import attnc
spec, params, sizes, n, heads, backend, steady = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, heads, n, 64, generator=g) for _ in range(3))
inputs = {"doc": torch.arange(n) * 4 // n} if spec == "stdlib:document" else {}
with torch.no_grad():
    t = time.perf_counter()
    mod = attnc.compile_attention(attnc.load(spec, **params), backend=backend, sizes=sizes)
    mod(q, k, v, **inputs)
    first = time.perf_counter() - t
    times = []
    for _ in range(steady):
        t = time.perf_counter()
        mod(q, k, v, **inputs)
        times.append(time.perf_counter() - t)
print(json.dumps({"first": first, "steady": sorted(times)[len(times) // 2] if times else None,
                  "file": attnc.__file__}))
"""


def measure(root: str, case: tuple, backend: str, steady: int) -> dict:
    env = dict(os.environ, PYTHONPATH=root, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="attnc-versions-"),
               ATTNC_CACHE_DIR=tempfile.mkdtemp(prefix="attnc-versions-cache-"))
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps([*case, backend, steady])], capture_output=True,
                         text=True, env=env, cwd=tempfile.gettempdir(), timeout=900)
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(os.path.abspath(root)), (out["file"], root)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--quick", action="store_true",
                    help="the first case, backend auto, --repeat 2 --steady 3 (unless given)")
    ap.add_argument("--repeat", type=int, default=None, help="processes per version (default 5; --quick 2)")
    ap.add_argument("--steady", type=int, default=None, help="later calls per process (median; default 5, --quick 3)")
    ap.add_argument("--backends", default=None, help="default auto,cpu (--quick auto)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.repeat = args.repeat or (2 if args.quick else 5)
    args.steady = args.steady or (3 if args.quick else 5)
    args.backends = args.backends or ("auto" if args.quick else "auto,cpu")
    cases = dict(list(CASES.items())[:1]) if args.quick else CASES
    rows = []
    for name, case in cases.items():
        for backend in args.backends.split(","):
            got = {"old": [], "new": []}
            for r in range(args.repeat):  # alternating, the order flipped every round
                for which in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    got[which].append(measure(getattr(args, which), case, backend, args.steady))
            med = {w: {m: statistics.median(x[m] for x in got[w]) for m in ("first", "steady")} for w in got}
            rows.append((name, backend, med))
            print(name, backend, med, file=sys.stderr)
    lines = [f"# Two versions on CPU: first call and steady state, {datetime.date.today()}", "",
             f"- command: `python benchmarks/bench_versions.py {' '.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; python "
             f"{platform.python_version()}",
             f"- median of {args.repeat} fresh processes per version, alternating; steady: median of "
             f"{args.steady} calls after the first in each process; fp32, forward, no_grad", "",
             "| case | backend | first call old (s) | first call new (s) | new/old | steady old (ms) | "
             "steady new (ms) | new/old |", "|---|---|---|---|---|---|---|---|"]
    for name, backend, med in rows:
        o, n = med["old"], med["new"]
        lines.append(f"| {name} | {backend} | {o['first']:.2f} | {n['first']:.2f} | {n['first'] / o['first']:.2f} | "
                     f"{o['steady'] * 1e3:.1f} | {n['steady'] * 1e3:.1f} | {n['steady'] / o['steady']:.2f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
