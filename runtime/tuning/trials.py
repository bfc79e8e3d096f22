"""The tuner's trials: the candidate configurations it times for one pattern and size.

The ``top`` distinct schedules of the simulator's ranking (``ScheduleSearch``), each crossed with the
launch parameters of each pass that fit (``candidates``), and beside the simulator's pick the variants
its model cannot weigh, for the GPU to decide: FlexAttention's wide-KV backward, TMA loads, a
warp-specialized forward and the backward in one kernel. ``for_device`` drops those a GPU cannot run
as timed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...compiler.analysis.schedule import TileSchedule
from ...compiler.codegen.triton.kernels import warp_specialized_form
from ...compiler.codegen.triton.tiles import ScheduleShape, boxes_are_rows
from ...compiler.cost.hardware import compute_capability
from ...compiler.cost.model import KernelConfig
from ...compiler.cost.pass_sizing import (
    PASSES,
    forward_fits,
    has_tma,
    is_wide_kv,
    pass_fits,
    tensor_memory,
    tma_fits,
)
from ...compiler.cost.search import STAGES, WARPS, ScheduleSearch
from ...core import ir

#: Distinct schedules (tile shapes + layout) taken from the simulator's ranking.
TOP = 4
#: The launch parameters each schedule is tried with.
LAUNCH: tuple[tuple[int, int], ...] = tuple((w, s) for w in WARPS for s in STAGES)
#: The first architecture the tuner times the backward in one kernel on (``atomic_dq_backward``). Offline
#: (Triton 3.6, bf16, the quick set): sm_90 adds dQ with four-wide atomics (16 a thread a tile pair at d 128)
#: and its kernels fit; sm_80's are scalar (64) and five of eight d 64 dK/dV kernels spilled 12-24 B at every
#: rung (benchmarks/results/atomic-dq-offline-2026-11-24.md).
MIN_ATOMIC_DQ_ARCH = 90


@dataclass
class Trial:
    """One timed candidate."""

    rank: int  # order of trial: the simulator's ranking of schedules, then launch parameters
    config: KernelConfig
    schedule: TileSchedule = field(repr=False)
    predicted_ms: float
    measured_ms: float = math.inf
    error: str | None = None
    backend: str = "triton"  # "flex": the FlexAttention lowering (config: the simulator's first, unused)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "config": self.config.to_dict(), "predicted_ms": _finite(self.predicted_ms),
                "measured_ms": _finite(self.measured_ms), "error": self.error, "backend": self.backend}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def candidates(search: ScheduleSearch, *, top: int = TOP, launch: Sequence[tuple[int, int]] = LAUNCH,
               nbytes: int = 2) -> list[Trial]:
    """The ``top`` distinct schedules of the simulator's ranking x the launch parameters of each
    pass: the simulator's own pick first within each schedule (sized for both passes by the
    search), then other forward (warps, stages) with the pick's backward, then other backward
    ones with the pick's forward; ones whose shared memory or registers do not fit a pass
    (``search.pass_fits``) are dropped, keeping at least the pick. Beside them, per schedule: the pick's
    FlexAttention backward orientation (Hopper and later), its TMA loads (where its tiles are whole runs of
    rows) and its backward in one kernel (``atomic_dq_backward``), each for the GPU to decide."""
    ranked = search.run(top=0)
    seen: dict[tuple, list] = {}
    for cand in ranked:
        shape = (cand.config.q_tile, cand.config.kv_tile, cand.config.layout)
        if shape not in seen:
            if len(seen) >= top:
                continue
            seen[shape] = []
        seen[shape].append(cand)
    trials: list[Trial] = []
    hw, d = search.hw, search.head_dim
    for cands in seen.values():
        first = cands[0]
        pick = first.config
        configs = [pick]
        # the forward's launch parameters with the pick's backward, then the backward's with the pick's forward
        for warps, stages in launch:
            cfg = dataclasses.replace(pick, num_warps=warps, num_stages=stages)
            if cfg not in configs and forward_fits(cfg, d, nbytes, hw, search.score_tiles):
                configs.append(cfg)
        # the backward's own tiles (and the dQ kernel's), where the search gave them some
        tiles = {"bwd_dq": pick.dq_config(), "bwd_dkdv": pick.backward_config()}
        in_tmem = is_wide_kv(pick) and tensor_memory(hw)  # dK/dV on 128 KV rows, accumulators in tensor memory
        for warps, stages in launch:
            cfg = dataclasses.replace(pick, bwd_num_warps=warps, bwd_num_stages=stages)
            if cfg not in configs and all(pass_fits(k, tiles[k].q_tokens, tiles[k].kv_tokens, d, nbytes, warps, stages,
                                                    hw, search.bwd_score_tiles, in_tmem=in_tmem and k == "bwd_dkdv")
                                          for k in PASSES[1:]):
                configs.append(cfg)
        # the same forward's other backward the search weighed (on Blackwell: 64 and 128 KV rows), so the
        # GPU times the choice the model made
        other_backward = None
        for c in cands[1:]:
            other = c.config
            if ((other.num_warps, other.num_stages) == (pick.num_warps, pick.num_stages) and other not in configs
                    and (other.backward_config(), other.dq_config()) != (pick.backward_config(), pick.dq_config())):
                configs.append(other)
                other_backward = other
                break
        predicted = {c.config: (c.forward_s + c.backward_s) * 1e3 for c in cands}
        wide = wide_kv_backward(pick, search, nbytes)
        if wide is not None and wide not in configs:
            configs.append(wide)
            flat = len(wide.q_tile) == 1 and search.grid
            cand = search.evaluate(wide, flat)
            predicted[wide] = (cand.forward_s + cand.backward_s) * 1e3
        # on Hopper and later, the pick with its streamed tiles loaded by TMA (``KernelConfig.tma``), where its
        # tiles are each one box (runs of memory rows, boxes of a grid): the model predicts no difference, so the GPU decides
        sched = first.schedule
        if has_tma(hw.arch) and tma_fits(pick, sched.q_extents, sched.kv_extents):
            configs.append(dataclasses.replace(pick, tma=True))
            predicted[configs[-1]] = predicted.get(pick, math.nan)
            # and with its forward warp-specialized on those TMA loads: the model has no term for it either
            specialized = warp_specialized_forward(pick, search.pat, hw, sched.q_extents, sched.kv_extents, nbytes)
            if specialized is not None and specialized not in configs:
                configs.append(specialized)
                predicted[specialized] = predicted.get(pick, math.nan)
        # the backward in one kernel: on the pick's backward, else (Blackwell's tensor-memory dK/dV has no room
        # for dQ's accumulator) on the other one
        fused = atomic_dq_backward(pick, search.pat, hw) or (
            atomic_dq_backward(other_backward, search.pat, hw) if other_backward is not None else None)
        if fused is not None and fused not in configs:
            configs.append(fused)
            cand = search.evaluate(fused, len(fused.q_tile) == 1 and search.grid)
            predicted[fused] = (cand.forward_s + cand.backward_s) * 1e3
        for cfg in configs:
            trials.append(Trial(len(trials), cfg, first.schedule, predicted.get(cfg, math.nan)))
    return trials


def _without(trials: list[Trial], field_name: str) -> list[Trial]:
    """The trials whose config has ``field_name`` off, ranked again in their order."""
    return [dataclasses.replace(t, rank=i) for i, t in enumerate(t for t in trials if not getattr(t.config, field_name))]


def without_tma(trials: list[Trial]) -> list[Trial]:
    """The trials that load by pointer (``KernelConfig.tma`` off), ranked again in their order."""
    return _without(trials, "tma")


def for_device(trials: list[Trial], arch: str) -> list[Trial]:
    """The trials a GPU of architecture ``arch`` (``"sm89"``) runs as timed, ranked again in their order: an
    unknown GPU is tuned on the H100's model, whose trials may not apply to it. Without TMA its TMA trials would
    time the pointer loads again (a win by noise cached as TMA); before ``MIN_ATOMIC_DQ_ARCH`` the backward in
    one kernel adds dQ with scalar atomics and its d 64 kernels spilled offline."""
    if not has_tma(arch):
        trials = without_tma(trials)
    return trials if compute_capability(arch) >= MIN_ATOMIC_DQ_ARCH else _without(trials, "atomic_dq")


def wide_kv_backward(pick: KernelConfig, search: ScheduleSearch, nbytes: int = 2) -> KernelConfig | None:
    """On Hopper and later, ``pick`` with FlexAttention's backward orientation (its sm_90 default at head
    dims 64-128; ``search.wide_kv_backward``, by shared memory alone): a trial for the tuner to time, not the
    search's pick on Hopper, where the register model refuses it (compiled offline on sm_90 it takes 202-255
    registers, spill-free for most patterns at d 128 on Triton 3.6 but on the edge: softcap's dK/dV spills
    248-400 B there; the fit ladder launches such a kernel on fewer stages). On Blackwell the search itself
    weighs it (tensor memory holds the accumulators). None where it does not apply: before Hopper, a route
    (its selection is a per-tile plan), a FoX decay (its dK/dV fits only at 32 rows), a forward KV tile other
    than 64 tokens."""
    return search.wide_backward(pick, registers=False, nbytes=nbytes)


#: The forward launch of a warp-specialized trial on Hopper: Triton's pass splits a 128-row Q tile between two
#: consumer warp groups of 4 warps each and adds a producer group (12 warps in all); at 8 warps it specializes
#: nothing (offline, sm_90, Triton 3.6 and 3.9: the 1-D window's forward).
HOPPER_WS_WARPS, HOPPER_WS_Q_TOKENS = 4, 128
#: The fewest warps of a warp-specialized trial's forward on Blackwell: compiled for sm_100 (Triton 3.9, the quick
#: set), the 64-token forwards picked at 4 warps spilled 20 B specialized, none at 8.
BLACKWELL_WS_WARPS = 8


def warp_specialized_forward(pick: KernelConfig, pat: ir.PatternIR, hw, q_extents: tuple[int, ...],
                             kv_extents: tuple[int, ...], nbytes: int = 2) -> KernelConfig | None:
    """``pick`` with its forward warp-specialized (``KernelConfig.warp_specialize``) on TMA loads, in the form its
    architecture takes (``warp_specialized_form``): a trial for the tuner to time. On Hopper a 128-token Q tile at
    ``HOPPER_WS_WARPS`` warps, its FULL and PARTIAL tiles in one loop; on Blackwell and later the pick's forward at
    ``BLACKWELL_WS_WARPS`` warps or more; the backward keeps the pick's launch. None where that form is none, where
    the pick's tiles are not each one box of the grid's ``q_extents``/``kv_extents`` (``search.tma_fits``: Triton
    specializes no loop of pointer loads), for 32-bit inputs (``nbytes`` 4: compiled for sm_90, not specialized),
    and on Hopper for another Q tile or boxes of a grid (its one loop's descriptors are runs of rows)."""
    if not has_tma(hw.arch) or nbytes != 2 or not tma_fits(pick, q_extents, kv_extents):
        return None
    form = warp_specialized_form(pat, compute_capability(hw.arch))
    rows = boxes_are_rows(ScheduleShape(q_extents, kv_extents, pick.q_tile, pick.kv_tile), pick.layout)
    if form == "two loops":
        warps = max(pick.num_warps, BLACKWELL_WS_WARPS)
    elif form == "one loop" and pick.q_tokens == HOPPER_WS_Q_TOKENS and rows:
        warps = HOPPER_WS_WARPS
    else:
        return None
    return dataclasses.replace(pick, tma=True, warp_specialize=True, num_warps=warps, bwd_num_warps=pick.bwd_warps,
                               bwd_num_stages=pick.bwd_stages)


def atomic_dq_backward(pick: KernelConfig, pat: ir.PatternIR, hw) -> KernelConfig | None:
    """``pick`` with its backward in one kernel (``KernelConfig.atomic_dq``: the dK/dV kernel adds dQ by atomics,
    no dQ kernel, so no dQ tiles of its own): a trial for the tuner to time, not the search's pick (dQ would
    differ from run to run in its last bits, and the model's atomics are an assumption). None before Hopper
    (``MIN_ATOMIC_DQ_ARCH``); for a dK/dV kernel on 128 KV rows with its accumulators in tensor memory (dQ's
    would outgrow its 512 columns: Triton 3.9 compiled sliding_window's sm_100 d 128 kernel to a trap); and where
    a training step would not run it as timed: a pattern with a decay gate or a float bias input, whose
    gradients the dQ kernel computes (a timed step takes none), and under ``torch.use_deterministic_algorithms``."""
    import torch

    from ...compiler.codegen.triton.bias import bias_input_names

    if compute_capability(hw.arch) < MIN_ATOMIC_DQ_ARCH or (is_wide_kv(pick) and tensor_memory(hw)):
        return None
    if pat.decay is not None or torch.are_deterministic_algorithms_enabled():
        return None
    if pat.bias is not None and bias_input_names(pat):
        return None
    return dataclasses.replace(pick, atomic_dq=True, dq_q_tile=(), dq_kv_tile=())


__all__ = ["BLACKWELL_WS_WARPS", "HOPPER_WS_Q_TOKENS", "HOPPER_WS_WARPS", "LAUNCH", "MIN_ATOMIC_DQ_ARCH", "TOP",
           "Trial", "atomic_dq_backward", "candidates", "for_device", "warp_specialized_forward", "wide_kv_backward",
           "without_tma"]
