"""The host's share of a warm decode step on the Triton backend, against one tiny SDPA call in the same process.

    python benchmarks/bench_decode_host.py [--root DIR] [--rounds 5] [--calls 50] [--out FILE.md] [--profile]
    python benchmarks/bench_decode_host.py --quick     # 2 rounds of 10 calls, no routed cases

What is timed, on CPU tensors under ``torch.inference_mode()``, forward only, with the kernel launches replaced by
no-ops (``kernel_launch.launch_kernel``, as ``bench_host_overhead.py`` does), so that what remains is the host's work
per call: binding and checking the call, finding the plan and the launch, allocating the outputs, the launch's
arguments. A decode step: batch 4, 32 query heads over 8 K/V heads, one query after 4,096 cached keys, head dim 128,
``backend="triton"``, called with the same tensors after two warm-up calls. Cases: ``stdlib:sliding_window`` (window
1,024), a ``mask causal`` pattern, ``stdlib:moba`` and ``stdlib:quest`` (routes: their selection is made from q and k
at every step, torch arithmetic over the keys that a GPU runs as kernels, so on CPU tensors it is timed as host work),
and the sliding window over a growing cache (one key more at every call: a new shape each step), contiguous and in
pages of 16 keys (the paged call's signature does not change with the lengths, a device tensor incremented in place:
from the third step on its bound launch is replayed, ``runtime.warm_calls``). The yardstick: one
``F.scaled_dot_product_attention`` on ``[1, 1, 1, 8]`` tensors.

The cases run interleaved, ``--rounds`` times, each round the median of ``--calls`` calls per case (``--route-calls``
for the routed ones); the table holds the medians over rounds, and each case's ratio to the SDPA call's.
``--root``: a folder containing the ``attnc`` package to measure (put first on ``sys.path``; default: the installed one).
``--profile``: cProfile of the sliding window's warm calls, the top entries by own time.

Cost on a 2-core CPU: about a minute with the defaults (quest's steps are the longest); ``--quick`` 15 s wall
(13 s CPU, 2026-11-27, load average 2 from other jobs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time


def _setup(root: str | None):
    if root is not None:
        sys.path.insert(0, os.path.abspath(root))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import attnc
    from attnc.runtime.backends.triton import kernel_launch as KL

    KL.launch_kernel = lambda *args, **kwargs: None  # the host's work only
    torch.set_num_threads(1)
    return torch, attnc


def _cases(torch, attnc, batch: int, heads: int, kv_heads: int, nk: int, d: int, routes: bool) -> dict:
    """name -> (calls made per timing, a function of one call)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, d, generator=g)
    k = torch.randn(batch, kv_heads, nk, d, generator=g)
    v = torch.randn(batch, kv_heads, nk, d, generator=g)
    tiny = torch.randn(1, 1, 1, 8, generator=g)
    cases = {"one tiny SDPA call ([1, 1, 1, 8])": (False, lambda: F.scaled_dot_product_attention(tiny, tiny, tiny))}
    specs = {"stdlib:sliding_window (window 1,024)": attnc.load("stdlib:sliding_window", window=1024),
             "causal (`mask causal`)": "pattern causal_mask\n  tokens seq\n  mask causal\n"}
    if routes:
        specs.update({"stdlib:moba": "stdlib:moba", "stdlib:quest": "stdlib:quest"})
    for name, spec in specs.items():
        attn = attnc.compile_attention(spec, backend="triton")
        cases[name] = ("moba" in name or "quest" in name, lambda attn=attn: attn(q, k, v))
    grow = attnc.compile_attention(specs["stdlib:sliding_window (window 1,024)"], backend="triton")
    kb = torch.randn(batch, kv_heads, nk + 100_000, d, generator=g)
    vb = torch.randn(batch, kv_heads, nk + 100_000, d, generator=g)
    step = [nk]

    def growing():
        step[0] += 1
        grow(q, kb[:, :, : step[0]], vb[:, :, : step[0]])

    cases["sliding window, growing cache (a new length every call)"] = (False, growing)
    # the same growing cache in pages of 16 keys: one launch whatever the lengths, a bound fixed by the table
    paged = attnc.compile_attention(specs["stdlib:sliding_window (window 1,024)"], backend="triton", layout="bhnd")
    page, capacity = 16, nk + 4096
    pool = torch.randn(batch * capacity // page, page, kv_heads, d, generator=g)
    table = torch.randperm(pool.shape[0], generator=g).view(batch, capacity // page).to(torch.int32)
    lengths = torch.full((batch,), nk, dtype=torch.int32)

    grown = [0]

    def paged_growing():
        lengths.add_(1)  # on the device, as a serving loop keeps them (it counts its steps on the host)
        grown[0] += 1
        if grown[0] == capacity - nk:  # a wrap every 4,096 calls, outside the timed steady state
            lengths.fill_(nk)
            grown[0] = 0
        paged(q, pool, pool, block_table=table, cache_seqlens=lengths)

    cases["sliding window, paged growing cache (one launch, lengths on the device)"] = (False, paged_growing)
    return cases


def _median_call(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="folder containing the attnc package to measure")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50, help="timed calls per case and round")
    ap.add_argument("--route-calls", type=int, default=2, help="timed calls of moba and quest per round")
    ap.add_argument("--no-routes", action="store_true", help="leave out moba and quest")
    ap.add_argument("--profile", action="store_true", help="cProfile the sliding window's warm calls")
    ap.add_argument("--out", default=None, help="results file (Markdown)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 10 calls, without moba and quest")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.no_routes = 2, 10, True
    torch, attnc = _setup(args.root)
    sizes = dict(batch=4, heads=32, kv_heads=8, nk=4096, d=128)
    with torch.inference_mode():
        cases = _cases(torch, attnc, **sizes, routes=not args.no_routes)
        for _, fn in cases.values():  # warm: plans, kernels, the signature's launcher
            for _ in range(3):
                fn()
        got: dict = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (routed, fn) in cases.items():
                got[name].append(_median_call(fn, args.route_calls if routed else args.calls))
    med = {name: statistics.median(t) for name, t in got.items()}
    sdpa = next(iter(med.values()))
    rows = ["| case | host us per call | / one tiny SDPA call |", "| --- | --- | --- |"]
    for name, t in med.items():
        rows.append(f"| {name} | {t * 1e6:,.1f} | {t / sdpa:,.1f}x |")
    for row in rows:
        print(row, flush=True)
    lines = [f"# The host's share of a warm decode step ({datetime.date.today().isoformat()})", "",
             f"`python benchmarks/bench_decode_host.py --rounds {args.rounds} --calls {args.calls} --route-calls "
             f"{args.route_calls}`; attnc from {os.path.dirname(attnc.__file__)}; {platform.machine()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}. Kernel launches "
             "stubbed, CPU tensors, forward only under `torch.inference_mode()`; batch 4, 32 query heads over 8 K/V "
             "heads, 1 query after 4,096 cached keys, d 128, `backend=\"triton\"`. Medians over rounds of per-round "
             "medians, cases interleaved in one process.", "", *rows]
    if args.profile:
        lines += ["", "Top entries of a cProfile of 300 warm sliding-window calls (own time):", "", "```",
                  *_profile(torch, cases["stdlib:sliding_window (window 1,024)"][1]), "```"]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


def _profile(torch, fn, calls: int = 300, top: int = 12) -> list[str]:
    import cProfile
    import io
    import pstats

    with torch.inference_mode():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    body = text.getvalue().splitlines()
    start = next(i for i, line in enumerate(body) if line.lstrip().startswith("ncalls"))
    out = [line.replace(os.path.dirname(os.path.dirname(__file__)), "attnc") for line in body[start:] if line.strip()]
    print("\n".join(out))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
