"""``backend="auto"`` on CPU tensors: the tile executor (``cpu``) or the Flex lowering (``flex``),
whichever the rule below predicts faster for this call's plan.

The rule (``choose``):

1. Flex only where its fused CPU kernel serves the call (``flex_backend.fused_refusal``): torch
   2.13's compiled Flex kernel on CPU is inference only (no backward, no lse, no float64) and
   needs equal Q and KV block sizes. Anything else would run Flex's dense implementation
   (O(N^2) scores): such calls (training, ``return_lse=True``, float64) take the executor.
2. Otherwise a linear time model of each backend on its own schedule (the tiles each one would
   run, FULL and PARTIAL lists): per (batch element, head),
   ``seconds = TOKEN_S * (D + Dv) * (full token pairs + PARTIAL_WEIGHT * partial token pairs)
   + PAIR_S * visited tile pairs``, plus ``CALL_S`` per call; Flex is picked where its modelled
   time is below the executor's. The constants (``CPU`` and ``FLEX``) are least-squares fits of
   interleaved median timings on this project's 2-core CPU machine (``calibrate``; the
   measurements are listed in ``CALIBRATION``), so only their ratio matters for the choice: the
   executor pays a larger per-tile-pair overhead (a gather and small matmuls per pair chunk) and
   a larger per-call cost; Flex's fused kernel a per-token cost close to the executor's.
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
   mods are shared by their text, ``flex_backend._NAMESPACES``), and a kernel that ran at two
   lengths serves any length (dynamic shapes): those calls take Flex at once.

The choice is recorded on the module (``attn.chosen_backend``, ``attn.last_choice`` with both
modelled times and the reason) and shown at the top of ``attn.source``. Both backends compute the
same function: outputs differ only by float32 rounding. The first call of a Flex plan compiles
Flex's kernel (``torch.compile``, tens of seconds on CPU, as for FlexAttention itself) only once
the break-even rule (4) says so; compiled kernels are kept per generated mods and reused across
sequence lengths (``flex_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler import evaluate as E
from ..compiler import ir
from ..compiler.schedule import TileSchedule
from ..compiler.tiles import one_thread


@dataclass(frozen=True)
class TimeModel:
    """``seconds = call_s + b*h * (token_s * (D + Dv) * weighted token pairs + pair_s * tile pairs)``."""

    token_s: float  # seconds per token pair per head-dim unit (D + Dv)
    pair_s: float  # seconds per visited tile pair
    call_s: float  # fixed seconds per call (planning lookups, permutations, launches)
    partial_weight: float = 1.5  # a PARTIAL token pair evaluates the mask too

    def seconds(self, sched: TileSchedule, batch: int, head_dim: int, value_dim: int) -> float:
        full_tok, partial_tok, pairs = schedule_work(sched)
        work = self.token_s * (head_dim + value_dim) * (full_tok + self.partial_weight * partial_tok)
        return self.call_s + batch * (work + self.pair_s * pairs)


#: Calibrated constants: non-negative least-squares fits of ``CALIBRATION`` (``TimeModel.seconds``
#: features: token pairs x (D + Dv), tile pairs, 1), rounded. The machine was shared (load 11-15 on
#: 2 cores), which inflates the executor's per-call and per-pair costs most (its many small torch
#: operations wait for a core; the issue measured the same effect): the rule is tuned for a busy
#: machine and favours Flex's single fused kernel wherever that kernel applies.
CPU = TimeModel(token_s=9.6e-10, pair_s=9.9e-5, call_s=0.28)
FLEX = TimeModel(token_s=5.4e-10, pair_s=5.8e-4, call_s=0.0)

#: The measurements behind the constants: (case, executor ms, flex ms); fp32 inference, batch 1,
#: D = Dv = 64, each backend with its own default tiles; medians of 7 interleaved calls after a
#: first call (2026-11-22, 2 cores, load 11-15; /tmp scripts, not kept).
CALIBRATION: tuple = (
    ("sliding_window(window=256) n=2048 heads=4", 845.9, 357.3),
    ("sliding_window(window=256) n=4096 heads=4", 1098.2, 769.8),
    ("sliding_window(window=4096) n=2048 heads=4", 1516.1, 898.7),
    ("logsparse() n=2048 heads=4", 830.3, 351.9),
    ("neighborhood_2d(kernel_size=7) n=1024 heads=4", 462.8, 280.6),
    ("neighborhood_2d(kernel_size=13) n=2304 heads=4", 1112.3, 1188.0),
    ("sliding_window(window=64) n=512 heads=2", 298.8, 23.6),
)


#: Estimated seconds of compiling Flex's fused CPU kernel (and its first run) before any was
#: measured in this process: sliding window 512 at 8K, 8 heads, d 64, fp32, torch 2.13, fresh
#: inductor cache: 22.7 s on this project's 2-core machine, quiet (2026-11-22); more when loaded.
COMPILE_S = 25.0
#: Overrides the compile estimate of the break-even rule (None: measured, else ``COMPILE_S``;
#: 0.0: compile Flex's kernel at the first call where Flex is modelled faster).
COMPILE_COST_S: float | None = None


def compile_cost_s() -> float:
    """The compile estimate of the break-even rule (seconds)."""
    from .flex_backend import COMPILE_SECONDS

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

    def describe(self) -> str:
        times = ""
        if self.cpu_s is not None and self.flex_s is not None:
            times = f" (modelled: cpu {1e3 * self.cpu_s:.3g} ms, flex {1e3 * self.flex_s:.3g} ms)"
        return f"auto chose backend '{self.backend}': {self.reason}{times}"


def choose(cpu_sched: TileSchedule, flex_sched: TileSchedule | None, refusal: str | None, *, batch: int,
           head_dim: int, value_dim: int) -> Choice:
    """The rule: ``refusal`` (why Flex's fused kernel cannot serve the call, or None) sends the call
    to the executor; otherwise the backend with the smaller modelled time (ties: the executor)."""
    if refusal is not None or flex_sched is None:
        return Choice("cpu", f"Flex's fused CPU kernel cannot serve this call ({refusal}); "
                             "its dense fallback is O(N^2)")
    c = CPU.seconds(cpu_sched, batch, head_dim, value_dim)
    f = FLEX.seconds(flex_sched, batch, head_dim, value_dim)
    if f < c:
        return Choice("flex", "the fused Flex kernel is modelled faster", c, f)
    return Choice("cpu", "the tile executor is modelled at least as fast", c, f)


class AutoRunner:
    """``auto`` on CPU tensors: plans both backends (cached per shapes by each runner), applies
    ``choose`` and runs the chosen one. Callable like a ``FlexRunner`` (``runtime.flex_op``)."""

    def __init__(self, pat: ir.PatternIR, cpu_runner, q_tile=None, kv_tile=None):
        from ..spec.errors import SpecError
        from .flex_backend import FlexRunner

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
        #: modelled seconds lost so far by calls the executor served while Flex's kernel was not
        #: compiled, per (mods, kernel shapes but the lengths): the break-even rule's running sum
        self.lost_s: dict = {}

    def decide(self, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict,
               need_lse: bool) -> Choice:
        """The modelled choice for this call (the rule's steps 1-3), both backends planned (cached per
        shapes by each runner) on one torch thread (``tiles.one_thread``: many small operations)."""
        with one_thread():
            return self._decide(bound, q, k, v, inputs, need_lse)

    def _decide(self, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict,
                need_lse: bool) -> Choice:
        from .flex_backend import block_refusal, fused_refusal

        pat = self.pattern
        if bound.q_offset:  # decoding after a KV cache: the executor's rows (runtime.decode); Flex has no offset
            self.last = Choice("cpu", "queries after a KV cache run the executor's decoding rows "
                                      "(the Flex lowering has no query offset)")
            return self.last
        tensors, _ = E.bind_inputs(pat, bound, inputs, batch=q.shape[0])
        grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, *(t for t in tensors.values() if t.is_floating_point())))
        refusal = fused_refusal(q.device, q.dtype, grad, need_lse)
        if self.flex is None:
            refusal = f"the pattern has no Flex lowering: {self.unlowerable}"
        cpu_sched = self.cpu.plan(bound, tensors).schedule
        flex_sched = None
        if refusal is None:
            batched = frozenset(n for n, t in tensors.items() if t.dim() > len(pat.input(n).dims))
            plan = self.flex.plan(bound, tensors, batched)
            flex_sched, refusal = plan.schedule, block_refusal(plan) or self.flex.fused_failure(plan)
        self.last = choose(cpu_sched, flex_sched, refusal, batch=q.shape[0], head_dim=q.shape[-1],
                           value_dim=v.shape[-1])
        return self.last

    def warm_up(self, choice: Choice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool) -> Choice:
        """The break-even rule (module docstring, 4) applied to the modelled ``choice``: the executor
        while Flex's kernel for these shapes would need a compile that the calls so far have not
        paid for."""
        from .flex_backend import kernel_key

        if choice.backend != "flex":
            return choice
        plan = self.flex.last
        if self.flex.kernel_ready(plan, q, k, v, need_lse):
            return choice
        slot = (id(plan.namespace), kernel_key(plan, q, k, v, need_lse)[1])
        lost = self.lost_s.get(slot, 0.0) + (choice.cpu_s - choice.flex_s)
        cost = compile_cost_s()
        if lost >= cost:
            self.lost_s.pop(slot, None)
            return Choice("flex", f"the fused Flex kernel is modelled faster; compiling it now (the calls so "
                                  f"far lost {lost:.3g} s against it, the compile is estimated at {cost:.3g} s)",
                          choice.cpu_s, choice.flex_s)
        self.lost_s[slot] = lost
        return Choice("cpu", f"Flex is modelled faster but its kernel for these shapes is not compiled yet: the "
                             f"executor serves calls until their modelled loss ({lost:.3g} s so far) reaches the "
                             f"compile's estimated {cost:.3g} s", choice.cpu_s, choice.flex_s)

    def select(self, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict,
               need_lse: bool) -> Choice:
        """The backend this call runs: the modelled choice (``decide``) and the break-even rule
        (``warm_up``); recorded as ``last``."""
        self.last = self.warm_up(self.decide(bound, q, k, v, inputs, need_lse), q, k, v, need_lse)
        return self.last

    def __call__(self, bound: E.Bound, q, k, v, inputs: dict, scale: float, need_lse: bool = True):
        choice = self.select(bound, q, k, v, inputs, need_lse)
        if choice.backend == "flex":
            return self.flex(bound, q, k, v, inputs, scale, need_lse)
        return self.cpu(bound, q, k, v, inputs, scale)
