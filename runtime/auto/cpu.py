"""``backend="auto"`` on CPU tensors: the tile executor (``cpu``) or the Flex lowering (``flex``),
whichever the rule below predicts faster for this call's plan.

The rule (``choose``):

1. Flex only where its fused CPU kernel serves the call (``flex_backend.fused_refusal``): torch
   2.13's compiled Flex kernel on CPU is inference only (no backward, no lse, no float64) and
   needs equal Q and KV block sizes. Anything else would run Flex's dense implementation
   (O(N^2) scores): such calls (training, ``return_lse=True``, float64) take the executor.
2. Otherwise a linear time model of each backend on its own schedule (the tiles each one would
   run, FULL and PARTIAL lists; ``TimeModel``): a cost per FULL token pair and per PARTIAL token
   pair (times D + Dv), a cost per PARTIAL token pair and operator of the lowered mask, a cost per
   visited tile pair and one per call; Flex is picked where its modelled time is below the
   executor's. The constants (``CPU`` and ``FLEX``) are fits of interleaved median timings on this
   project's 2-core CPU machine, quiet (the measurements and their features are listed in
   ``CALIBRATION``): Flex's fused kernel is faster per token pair on 1-D masks, and much slower
   where the lowered mask is long (grids: about 70-90 operators per pair to map tile-major
   positions to coordinates), which the executor computes once per tile row and column. An
   executor plan of one whole-sequence tile per side (``cpu_backend.whole_tile_fits``: dense-like
   static masks) is modelled as the fused kernel over every pair (``WHOLE``).
3. Routing (``route topk``) selects per call among the static schedule's tiles, the same way for
   both backends: the rule compares the static schedules (proportional to the routed work).
4. The first calls (``warm_up``): where Flex is modelled faster but its kernel for these shapes is
   not compiled in this process yet (``FlexRunner.kernel_ready``), the compile (``torch.compile``
   of Flex's kernel: 20-40 s on this machine) would cost far more than the call. The executor
   serves such calls and ``auto`` adds up the modelled time each one loses against Flex; the call
   at which that sum would reach the compile's estimated cost compiles Flex and runs it (the
   break-even rule of ski rental: whatever the number of calls, the total time stays within twice
   that of the better of "always executor" and "compile at once", as modelled). The compile
   estimate is the last compile measured in this process, else ``COMPILE_S``; ``COMPILE_COST_S``
   overrides it (``0.0``: compile at the first call, as steady-state benchmarks want). A kernel
   compiled once serves every later module of the same pattern and shapes in the process (the
   mods are shared by their text, ``backends.flex.kernels._NAMESPACES``), and a kernel that ran at two
   lengths serves any length (dynamic shapes): those calls take Flex at once.

The choice is recorded on the module (``attn.chosen_backend``, ``attn.last_choice`` with both
modelled times and the reason) and shown at the top of ``attn.source``. It is logged to the ``attnc.auto``
logger (``LOG``): at INFO where a module's backend changes from one call to the next and around a
compile of Flex's kernel (the call that stalls, and how long it took), at DEBUG every call's choice.
``Attention.warmup`` compiles the kernel before serving (``CpuPolicy.compile_now``); with
``COMPILE_COST_S = math.inf`` besides, ``auto`` never compiles mid-run. Both backends compute the
same function: outputs differ only by float32 rounding. The first call of a Flex plan compiles
Flex's kernel (``torch.compile``, tens of seconds on CPU, as for FlexAttention itself) only once
the break-even rule (4) says so; compiled kernels are kept per generated mods and reused across
sequence lengths (``flex_backend``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.schedule import TileSchedule
from ...compiler.analysis.tiles import one_thread
from ...core import ir
from ..numerics import needs_grad


@dataclass(frozen=True)
class TimeModel:
    """``seconds = call_s + b * (token_s * (D + Dv) * FULL token pairs
    + (partial_token_s * (D + Dv) + mask_op_s * mask_ops) * PARTIAL token pairs + pair_s * tile pairs)``,
    token and tile pairs totalled over heads; ``mask_ops``: operators of the lowered mask
    (``FlexSource.mask_ops``), which a PARTIAL pair evaluates."""

    token_s: float  # seconds per FULL token pair per head-dim unit (D + Dv)
    pair_s: float  # seconds per visited tile pair
    call_s: float  # fixed seconds per call (planning lookups, permutations, launches)
    partial_token_s: float  # seconds per PARTIAL token pair per head-dim unit
    mask_op_s: float = 0.0  # seconds per PARTIAL token pair per mask operator

    def seconds(self, sched: TileSchedule, batch: int, head_dim: int, value_dim: int, mask_ops: int = 0) -> float:
        return self.seconds_of(schedule_work(sched), batch, head_dim, value_dim, mask_ops)

    def seconds_of(self, work: tuple[float, float, int], batch: int, head_dim: int, value_dim: int,
                   mask_ops: int = 0) -> float:
        """``seconds`` from a schedule's (FULL token pairs, PARTIAL token pairs, tile pairs)."""
        full_tok, partial_tok, pairs = work
        dims = head_dim + value_dim
        work = self.token_s * dims * full_tok + (self.partial_token_s * dims + self.mask_op_s * mask_ops) * partial_tok
        return self.call_s + batch * (work + self.pair_s * pairs)


#: Calibrated constants: non-negative least-squares fits (relative errors) of ``CALIBRATION``, one per
#: backend, on the features of ``TimeModel.seconds``, rounded. Seven measurements for five constants:
#: the fit reproduces them within 8% (executor) and 7% (Flex) and orders every case as measured,
#: which is what the rule needs; it is not a physical model (the executor's PARTIAL constant came out
#: below its FULL one). The mask term is what separates the cases: Flex evaluates the whole lowered
#: mask (on grids: tile-major position -> coordinates, about 70-90 operators) on every PARTIAL pair,
#: where the executor decodes coordinates once per tile row and column.
CPU = TimeModel(token_s=4.2e-11, pair_s=4.0e-6, call_s=3.1e-3, partial_token_s=2.25e-11, mask_op_s=2.3e-12)
FLEX = TimeModel(token_s=3.84e-11, pair_s=0.0, call_s=0.0, partial_token_s=9.0e-12, mask_op_s=1.24e-10)
#: The executor on one whole-sequence tile per side (``cpu_backend.whole_tile_fits``): torch's fused
#: kernel over every token pair with the cached mask, as SDPA with a dense mask. Measured (fp32, quiet):
#: radial 16 x 512 tokens, 4 heads, D = Dv = 64: 465 ms for 8192^2 x 4 x 128 = 3.4e10 pair-dims.
WHOLE = TimeModel(token_s=1.35e-11, pair_s=0.0, call_s=CPU.call_s, partial_token_s=1.35e-11)

#: The measurements behind the constants: (case, executor ms, Flex-lowering ms, mask_ops, (FULL token
#: pairs, PARTIAL token pairs, tile pairs) of the executor's and of the Flex lowering's schedule):
#: fp32 inference, batch 1, D = Dv = 64, each backend with its own default tiles; medians of 5
#: interleaved runs on the quiet 2-core machine (benchmarks/results/flex-matrix-2026-11-22.md).
#: The earlier constants were fitted on a machine under load 11-15 and chose the Flex lowering for
#: the 3-D neighborhood, 3.6x slower than the executor there.
CALIBRATION: tuple = (
    ("sliding_window(window=512) n=8192 heads=8", 187, 143, 4,
     (24379392, 16252928, 2480), (24379392, 16252928, 2480)),
    ("streaming(window=1020, sinks=4) n=8192 heads=8", 352, 281, 6,
     (47710208, 30277632, 4760), (47710208, 30277632, 4760)),
    ("document (7 documents) n=8192 heads=8", 288, 222, 5,
     (33554432, 23461888, 3480), (33554432, 23461888, 3480)),
    ("neighborhood_2d(13x13) 64x64 heads=4", 35, 80, 73, (0, 7929856, 1936), (0, 7929856, 1936)),
    ("neighborhood_2d(13x13) 96x96 heads=4", 79, 189, 73, (0, 18939904, 4624), (0, 18939904, 4624)),
    ("neighborhood_3d(3x7x7) 8x24x24 heads=4", 59, 211, 90, (0, 16777216, 1024), (0, 16777216, 1024)),
    ("neighborhood_3d(3x7x7, stride 2x4x4) 8x24x24 heads=4", 55, 207, 90,
     (0, 12582912, 3072), (0, 16777216, 1024)),
)


#: ``auto``'s decisions: INFO where a module changes backend and around each compile of Flex's kernel,
#: DEBUG for every call's choice (the package's loggers have no handler but ``logging.NullHandler``)
LOG = logging.getLogger("attnc.auto")

#: Choices ``AutoRunner.decide`` remembers (call shapes of static masks; oldest dropped first).
DECIDED_CACHE_SIZE = 64

#: Estimated seconds of compiling Flex's fused CPU kernel (and its first run) before any was
#: measured in this process: sliding window 512 at 8K, 8 heads, d 64, fp32, torch 2.13, fresh
#: inductor cache: 22.7 s on this project's 2-core machine, quiet (2026-11-22); more when loaded.
COMPILE_S = 25.0
#: Overrides the compile estimate of the break-even rule (None: measured, else ``COMPILE_S``;
#: 0.0: compile Flex's kernel at the first call where Flex is modelled faster).
COMPILE_COST_S: float | None = None


def compile_cost_s() -> float:
    """The compile estimate of the break-even rule (seconds)."""
    from ..backends.flex.kernels import COMPILE_SECONDS

    if COMPILE_COST_S is not None:
        return COMPILE_COST_S
    return COMPILE_SECONDS[-1] if COMPILE_SECONDS else COMPILE_S


def schedule_work(sched: TileSchedule) -> tuple[float, float, int]:
    """(FULL token pairs, PARTIAL token pairs, visited tile pairs), totalled over heads."""
    h, qi, ki, full = sched.pairs()
    area = (sched.q_tile_tokens()[qi] * sched.kv_tile_tokens()[ki]).to(torch.float64)
    per_class = sched.num_heads if sched.heads_stored == 1 else 1
    return (float(area[full].sum()) * per_class, float(area[~full].sum()) * per_class, len(h) * per_class)


@dataclass(frozen=True)
class Choice:
    """What ``auto`` picked for one call and why (``attn.last_choice``)."""

    backend: str  # "cpu" or "flex"
    reason: str
    cpu_s: float | None = None  # modelled seconds (None: not modelled, e.g. Flex refused)
    flex_s: float | None = None
    compiles: bool = False  # this call compiles Flex's kernel (the break-even rule, or a warm-up)

    def why(self) -> str:
        """The reason, with both modelled times where modelled."""
        times = ""
        if self.cpu_s is not None and self.flex_s is not None:
            times = f" (modelled: cpu {1e3 * self.cpu_s:.3g} ms, flex {1e3 * self.flex_s:.3g} ms)"
        return f"{self.reason}{times}"

    def describe(self) -> str:
        return f"auto chose backend '{self.backend}': {self.why()}"


def choose(cpu_sched: TileSchedule, flex_sched: TileSchedule | None, refusal: str | None, *, batch: int,
           head_dim: int, value_dim: int, mask_ops: int = 0, cpu_whole: bool = False) -> Choice:
    """The rule: ``refusal`` (why Flex's fused kernel cannot serve the call, or None) sends the call
    to the executor; otherwise the backend with the smaller modelled time (ties: the executor).
    ``cpu_whole``: the executor's plan is one whole-sequence tile (``tile_plan.Plan.whole``)."""
    if refusal is not None or flex_sched is None:
        return Choice("cpu", f"Flex's fused CPU kernel cannot serve this call ({refusal}); "
                             "its dense fallback is O(N^2)")
    c = (WHOLE if cpu_whole else CPU).seconds(cpu_sched, batch, head_dim, value_dim, mask_ops)
    f = FLEX.seconds(flex_sched, batch, head_dim, value_dim, mask_ops)
    if f < c:
        return Choice("flex", "the fused Flex kernel is modelled faster", c, f)
    return Choice("cpu", "the tile executor is modelled at least as fast", c, f)


class CpuPolicy:
    """``auto`` on CPU tensors: plans both backends (cached per shapes by each runner), applies
    ``choose`` and runs the chosen one. Callable like a ``FlexRunner`` (``attnc::runner_attention``
    calls it under torch.compile, choosing per call). ``runtime.auto.runner.AutoRunner`` is this
    policy plus the CUDA one."""

    #: set by ``Attention.warmup``: a call modelled faster on Flex compiles its kernel at once
    compile_now: bool = False
    _logged: str | None = None  # the backend of the latest call, for the log's changes

    def __init__(self, pat: ir.PatternIR, cpu_runner, q_tile=None, kv_tile=None):
        from ...core.errors import SpecError
        from ..backends.flex.runner import FlexRunner

        self.pattern = pat
        self.cpu = cpu_runner
        self.flex: FlexRunner | None = None
        self.unlowerable: str | None = None  # why the pattern has no Flex lowering (then always the executor)
        try:
            self.flex = FlexRunner(pat, q_tile, kv_tile)
            self.flex.schedule_source = cpu_runner  # each tile shape classified once for both
        except SpecError as err:
            self.unlowerable = err.message
        self.last: Choice | None = None
        self._decided: dict = {}  # call shapes -> (choice, its Flex plan): static masks (``decide``)
        #: modelled seconds lost so far by calls the executor served while Flex's kernel was not
        #: compiled, per (mods, kernel shapes but the lengths): the break-even rule's running sum
        self.lost_s: dict = {}

    def __getstate__(self) -> dict:
        """Copies keep the configuration, not the remembered choices (they hold Flex plans, whose
        generated functions do not pickle: ``FlexRunner.__getstate__``)."""
        return {**self.__dict__, "_decided": {}, "_logged": None}

    def decide(self, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict,
               need_lse: bool) -> Choice:
        """The modelled choice for this call (the rule's steps 1-3), both backends planned (cached per
        shapes by each runner) on one torch thread (``tiles.one_thread``: many small operations).
        A static mask's choice is remembered per call shapes: a repeated call skips the planners'
        lookups and the thread switch (they cost ~4% of a Flex call at 8K-16K tokens)."""
        from ..plan.cache import mask_input_names

        key = None
        if not mask_input_names(self.pattern) and not bound.q_offset:
            key = (tuple(sorted(bound.axis_sizes.items())), bound.n, bound.nk, bound.heads, tuple(q.shape),
                   tuple(k.shape), tuple(v.shape), q.dtype, q.device.type, need_lse,
                   needs_grad(q, k, v, *inputs.values()))
            hit = self._decided.get(key)
            if hit is not None and (hit[1] is None or self.flex.fused_failure(hit[1]) is None):
                self.last, plan = hit
                if plan is not None:  # (warm_up reads the Flex plan of the call)
                    self.flex.last = plan
                return self.last
        with one_thread():
            choice = self._decide(bound, q, k, v, inputs, need_lse)
        if key is not None:
            if len(self._decided) >= DECIDED_CACHE_SIZE:
                self._decided.pop(next(iter(self._decided)))
            self._decided[key] = (choice, self.flex.last if choice.backend == "flex" and self.flex else None)
        return choice

    def _decide(self, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict,
                need_lse: bool) -> Choice:
        from ..backends.flex.kernels import block_refusal, fused_refusal

        pat = self.pattern
        if bound.q_offset:  # decoding after a KV cache: the executor's rows (runtime.backends.cpu.rows)
            self.last = Choice("cpu", "queries after a KV cache run the executor's decoding rows "
                                      "(the present rows' mask only; no plan per step)")
            return self.last
        tensors, _ = E.bind_inputs(pat, bound, inputs, batch=q.shape[0])
        refusal = fused_refusal(q.device, q.dtype, needs_grad(q, k, v, *tensors.values()), need_lse)
        if self.flex is None:
            refusal = f"the pattern has no Flex lowering: {self.unlowerable}"
        cpu_plan = self.cpu.call_plan(bound, tensors, q, v)
        cpu_sched = cpu_plan.schedule
        flex_sched, mask_ops = None, 0
        if refusal is None:
            batched = frozenset(n for n, t in tensors.items() if t.dim() > len(pat.input(n).dims))
            plan = self.flex.plan(bound, tensors, batched)
            flex_sched, refusal = plan.schedule, block_refusal(plan) or self.flex.fused_failure(plan)
            mask_ops = plan.source.mask_ops
        self.last = choose(cpu_sched, flex_sched, refusal, batch=q.shape[0], head_dim=q.shape[-1],
                           value_dim=v.shape[-1], mask_ops=mask_ops, cpu_whole=getattr(cpu_plan, "whole", False))
        return self.last

    def warm_up(self, choice: Choice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool) -> Choice:
        """The break-even rule (module docstring, 4) applied to the modelled ``choice``: the executor
        while Flex's kernel for these shapes would need a compile that the calls so far have not
        paid for."""
        from ..backends.flex.kernels import kernel_key

        if choice.backend != "flex":
            return choice
        plan = self.flex.last
        if self.flex.kernel_ready(plan, q, k, v, need_lse):
            return choice
        slot = (id(plan.namespace), kernel_key(plan, q, k, v, need_lse)[1])
        if self.compile_now:
            self.lost_s.pop(slot, None)
            return Choice("flex", "the fused Flex kernel is modelled faster; compiling it now (warm-up)",
                          choice.cpu_s, choice.flex_s, compiles=True)
        lost = self.lost_s.get(slot, 0.0) + (choice.cpu_s - choice.flex_s)
        cost = compile_cost_s()
        if lost >= cost:
            self.lost_s.pop(slot, None)
            return Choice("flex", f"the fused Flex kernel is modelled faster; compiling it now (the calls so "
                                  f"far lost {lost:.3g} s against it, the compile is estimated at {cost:.3g} s)",
                          choice.cpu_s, choice.flex_s, compiles=True)
        self.lost_s[slot] = lost
        return Choice("cpu", f"Flex is modelled faster but its kernel for these shapes is not compiled yet: the "
                             f"executor serves calls until their modelled loss ({lost:.3g} s so far) reaches the "
                             f"compile's estimated {cost:.3g} s", choice.cpu_s, choice.flex_s)

    def select(self, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict,
               need_lse: bool) -> Choice:
        """The backend this call runs: the modelled choice (``decide``) and the break-even rule
        (``warm_up``); recorded as ``last``."""
        self.last = self.warm_up(self.decide(bound, q, k, v, inputs, need_lse), q, k, v, need_lse)
        self.log(self.last, q)
        return self.last

    def log(self, choice: Choice, q: torch.Tensor) -> None:
        """``choice`` to ``LOG``: INFO where the backend differs from the latest call's or the call compiles
        Flex's kernel (it stalls for seconds), else DEBUG (formatted only where enabled)."""
        before, self._logged = self._logged, choice.backend
        changed = choice.backend != before
        level = logging.INFO if changed or choice.compiles else logging.DEBUG
        if LOG.isEnabledFor(level):
            was = f" (was '{before}')" if changed and before else ""
            LOG.log(level, "auto: '%s' q %s runs on '%s'%s: %s", self.pattern.name, list(q.shape), choice.backend,
                    was, choice.why())

    def run_flex(self, choice: Choice, run):
        """``run()`` (the Flex call of ``choice``), its compile timed and logged where it compiles."""
        if not choice.compiles:
            return run()
        started = time.perf_counter()
        result = run()
        LOG.info("auto: '%s' compiled Flex's kernel in %.1f s", self.pattern.name, time.perf_counter() - started)
        return result

    def __call__(self, bound: E.Bound, q, k, v, inputs: dict, scale: float, need_lse: bool = True):
        choice = self.select(bound, q, k, v, inputs, need_lse)
        if choice.backend == "flex":
            return self.run_flex(choice, lambda: self.flex(bound, q, k, v, inputs, scale, need_lse))
        return self.cpu(bound, q, k, v, inputs, scale)
