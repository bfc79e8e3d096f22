"""The simulator: how fast a pattern can be, before any GPU time is spent.

``simulate`` (``attnc.simulate``) binds the sizes, searches schedules
(``compiler.cost.search``) and reports the three figures a user wants:

- ``flop_bound`` = 1 / density: the speedup over dense attention if only the
  allowed (query, key) pairs cost anything;
- ``tile_bound`` = all tile pairs / visited tile pairs of the chosen schedule:
  what block sparsity at that tile shape can give at best;
- ``predicted_speedup``: the cost model's dense time over the chosen
  schedule's time, forward and backward, on the hardware model.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field

from ...core import ir, route_kinds
from ..analysis import evaluate as E
from . import route_selection
from .hardware import Hardware
from .model import (
    PUBLISHED_BWD_FLOP_RATIO,
    Calibration,
    KernelConfig,
    Prediction,
    dtype_bytes,
    predict_dense,
    predict_sdpa,
    smem_fits,
)
from .search import (
    KV_TOKENS,
    Q_TOKENS,
    STAGES,
    WARPS,
    Candidate,
    ScheduleSearch,
    check_simulation_size,
)


def _finite(x: float):
    return x if math.isfinite(x) else None


class ReportView:
    """What every simulator report offers on top of ``to_dict()``: ``report[key]``,
    JSON, and a readable table (``format_table``)."""

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        return self.format_table()


@dataclass
class SimulationReport(ReportView):
    """What ``attnc.simulate`` returns. ``to_dict()`` holds every figure;
    ``report["flop_bound"]`` reads one; ``str(report)`` is a readable table."""

    pattern: str
    sizes: dict
    n: int
    nk: int
    heads: int
    head_dim: int
    batch: int
    dtype: str
    hardware: Hardware
    density: float
    best: Candidate
    top: list[Candidate]
    dense_forward_s: float
    dense_backward_s: float
    assumptions: list[str] = field(default_factory=list)
    density_exact: bool = False
    #: Allowed (head, query, key) token pairs: an exact int when ``density_exact``, else an estimate.
    allowed_pairs: int | float = 0
    #: All (head, query, key) token pairs.
    total_pairs: int = 0
    #: K/V heads shared by the query heads (grouped-query attention): ``heads`` when each has its own.
    kv_heads: int | None = None
    #: Whether the chosen schedule fits the GPU's shared memory and registers (``ScheduleSearch.fits``): False for
    #: tiles forced where no launch of the kernels fits, or where no schedule the search tries does.
    fits: bool = True
    #: Where the forced schedule does not fit: the search's own pick (None where that does not fit either).
    search_pick: Candidate | None = None

    @property
    def schedule(self):
        """The chosen ``TileSchedule``."""
        return self.best.schedule

    @property
    def flop_bound(self) -> float:
        if not self.allowed_pairs:
            return math.inf
        return self.total_pairs / self.allowed_pairs  # exact counts divided once

    @property
    def tile_bound(self) -> float:
        s = self.best.schedule
        total = s.num_heads * s.num_q_tiles * s.num_kv_tiles
        return total / s.visited if s.visited else math.inf

    @property
    def work(self) -> float | None:
        """The token pairs the chosen schedule computes (the area of its visited tiles, partial ones whole) over
        all pairs: a schedule's figure, unlike ``density``, the pattern's. None for a sampled summary."""
        area = visited_area(self.best.schedule)
        return None if area is None else area / self.best.schedule.total_pairs

    @property
    def predicted_speedup(self) -> float:
        return self.dense_forward_s / self.best.forward_s

    @property
    def predicted_speedup_backward(self) -> float:
        return self.dense_backward_s / self.best.backward_s

    def to_dict(self) -> dict:
        s = self.best.schedule
        total = s.num_heads * s.num_q_tiles * s.num_kv_tiles
        return {
            "pattern": self.pattern,
            "n": self.n,
            "nk": self.nk,
            "sizes": dict(self.sizes),
            "heads": self.heads,
            "kv_heads": self.heads if self.kv_heads is None else self.kv_heads,
            "head_dim": self.head_dim,
            "batch": self.batch,
            "dtype": self.dtype,
            "density": self.density,
            "allowed_pairs": self.allowed_pairs,
            "total_pairs": self.total_pairs,
            "density_exact": bool(s.density_exact) or self.density_exact,
            "flop_bound": _finite(self.flop_bound),
            "work": self.work,
            "tile_bound": _finite(self.tile_bound),
            "predicted_speedup": self.predicted_speedup,
            "predicted_speedup_backward": self.predicted_speedup_backward,
            "predicted": {
                "forward_s": self.best.forward_s,
                "backward_s": self.best.backward_s,
                "dense_forward_s": self.dense_forward_s,
                "dense_backward_s": self.dense_backward_s,
            },
            "tiles": {
                "q_tile": list(s.q_tile),
                "kv_tile": list(s.kv_tile),
                "full": s.full,
                "partial": s.partial,
                "empty": s.empty,
                "total": total,
                "exact": bool(s.exact),
            },
            "schedule": self.best.to_dict(),
            "top": [c.to_dict() for c in self.top],
            "hardware": self.hardware.to_dict(),
            "fits": self.fits,
            **({"search_pick": self._pick_dict()} if self.search_pick is not None else {}),
            "assumptions": list(self.assumptions),
        }

    def _pick_dict(self) -> dict:
        pick = self.search_pick
        return {"q_tile": list(pick.config.q_tile), "kv_tile": list(pick.config.kv_tile),
                "forward_s": pick.forward_s, "backward_s": pick.backward_s,
                "predicted_speedup": self.dense_forward_s / pick.forward_s,
                "predicted_speedup_backward": self.dense_backward_s / pick.backward_s}

    def format_table(self) -> str:
        return format_report(self)


def simulate_pattern(pat: ir.PatternIR, bound: E.Bound, hw: Hardware, *, head_dim: int, batch: int, dtype: str,
                     q_tile=None, kv_tile=None, inputs: dict | None = None, top: int = 5,
                     calibration: Calibration | None = None, kv_heads: int | None = None) -> SimulationReport:
    check_simulation_size(pat, bound)
    search = ScheduleSearch(pat, bound, hw, head_dim=head_dim, batch=batch, nbytes=dtype_bytes(dtype), inputs=inputs,
                            calibration=calibration, kv_heads=kv_heads)
    ranked = search.run(q_tile, kv_tile, top=0)
    best = ranked[0]
    fits, pick = search.fits(best.config), None
    forced = q_tile is not None or kv_tile is not None
    if not fits and forced:  # what the search picks instead, where that fits
        pick = search.run(None, None, top=1)[0]
        pick = pick if search.fits(pick.config) else None
    # the top few, one per (tile shapes, layout): warps/stages variants of one schedule are the autotuner's job
    seen, shown = set(), []
    for c in ranked:
        key = (c.config.q_tile, c.config.kv_tile, c.config.layout)
        if key not in seen:
            seen.add(key)
            shown.append(c)
        if len(shown) == top:
            break
    sdpa = predict_sdpa(math.prod(search.q_ext), math.prod(search.kv_ext), bound.heads, hw, head_dim=head_dim,
                        batch=batch, nbytes=dtype_bytes(dtype))
    assumptions = ["MMA fractions fitted to published dense FA2-class throughput (A100, H100; compiler/cost/published.py); "
                   "other cost constants are estimates (compiler/cost/model.py, Calibration)",
                   "dense baseline: torch's scaled_dot_product_attention on this GPU (its fused dense kernel, "
                   + ("fitted to SDPA measured on an H100" if hw.arch == "sm90" else
                      "FlashAttention-2's published throughput" if hw.arch == "sm80" else
                      "assumed to attain the H100 fit's fractions: no measurement on this GPU")
                   + "; compiler/cost/model.py SDPA_FITS)"]
    route_kind = None if pat.route is None else route_kinds.kind_of(pat.route)
    if route_kind is not None:
        selection = search.selection()
        chosen = ("from the given scores" if selection.given else
                  "every unit its mask reaches (an upper bound of what the threshold keeps)"
                  if route_kind.count(pat.route.params) is None else
                  "the nearest units standing in for the best-scored (the data decides)")
        assumptions.append(
            f"routing ({route_kind.title}) is modelled per query on the route's own "
            + ("keys" if pat.route.tokens else "key blocks")
            + f": the units keep forces, then {chosen}; density counts the attended (query, key) pairs, "
            "whatever the tiles" + ("" if selection.exact else " (estimated: another choice attends another "
                                    "number of pairs)" if selection.stride == 1 else "")
            + "; the tile counts, times and work count the tiles holding an attended pair")
        if selection.stride > 1:
            assumptions.append(
                f"routing: every {selection.stride}th query is modelled, standing for the {selection.stride - 1} "
                f"after it (more than {route_selection.SELECT_PAIRS} token pairs per head class); density and "
                "tiles are estimated")
        if pat.route.tokens:
            assumptions.append(
                "token route: the tiled kernels visit a KV tile where any query of the Q tile kept a key in it; "
                "queries of one tile that keep scattered keys visit more tiles than the nearest keys modelled here")
    if any(d.derived is not None and d.derived[0] == "landmark" for d in pat.inputs):
        assumptions.append(
            "landmark(): its gate table is made by torch outside the kernels from every q . k (a pass the size of "
            "dense attention's scores, forward and backward), not modelled")
    if not fits:
        cfg = best.config
        where = f"the {hw.name}'s shared memory or registers at any warps and stages (compiler/cost/pass_sizing.py)"
        if pick is not None:
            p = pick.config
            assumptions.insert(0, (
                f"the forced schedule (Q {_shape(cfg.q_tile)}, KV {_shape(cfg.kv_tile)}) does not fit {where}: its "
                "prediction is of kernels that cannot launch as modelled; the search picks "
                f"Q {_shape(p.q_tile)}, KV {_shape(p.kv_tile)} instead, predicted forward "
                f"{_x(sdpa.forward.time_s / pick.forward_s)}, backward {_x(sdpa.backward.time_s / pick.backward_s)}"))
        else:
            assumptions.insert(0, (
                f"{'the forced schedule' if forced else 'no schedule the search tries'} "
                f"(Q {_shape(cfg.q_tile)}, KV {_shape(cfg.kv_tile)}) fits {where}"
                + (", nor does any the search tries" if forced else "")
                + ": the prediction is of kernels that cannot launch as modelled"))
    counted = best.schedule
    if not counted.density_exact and pat.route is None:
        exact = search.exactly_counted()
        samples = getattr(best.schedule, "q_row_weights", None)  # a TileSummary's: its tile counts are sampled too
        if exact is None and samples is None:
            assumptions.append("density estimated from sampled queries")
        elif exact is None:
            assumptions.append(
                f"density and tile counts estimated from {len(samples)} sampled Q tiles (the first and last as "
                "themselves, each other one for its share of the tiles between): a mask that repeats with the "
                "samples' stride can alias; the bounds are exact below 2^24 tile pairs")
        else:
            counted = exact
    allowed, total = counted.allowed_total, counted.total_pairs
    return SimulationReport(pat.name, dict(bound.axis_sizes), bound.n, bound.nk, bound.heads, head_dim, batch, dtype,
                            hw, _ratio(allowed, total), best, shown, sdpa.forward.time_s,
                            sdpa.backward.time_s, assumptions, density_exact=bool(counted.density_exact),
                            allowed_pairs=allowed, total_pairs=total, kv_heads=search.kv_heads, fits=fits,
                            search_pick=pick)


def dense_configs(hw: Hardware, head_dim: int, nbytes: int = 2) -> list[KernelConfig]:
    """The search's candidate dense configurations (tiles, warps, stages) that fit ``hw``."""
    configs = [KernelConfig((tq,), (tk,), "flat", warps, stages)
               for tq, tk, warps, stages in itertools.product(Q_TOKENS, KV_TOKENS, WARPS, STAGES) if tk <= tq]
    return [c for c in configs if smem_fits(c, head_dim, nbytes, hw)]


def best_dense(seqlen: int, hw: Hardware, *, head_dim: int, heads: int, batch: int = 1, nbytes: int = 2,
               calibration: Calibration | None = None,
               configs: list[KernelConfig] | None = None) -> tuple[Prediction, Prediction]:
    """The fastest dense configurations (forward, backward) of ``configs`` (default:
    the search's candidates, as ``ScheduleSearch.dense`` picks a pattern's dense baseline)."""
    preds = [predict_dense(seqlen, seqlen, heads, cfg, hw, head_dim=head_dim, batch=batch, nbytes=nbytes,
                           calibration=calibration)
             for cfg in (configs if configs is not None else dense_configs(hw, head_dim, nbytes))]
    return min(preds, key=lambda p: p.forward.time_s), min(preds, key=lambda p: p.backward.time_s)


def dense_tflops(seqlen: int, hw: Hardware, *, head_dim: int, heads: int, batch: int = 1, nbytes: int = 2,
                 calibration: Calibration | None = None,
                 configs: list[KernelConfig] | None = None) -> tuple[float, float]:
    """Predicted dense attention throughput (forward, backward) in TFLOP/s, in the
    convention published figures use (forward 4 B H N^2 D flops, backward 2.5x
    that), whatever the kernels execute: comparable with FlashAttention's tables."""
    fwd, bwd = best_dense(seqlen, hw, head_dim=head_dim, heads=heads, batch=batch, nbytes=nbytes,
                          calibration=calibration, configs=configs)
    flops = 4.0 * batch * heads * seqlen * seqlen * head_dim
    return flops / fwd.forward.time_s / 1e12, PUBLISHED_BWD_FLOP_RATIO * flops / bwd.backward.time_s / 1e12


def visited_area(sched) -> int | None:
    """(head, query, key) pairs of every visited tile pair of a listed schedule, padding left out; None for a
    sampled summary (no lists)."""
    if not hasattr(sched, "pairs"):
        return None
    _, qi, ki, _ = sched.pairs()
    area = int((sched.q_tile_tokens()[qi] * sched.kv_tile_tokens()[ki]).sum())
    return area * (sched.num_heads if sched.heads_stored == 1 else 1)


def _ratio(a: int | float, b: int) -> float:
    """a / b in float64: correctly rounded for ints (Python's int division)."""
    return a / b if isinstance(a, int) else float(a) / float(b)


def _us(s: float) -> str:
    return f"{s * 1e6:,.1f} us" if s < 1e-2 else f"{s * 1e3:,.2f} ms"


def _x(v) -> str:
    return "inf" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _shape(t) -> str:
    return "x".join(str(x) for x in t)


def format_report(rep: SimulationReport) -> str:
    d = rep.to_dict()
    hw = rep.hardware
    size = ", ".join(f"{k}={v}" for k, v in rep.sizes.items()) or f"n={rep.n}"
    tiles = d["tiles"]
    lines = [
        f"{rep.pattern}: simulated on the {hw.name} model in {rep.dtype} (a prediction, not a measurement): "
        f"{size} ({rep.n} queries x {rep.nk} keys), heads {rep.heads}"
        + ("" if d["kv_heads"] == rep.heads else f" sharing {d['kv_heads']} K/V head" + ("s" if d["kv_heads"] > 1 else "")
           + (f" (dK/dV: each K/V head's query heads over {rep.best.prediction.group_split} programs)"
              if rep.best.prediction.group_split > 1 else ""))
        + f", head_dim {rep.head_dim}, batch {rep.batch}",
        f"hardware: {hw.name} ({hw.sms} SMs, {hw.tensor_tflops:g} TFLOP/s dense, {hw.hbm_gbps:g} GB/s, "
        f"{hw.smem_per_sm_kib} KiB smem/SM)",
        "",
        f"  density              {rep.density:.4f}" + ("" if d["density_exact"] else " (estimated)"),
        f"  FLOP-wise bound      {_x(rep.flop_bound)}" + ("" if d["density_exact"] else " (estimated)"),
        *([] if rep.work is None else [f"  work                 {rep.work:.4f}   (the visited tiles' pairs over all: "
                                        "the schedule's, partial tiles whole)"]),
        f"  tile-wise bound      {_x(rep.tile_bound)}   (Q {_shape(tiles['q_tile'])}, KV {_shape(tiles['kv_tile'])}: "
        + ("" if tiles["exact"] else "estimated, about ")
        + f"{tiles['full']} full, {tiles['partial']} partial, {tiles['empty']} empty of {tiles['total']})",
        f"  predicted speedup    (over SDPA dense) forward {_x(rep.predicted_speedup)}, backward {_x(rep.predicted_speedup_backward)}",
        f"  predicted time       forward {_us(rep.best.forward_s)} (SDPA dense {_us(rep.dense_forward_s)}), "
        f"backward {_us(rep.best.backward_s)} (SDPA dense {_us(rep.dense_backward_s)})",
        *([] if rep.fits else [
            f"  schedule fits        no: over the {hw.name}'s shared memory or registers"
            + (f" (the search picks Q {_shape(rep.search_pick.config.q_tile)}, KV "
               f"{_shape(rep.search_pick.config.kv_tile)}: forward {_x(d['search_pick']['predicted_speedup'])}; "
               "see the note)" if rep.search_pick is not None else " (see the note)")]),
        "",
        "  top schedules (by predicted forward time):",
        f"  {'#':>2} {'q tile':>10} {'kv tile':>10} {'layout':>8} {'warps':>5} {'stages':>6} {'forward':>12} "
        f"{'backward':>12} {'balance':>7} {'partial':>8}",
    ]
    for i, c in enumerate(rep.top, 1):
        cfg = c.config
        lines.append(f"  {i:>2} {_shape(cfg.q_tile):>10} {_shape(cfg.kv_tile):>10} {cfg.layout:>8} {cfg.num_warps:>5} "
                     f"{cfg.num_stages:>6} {_us(c.forward_s):>12} {_us(c.backward_s):>12} "
                     f"{c.prediction.forward.balance:>7.2f} {c.schedule.partial:>8}")
    if rep.assumptions:
        lines.append("")
        lines += [f"  note: {a}" for a in rep.assumptions]
    return "\n".join(lines)


__all__ = ["SimulationReport", "best_dense", "dense_configs", "dense_tflops", "format_report", "simulate_pattern",
           "visited_area"]
