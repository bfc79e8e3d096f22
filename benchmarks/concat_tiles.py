"""Tile schedules of a text + video pattern on a concatenated layout against the same window on a
plain grid (counts, not timings: deterministic, independent of machine load).

The concatenation ``seq(text) + grid(t: frames, y: height, x: width)`` is a sequence to the schedule:
its tiles are 1-D runs of flat positions. The comparison points are the video block of the same
3-D window tiled (a) as boxes of the grid (``grid`` pattern, box tiles) and (b) as 1-D runs of its
row-major order (the grid's flat view), each plus the text rows and columns, which are dense.
"Visited" counts the token pairs of every FULL or PARTIAL tile pair (the work a tiled kernel does);
"allowed" the pairs the mask allows.

    python benchmarks/concat_tiles.py [--text 226 --grid 13 30 45 --window 3 7 7 --tile 128 --box 1 8 16]

Cost on a 2-core CPU: seconds (measured 2026-11-25: 16 s wall, 7 s CPU, most of it importing torch,
on a machine loaded 7x by other jobs); ``--quick`` is accepted and runs the same.
"""

from __future__ import annotations

import argparse
import time

import torch

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis.tiles import classify_tiles
from attnc.compiler.cost.search import flat_view

SPEC = """pattern text_video(kt = 3, ky = 7, kx = 7)
  tokens seq(text) + grid(t: frames, y: height, x: width)
  mask q in text or k in text or (window(t, kt) and window(y, ky) and window(x, kx))
"""


def visited_pairs(sched) -> int:
    """Token pairs in the visited (FULL or PARTIAL) tile pairs."""
    _, qi, ki, _ = sched.pairs()
    return int((sched.q_tile_tokens()[qi].to(torch.int64) * sched.kv_tile_tokens()[ki].to(torch.int64)).sum())


def row(name: str, sched, visited: int, allowed: int, seconds: float) -> str:
    return (f"| {name} | {sched.q_tile} x {sched.kv_tile} | {sched.full} | {sched.partial} | {sched.empty} | "
            f"{visited:,} | {visited / allowed:.3f} | {seconds:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=int, default=226)
    ap.add_argument("--grid", type=int, nargs=3, default=(13, 30, 45), metavar=("T", "Y", "X"))
    ap.add_argument("--window", type=int, nargs=3, default=(3, 7, 7), metavar=("KT", "KY", "KX"))
    ap.add_argument("--tile", type=int, default=128, help="1-D tile (queries and keys)")
    ap.add_argument("--box", type=int, nargs=3, default=(1, 8, 16), help="box tile of the plain grid")
    ap.add_argument("--quick", action="store_true",
                    help="accepted for uniformity: the full run already takes under a minute, --quick runs the same")
    args = ap.parse_args()
    kt, ky, kx = args.window
    F, H, W = args.grid
    G, text = F * H * W, args.text
    N = text + G
    sizes = {"frames": F, "height": H, "width": W}

    joint = attnc.load(SPEC, kt=kt, ky=ky, kx=kx)
    bound = E.bind_sizes(joint, sizes={**sizes, "text": text})
    start = time.perf_counter()
    sched = classify_tiles(joint, bound, (args.tile,), (args.tile,))
    t_joint = time.perf_counter() - start
    allowed = int(sched.allowed_pairs.sum()) if sched.density_exact else None

    grid = attnc.load("stdlib:neighborhood_3d", kernel_size_t=kt, kernel_size_y=ky, kernel_size_x=kx)
    gbound = E.bind_sizes(grid, sizes=sizes)
    start = time.perf_counter()
    box = classify_tiles(grid, gbound, tuple(args.box), tuple(args.box))
    t_box = time.perf_counter() - start
    view, vbound = flat_view(grid, gbound)
    start = time.perf_counter()
    flat = classify_tiles(view, vbound, (args.tile,), (args.tile,))
    t_flat = time.perf_counter() - start
    text_pairs = N * N - G * G  # text rows and columns: every pair allowed, dense
    video_allowed = int(box.allowed_pairs.sum())
    if allowed is None:
        allowed = video_allowed + text_pairs
    assert allowed == video_allowed + text_pairs, "the joint mask is the window plus the text rows and columns"

    print(f"text {text} + grid {F} x {H} x {W} = {N} tokens, window {kt} x {ky} x {kx}; "
          f"allowed pairs {allowed:,} (density {allowed / N / N:.4f})\n")
    print("| schedule | tiles | full | partial | empty | visited pairs | visited / allowed | classify s |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("concatenation, 1-D tiles", sched, visited_pairs(sched), allowed, t_joint))
    print(row("grid box tiles (+ text dense)", box, visited_pairs(box) + text_pairs, allowed, t_box))
    print(row("grid flat 1-D tiles (+ text dense)", flat, visited_pairs(flat) + text_pairs, allowed, t_flat))


if __name__ == "__main__":
    main()
