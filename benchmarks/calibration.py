"""Calibration of the cost model against published measurements.

    python benchmarks/calibration.py            # write the predicted-vs-published table
    python benchmarks/calibration.py --fit      # re-derive compiler.cost.calibration.ARCH_FITS and SDPA_FITS (prints them)

Cost on a 2-core CPU: about half a minute (measured 2026-11-25: 63 s wall, 31 s CPU on a machine
loaded 7x by other jobs); ``--quick`` is accepted and runs the same; ``--fit`` searches the fits
(not measured: minutes). Without ``--out`` the table goes to benchmarks/results/calibration-DATE.md.

Dense: the model's dense forward / backward throughput (``compiler.cost.simulator.
dense_tflops``) beside every point of ``compiler.cost.published.DENSE`` (what
``ARCH_FITS`` is fitted to), with the relative error. Points measured on
FlashAttention-2's CUDA kernel are predicted as that kernel runs (one backward
kernel of 5 matmuls, ``Calibration(bwd_matmuls=(0, 5))``); attnc's own
backward (7 matmuls in two kernels) is listed beside them.

Measured (attnc's GPU suite on a lent H100, ``compiler.cost.published.MEASURED``):
SDPA's dense timings, which ``SDPA_FITS`` (the simulator's dense baseline) is
fitted to, and attnc's kernels at the tiles that ran, beside the predictions.

Sparse (validation only, never fitted): the simulator's predicted forward
speedup over SDPA's dense kernel for the NATTEN / GNA cases of
``compiler.cost.published.SPARSE`` (H100, head dim 128), beside the published
kernel-only speedups over cuDNN's.
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
from attnc.compiler.cost.calibration import ARCH_FITS, SDPA_FITS, ArchFit, Calibration
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.model import predict_sdpa
from attnc.compiler.cost.published import (
    DENSE,
    MEASURED,
    SPARSE,
    DensePoint,
    MeasuredCase,
    calibration_for,
)
from attnc.compiler.cost.simulator import best_dense, dense_tflops

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
        cand = dataclasses.replace(start, forward=round(f, 3), backward=round(b, 3), cta_overhead_s=ov)
        loss = _loss(points, {arch: cand})
        if best is None or loss < best[1]:
            best = (cand, loss)
    return best


def _sdpa_ms(case: MeasuredCase, fits: dict | None = None) -> tuple[float, float]:
    """SDPA's modelled (forward, forward + backward) at a measured case, milliseconds."""
    p = predict_sdpa(case.tokens, case.tokens, case.heads, get_hardware(case.hardware), head_dim=case.head_dim,
                     fits=fits)
    return p.forward.time_s * 1e3, (p.forward.time_s + p.backward.time_s) * 1e3


def fit_sdpa(arch: str, overheads=(0.25e-6, 0.5e-6, 1.0e-6, 2.0e-6)) -> tuple[ArchFit, float] | None:
    """Least squares on log time over the measured SDPA timings of ``arch``: the forward fraction
    (golden section) for each CTA overhead on a grid, then the backward's (forward + backward less the
    forward). None where nothing was measured."""
    cases = [c for c in MEASURED if get_hardware(c.hardware).arch == arch]
    if not cases:
        return None
    fwd = lambda fit: sum(math.log(_sdpa_ms(c, {arch: fit})[0] / c.sdpa_forward_ms) ** 2 for c in cases)  # noqa: E731
    bwd = lambda fit: sum(math.log((_sdpa_ms(c, {arch: fit})[1] - _sdpa_ms(c, {arch: fit})[0])  # noqa: E731
                                   / (c.sdpa_fwd_bwd_ms - c.sdpa_forward_ms)) ** 2 for c in cases)
    best = None
    for ov in overheads:
        f = _golden(lambda x, ov=ov: fwd(ArchFit(x, 0.5, ov)), 0.2, 0.95)
        b = _golden(lambda x, ov=ov, f=f: bwd(ArchFit(f, x, ov)), 0.2, 0.95)
        cand = ArchFit(round(f, 3), round(b, 3), ov)
        loss = fwd(cand) + bwd(cand)
        if best is None or loss < best[1]:
            best = (cand, loss)
    return best


def measured_table() -> list[str]:
    """The measured GPU-suite cases beside the model: SDPA (fitted) and attnc's kernels at the tiles
    that ran (judged where not host-bound)."""
    lines = ["| case | sizes | kernel | forward ms | predicted | error | fwd+bwd ms | predicted | error | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in MEASURED:
        sizes = dict(c.sizes)
        kw = {"n": sizes.pop("seq")} if "seq" in sizes else {"sizes": sizes}
        rep = attnc.simulate(f"stdlib:{c.pattern}", heads=c.heads, head_dim=c.head_dim, hardware=c.hardware,
                             q_tile=c.q_tile, kv_tile=c.kv_tile, **kw, **c.params)
        af, afb = rep.best.forward_s * 1e3, (rep.best.forward_s + rep.best.backward_s) * 1e3
        sf, sfb = _sdpa_ms(c)
        sz = "x".join(str(v) for v in c.sizes.values())
        note = "host-bound: not judged (see MeasuredCase)" if c.host_bound else ""
        lines.append(f"| {c.name} | {sz} | attnc | {c.attnc_forward_ms:g} | {af:.3f} | {_pct(af, c.attnc_forward_ms)} "
                     f"| {c.attnc_fwd_bwd_ms:g} | {afb:.3f} | {_pct(afb, c.attnc_fwd_bwd_ms)} | {note} |")
        lines.append(f"| {c.name} | {sz} | SDPA | {c.sdpa_forward_ms:g} | {sf:.3f} | {_pct(sf, c.sdpa_forward_ms)} "
                     f"| {c.sdpa_fwd_bwd_ms:g} | {sfb:.3f} | {_pct(sfb, c.sdpa_fwd_bwd_ms)} | fitted |")
    return lines


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
    ap.add_argument("--quick", action="store_true",
                    help="accepted for uniformity: the full run already takes under a minute, --quick runs the same")
    ap.add_argument("--out", default=os.path.join(HERE, "results",
                                                  f"calibration-{datetime.date.today().isoformat()}.md"))
    args = ap.parse_args(argv)
    if args.fit:
        for arch in sorted({p.arch for p in DENSE}):
            t = time.time()
            found, loss = fit(arch)
            n = sum(p.arch == arch for p in DENSE)
            print(f"{arch}: {found}  rms log error {math.sqrt(loss / n):.3f}  ({time.time() - t:.0f} s)", flush=True)
            if found != ARCH_FITS.get(arch):
                print(f"  compiler/cost/calibration.py ARCH_FITS[{arch!r}] is {ARCH_FITS.get(arch)}: update it", file=sys.stderr)
        for arch in sorted({get_hardware(c.hardware).arch for c in MEASURED}):
            found, loss = fit_sdpa(arch)
            print(f"SDPA {arch}: {found}  loss {loss:.4f}", flush=True)
            if found != SDPA_FITS.get(arch):
                print(f"  compiler/cost/calibration.py SDPA_FITS[{arch!r}] is {SDPA_FITS.get(arch)}: update it", file=sys.stderr)
        return 0
    dense, worst = dense_table()
    head = [f"# Cost-model calibration ({datetime.date.today().isoformat()})", "",
           "Generated by `python benchmarks/calibration.py`. Fits: `compiler/cost/calibration.py` `ARCH_FITS` "
           + ", ".join(f"{a}: forward {f.forward}, backward {f.backward}, CTA overhead {f.cta_overhead_s * 1e6:g} us"
                       for a, f in ARCH_FITS.items()) + ".",
           "", "## Dense throughput: fitted points (predicted vs published)", "",
           "TFLOP/s in FlashAttention's convention (forward 4BHN^2D, backward 2.5x). `kernel` is what the published "
           "figure measured and what the prediction models (`fa2`: one backward kernel of 5 matmuls); the last "
           "numeric column is attnc's own kernels (backward: 7 matmuls in a dQ and a dK/dV kernel). "
           "Batch x N = 16k tokens, 2048 / d heads, BF16.", "", *dense, "",
           f"Largest relative error over the fitted points: {100 * worst:.1f}%.", "",
           "## Measured on an H100: attnc's GPU suite (compiler/cost/published.py MEASURED)", "",
           "SDPA's dense kernel, the simulator's dense baseline (`SDPA_FITS`: "
           + ", ".join(f"{a}: forward {f.forward}, backward {f.backward}" for a, f in SDPA_FITS.items())
           + "), and attnc's kernels at the tiles that ran (the sm90 mask hidden: `mask_exposed` "
           f"{ARCH_FITS['sm90'].mask_exposed:g}). bf16, d 128, 8 heads, batch 1.", "", *measured_table(), "",
           "## Sparse speedups: validation (not fitted)", "",
           "H100, head dim 128, 16 heads, BF16. Published: kernel-only forward speedup over cuDNN dense; predicted: "
           "the simulator's forward (and backward) speedup over SDPA's dense kernel (`SDPA_FITS`).", ""]
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
