"""Calibration of the cost model against published measurements.

    python benchmarks/calibration.py            # write the predicted-vs-published table
    python benchmarks/calibration.py --fit      # re-derive compiler.cost.ARCH_FITS (prints them; a minute)

Dense: the model's dense forward / backward throughput (``compiler.simulator.
dense_tflops``) beside every point of ``compiler.published.DENSE`` (what
``ARCH_FITS`` is fitted to), with the relative error. Points measured on
FlashAttention-2's CUDA kernel are predicted as that kernel runs (one backward
kernel of 5 matmuls, ``Calibration(bwd_matmuls=(0, 5))``); attnc's own
backward (7 matmuls in two kernels) is listed beside them.

Sparse (validation only, never fitted): the simulator's predicted forward
speedup over its own dense baseline for the NATTEN / GNA cases of
``compiler.published.SPARSE`` (H100, head dim 128), beside the published
kernel-only speedups.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import sys
import time

import attnc
from attnc.compiler.cost import ARCH_FITS, ArchFit, Calibration
from attnc.compiler.hardware import get_hardware
from attnc.compiler.published import DENSE, SPARSE, DensePoint, calibration_for
from attnc.compiler.simulator import best_dense, dense_tflops

HERE = os.path.dirname(os.path.abspath(__file__))


def predicted(point: DensePoint, fits: dict | None = None, *, as_attnc: bool = False, configs=None) -> float:
    """The model's TFLOP/s at a published point (``as_attnc``: attnc's own kernels),
    the best of ``configs`` (default: every candidate dense configuration)."""
    cal = Calibration(arch=dict(fits if fits is not None else ARCH_FITS)) if as_attnc else calibration_for(point, fits)
    fwd, bwd = dense_tflops(point.seqlen, get_hardware(point.hardware), head_dim=point.head_dim, heads=point.heads,
                            batch=point.batch, calibration=cal, configs=configs)
    return fwd if point.passname == "forward" else bwd


def _best_configs(points, fits) -> dict:
    """Per point, the configuration the full search picks under ``fits`` (the fit then
    evaluates only that one: 24x cheaper; the final table re-runs the full search)."""
    out = {}
    for p in points:
        hw = get_hardware(p.hardware)
        f, b = best_dense(p.seqlen, hw, head_dim=p.head_dim, heads=p.heads, batch=p.batch,
                          calibration=calibration_for(p, fits))
        out[p] = [f.config if p.passname == "forward" else b.config]
    return out


def _loss(points, fits, configs: dict | None = None) -> float:
    return sum(math.log(predicted(p, fits, configs=(configs or {}).get(p)) / p.tflops) ** 2 for p in points)


def _golden(f, lo: float, hi: float, iters: int = 14) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit(arch: str, overheads=(0.25e-6, 0.5e-6, 1.0e-6, 1.5e-6, 2.0e-6, 3.0e-6)) -> tuple[ArchFit, float]:
    """Least squares on log throughput over the arch's published points: the
    forward and backward fractions for each CTA overhead on a grid (golden
    section), the overhead with the smallest total loss. An arch whose points
    are all at one length cannot tell the overhead apart: it keeps the default."""
    points = [p for p in DENSE if p.arch == arch]
    fwd_pts = [p for p in points if p.passname == "forward"]
    bwd_pts = [p for p in points if p.passname == "backward"]
    if len({p.seqlen for p in points}) == 1:
        overheads = (Calibration().cta_overhead_s,)
    best = None
    start = ARCH_FITS.get(arch, ArchFit(0.5, 0.5, Calibration().cta_overhead_s))
    for ov in overheads:
        base = dataclasses.replace(start, cta_overhead_s=ov)
        cfgs = _best_configs(points, {arch: base})
        f = _golden(lambda x, base=base, cfgs=cfgs: _loss(fwd_pts, {arch: dataclasses.replace(base, forward=x)}, cfgs),
                    0.1, 0.95)
        b = _golden(lambda x, base=base, f=f, cfgs=cfgs: _loss(
            bwd_pts, {arch: dataclasses.replace(base, forward=f, backward=x)}, cfgs), 0.1, 0.95)
        cand = ArchFit(round(f, 3), round(b, 3), ov)
        loss = _loss(points, {arch: cand})
        if best is None or loss < best[1]:
            best = (cand, loss)
    return best


def _pct(pred: float, pub: float) -> str:
    return f"{100 * (pred - pub) / pub:+.1f}%"


def dense_table() -> tuple[list[str], float]:
    lines = ["| arch | pass | kernel | d | N | published TFLOP/s | predicted | error | attnc kernels (predicted) | source |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    worst = 0.0
    for p in DENSE:
        pred = predicted(p)
        own = predicted(p, as_attnc=True)
        worst = max(worst, abs(pred - p.tflops) / p.tflops)
        lines.append(f"| {p.hardware} | {p.passname} | {p.kernel} | {p.head_dim} | {p.seqlen} | {p.tflops:g} | "
                     f"{pred:.0f} | {_pct(pred, p.tflops)} | {own:.0f} | {p.source} |")
    return lines, worst


def sparse_table(progress=None) -> list[str]:
    """The validation rows; ``progress(lines)`` is called after each case (the file is
    rewritten as cases finish: the large grids take minutes each)."""
    lines = ["| pattern | sizes | parameters | FLOP bound | published speedup | predicted forward | error | "
             "predicted backward | tiles (q / kv) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in SPARSE:
        sizes = dict(s.sizes)
        kw = {"n": sizes.pop("seq")} if "seq" in sizes else {"sizes": sizes}
        rep = attnc.simulate(f"stdlib:{s.pattern}", hardware="h100", head_dim=128, heads=16, **kw, **s.params)
        sz = "x".join(str(v) for v in s.sizes.values())
        par = ", ".join(f"{k}={v}" for k, v in s.params.items())
        tiles = rep.to_dict()["tiles"]
        lines.append(f"| {s.pattern} | {sz} | {par} | {rep.flop_bound:.1f}x | {s.speedup:g}x | "
                     f"{rep.predicted_speedup:.1f}x | {_pct(rep.predicted_speedup, s.speedup)} | "
                     f"{rep.predicted_speedup_backward:.1f}x | "
                     f"{'x'.join(map(str, tiles['q_tile']))} / {'x'.join(map(str, tiles['kv_tile']))} |")
        print(lines[-1], flush=True)
        if progress is not None:
            progress(lines)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", action="store_true", help="re-derive the per-arch fits and print them")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "calibration-2026-11-22.md"))
    args = ap.parse_args(argv)
    if args.fit:
        for arch in sorted({p.arch for p in DENSE}):
            t = time.time()
            found, loss = fit(arch)
            n = sum(p.arch == arch for p in DENSE)
            print(f"{arch}: {found}  rms log error {math.sqrt(loss / n):.3f}  ({time.time() - t:.0f} s)", flush=True)
            if found != ARCH_FITS.get(arch):
                print(f"  compiler/cost.py ARCH_FITS[{arch!r}] is {ARCH_FITS.get(arch)}: update it", file=sys.stderr)
        return 0
    dense, worst = dense_table()
    head = [f"# Cost-model calibration ({datetime.date.today().isoformat()})", "",
           "Generated by `python benchmarks/calibration.py`. Fits: `compiler/cost.py` `ARCH_FITS` "
           + ", ".join(f"{a}: forward {f.forward}, backward {f.backward}, CTA overhead {f.cta_overhead_s * 1e6:g} us"
                       for a, f in ARCH_FITS.items()) + ".",
           "", "## Dense throughput: fitted points (predicted vs published)", "",
           "TFLOP/s in FlashAttention's convention (forward 4BHN^2D, backward 2.5x). `kernel` is what the published "
           "figure measured and what the prediction models (`fa2`: one backward kernel of 5 matmuls); the last "
           "numeric column is attnc's own kernels (backward: 7 matmuls in a dQ and a dK/dV kernel). "
           "Batch x N = 16k tokens, 2048 / d heads, BF16.", "", *dense, "",
           f"Largest relative error over the fitted points: {100 * worst:.1f}%.", "",
           "## Sparse speedups: validation (not fitted)", "",
           "H100, head dim 128, 16 heads, BF16. Published: kernel-only forward speedup over cuDNN dense; predicted: "
           "the simulator's forward (and backward) speedup over its own dense baseline.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    def write(sparse_lines, done=False):
        with open(args.out, "w") as f:
            f.write("\n".join([*head, *sparse_lines, "" if done else "(validation still running)", ""]))

    write([])
    print("\n".join(dense), flush=True)
    write(sparse_table(progress=write), done=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
