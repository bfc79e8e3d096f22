"""Schedule-building latency: ``classify_tiles`` (the TileSchedule of a pattern)
against PyTorch FlexAttention's ``create_block_mask`` (device="cpu",
BLOCK_SIZE=128) on the same mask in the same process, and against the
brute-force ``classify_tiles_dense`` where that is feasible.

    python benchmarks/bench_schedule.py [--quick] [--out benchmarks/results/schedule-cpu-DATE.md] [--repeat 3]

Cost on a 2-core CPU: ``--quick`` took 14 s wall (9 s CPU, 2026-11-25, load average 5 from other
jobs): the same cases with FlexAttention and the brute force at 8,192 tokens and a 64x64 grid
(``QUICK_CASES``; the 1M-token and 3-D cases, attnc's alone, as in the full run); it writes a file
only with ``--out``. The full run took 22 s wall (22 s CPU, load average 8), most of it Flex's
``create_block_mask`` and the brute force over every token pair at 16K tokens.

Cases (issue 3): 1-D sliding window 1024 on 1,048,576 tokens; 3-D
neighborhood (18, 24, 24) on a 30x48x80 latent; 2-D neighborhood 13x13 on
96x96; plus the 16K-token sliding window where FlexAttention fits in memory.
Best of ``--repeat`` runs. FlexAttention evaluates ``mask_mod`` on every
(query, key) pair (a dense ``[Q_LEN, KV_LEN]`` mask), so it is skipped where
that mask does not fit in this machine's memory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis.tiles import classify_tiles, classify_tiles_dense

try:
    from torch.nn.attention.flex_attention import create_block_mask
except ImportError:  # pragma: no cover - old torch
    create_block_mask = None


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "cpu"


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


# ----------------------------------------------------------------- FlexAttention mask_mods (written by hand)
def flex_sliding_window(window: int):
    def mask_mod(b, h, q, k):
        return (k <= q) & (q - k < window)

    return mask_mod


def flex_neighborhood_2d(height: int, width: int, ky: int, kx: int):
    """NATTEN non-causal window, dilation 1, stride 1: centre clamped so the window stays inside."""

    def axis(qa, ka, L, w):
        wl, wr = w // 2, w // 2 + (w % 2) - 1
        centre = torch.clamp(qa, wl, L - 1 - wr)
        d = ka - centre
        return (d >= -wl) & (d <= wr)

    def mask_mod(b, h, q, k):
        return axis(q // width, k // width, height, ky) & axis(q % width, k % width, width, kx)

    return mask_mod


# ----------------------------------------------------------------- cases
CASES = [
    # label, stdlib name, params, n, sizes, tile, flex (mask_mod factory or reason to skip)
    ("1-D sliding window 1024, 16,384 tokens", "sliding_window", dict(window=1024), 16384, None, (128,),
     lambda: flex_sliding_window(1024)),
    ("1-D sliding window 1024, 1,048,576 tokens", "sliding_window", dict(window=1024), 1 << 20, None, (128,),
     "skipped: a dense 1M x 1M mask is 1.1 TB"),
    ("3-D neighborhood 18x24x24, 30x48x80 (115,200 tokens)", "neighborhood_3d", dict(kernel_size_t=18, kernel_size_y=24, kernel_size_x=24), None,
     {"frames": 30, "height": 48, "width": 80}, (2, 8, 8),
     "skipped: a dense 115,200^2 mask is 13.3 GB (plus reductions) on a {mem:.0f} GB machine"),
    ("2-D neighborhood 13x13, 96x96 (9,216 tokens)", "neighborhood_2d", dict(kernel_size_y=13, kernel_size_x=13), None,
     {"height": 96, "width": 96}, (8, 16), lambda: flex_neighborhood_2d(96, 96, 13, 13)),
]

#: ``--quick``: the cases Flex and the brute force run at smaller sizes; attnc's own big cases as they are
QUICK_CASES = [
    ("1-D sliding window 512, 8,192 tokens", "sliding_window", dict(window=512), 8192, None, (128,),
     lambda: flex_sliding_window(512)),
    CASES[1],
    CASES[2],
    ("2-D neighborhood 13x13, 64x64 (4,096 tokens)", "neighborhood_2d", dict(kernel_size_y=13, kernel_size_x=13), None,
     {"height": 64, "width": 64}, (8, 16), lambda: flex_neighborhood_2d(64, 64, 13, 13)),
]
QUICK_DENSE_CASES = [case[:6] for case in (QUICK_CASES[0], QUICK_CASES[3])]

#: Brute-force classify_tiles_dense at a size where it is feasible (evaluates every token pair).
DENSE_CASES = [
    ("1-D sliding window 1024, 16,384 tokens", "sliding_window", dict(window=1024), 16384, None, (128,)),
    ("2-D neighborhood 13x13, 96x96 (9,216 tokens)", "neighborhood_2d", dict(kernel_size_y=13, kernel_size_x=13), None,
     {"height": 96, "width": 96}, (8, 16)),
]


def check_flex_mask_mod(name, params, mask_mod, n, sizes) -> None:
    """The hand-written mask_mod equals attnc's mask (at a small size of the same pattern)."""
    if sizes is None:
        small_n, small_sizes = min(n, 3000), None
    else:
        small_n, small_sizes = None, sizes
    ref = attnc.materialize_mask(f"stdlib:{name}", n=small_n, sizes=small_sizes, **params)[0]
    N = ref.shape[0]
    i = torch.arange(N)
    got = mask_mod(0, 0, i[:, None], i[None, :])
    assert torch.equal(got, ref), "FlexAttention mask_mod differs from the pattern"


def run(repeat: int, quick: bool = False) -> tuple[list[dict], list[dict]]:
    rows = []
    for label, name, params, n, sizes, tile, flex in QUICK_CASES if quick else CASES:
        pat = attnc.load(f"stdlib:{name}", **params)
        bound = E.bind_sizes(pat, n=n, sizes=sizes)
        first, _ = best_of(lambda pat=pat, bound=bound, tile=tile: classify_tiles(pat, bound, tile, tile), 1)
        ours, sched = best_of(lambda pat=pat, bound=bound, tile=tile: classify_tiles(pat, bound, tile, tile), repeat)
        row = dict(label=label, tokens=bound.n, tile=tile, first=first, ours=ours, full=sched.full, partial=sched.partial,
                   empty=sched.empty, exact=sched.exact, density_exact=sched.density_exact, density=sched.density, flex=None, flex_note="")
        if callable(flex):
            mask_mod = flex()
            check_flex_mask_mod(name, params, mask_mod, n, sizes)
            t, bm = best_of(lambda mm=mask_mod, N=bound.n: create_block_mask(mm, None, None, N, N, device="cpu",
                                                                            BLOCK_SIZE=128), repeat)
            row["flex"] = t
            full = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
            row["flex_note"] = f"Flex blocks: full {full}, partial {int(bm.kv_num_blocks.sum())}"
            if tile == (128,):  # same tiles: the two schedules must agree
                assert (full, int(bm.kv_num_blocks.sum())) == (sched.full, sched.partial), row
                row["flex_note"] += " (same as ours)"
        else:
            row["flex_note"] = flex.format(mem=memory_bytes() / 2**30)
        rows.append(row)
        print(f"{label}: classify_tiles {ours:.4f} s" + (f", Flex {row['flex']:.3f} s" if row["flex"] else ""), flush=True)
    dense_rows = []
    for label, name, params, n, sizes, tile in QUICK_DENSE_CASES if quick else DENSE_CASES:
        pat = attnc.load(f"stdlib:{name}", **params)
        bound = E.bind_sizes(pat, n=n, sizes=sizes)
        fast, sched = best_of(lambda pat=pat, bound=bound, tile=tile: classify_tiles(pat, bound, tile, tile), repeat)
        dense, ref = best_of(lambda pat=pat, bound=bound, tile=tile: classify_tiles_dense(pat, bound, tile, tile), 1)
        assert torch.equal(sched.classes(), ref.classes())
        # the same case timed above: keep the best of all its runs
        fast = min([fast] + [r["ours"] for r in rows if r["label"] == label and r["tile"] == tile])
        dense_rows.append(dict(label=label, tile=tile, fast=fast, dense=dense))
        print(f"{label}: classify_tiles_dense {dense:.2f} s vs classify_tiles {fast:.4f} s", flush=True)
    return rows, dense_rows


def report(rows, dense_rows, repeat: int) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        "# Schedule building (CPU)",
        "",
        f"- date: {today}; machine: {platform.machine()}, {cpu_name()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {memory_bytes() / 2**30:.0f} GB; python {platform.python_version()}; "
        f"torch {torch.__version__}; load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores, "
        f"so times vary run to run)",
        f"- `classify_tiles` builds the TileSchedule (FULL/PARTIAL lists and transposed lists); "
        f"FlexAttention: `create_block_mask(mask_mod, None, None, N, N, device=\"cpu\", BLOCK_SIZE=128)` "
        f"with a hand-written mask_mod checked against the pattern; best of {repeat} after the "
        f"first call (shown separately: it pays one-time allocation and warm-up costs).",
        "",
        "| case | tokens | tile | classify_tiles (s) | first call (s) | Flex create_block_mask (s) | Flex / ours "
        "| full / partial / empty | exact | density exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flex = f"{r['flex']:.3f}" if r["flex"] is not None else "-"
        ratio = f"{r['flex'] / r['ours']:.0f}x" if r["flex"] is not None else "-"
        lines.append(f"| {r['label']} | {r['tokens']:,} | {'x'.join(map(str, r['tile']))} | {r['ours']:.4f} | {r['first']:.4f} | {flex} | "
                     f"{ratio} | {r['full']:,} / {r['partial']:,} / {r['empty']:,} | {r['exact']} | {r['density_exact']} |")
    lines += ["", "Notes:"]
    for r in rows:
        lines.append(f"- {r['label']}: density {r['density']:.5f} (FLOP-wise bound {1 / r['density']:.2f}x); "
                     f"{r['flex_note']}.")
    lines.append("- 2-D case: Flex uses 1-D blocks of 128 flat tokens, ours 8x16 boxes (both 128 tokens), so the "
                 "block counts differ by design.")
    lines += ["", "Brute force (`classify_tiles_dense`, every token pair evaluated), same result checked:", "",
              "| case | tile | classify_tiles_dense (s) | classify_tiles (s) | ratio |", "|---|---|---|---|---|"]
    for r in dense_rows:
        lines.append(f"| {r['label']} | {'x'.join(map(str, r['tile']))} | {r['dense']:.2f} | {r['fast']:.4f} | "
                     f"{r['dense'] / r['fast']:.0f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Flex and the brute force at 8K tokens and 64x64")
    ap.add_argument("--out", help="default benchmarks/results/schedule-cpu-DATE.md (--quick: no file)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if create_block_mask is None:  # pragma: no cover
        raise SystemExit("this benchmark needs torch.nn.attention.flex_attention")
    rows, dense_rows = run(args.repeat, args.quick)
    text = report(rows, dense_rows, args.repeat)
    print(text)
    default = f"benchmarks/results/schedule-cpu-{datetime.date.today().isoformat()}.md"
    out = args.out or (None if args.quick else default)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
