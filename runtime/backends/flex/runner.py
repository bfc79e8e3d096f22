"""``backend="flex"``: a softmax pattern lowered to PyTorch's FlexAttention.

attnc does the analysis, Flex runs the kernel:

- ``mask_mod`` and ``score_mod`` are generated from the IR
  (``compiler.codegen.flex``: the evaluator's integer semantics, no text of
  the spec, readable in ``Attention.source``); call-time inputs, per-head
  softcaps and FoX prefix sums reach them as captured tensors;
- the ``BlockMask`` is built directly from attnc's ``TileSchedule`` (its FULL
  and PARTIAL lists, ``BlockMask.from_kv_blocks``), never by evaluating the
  mask on every pair (``create_block_mask``);
- grids get box tiles: q, k and v are permuted into tile-major order so that
  one Flex block is one attnc box tile, and the output and lse are permuted
  back. KV tiles holding padded slots are never FULL (the mask_mod masks the
  padding).

Which Flex implementation runs (torch 2.13):

- the fused kernel, ``torch.compile(flex_attention, fullgraph=True)``, kept
  per pattern and shape bucket (one compiled function per plan, so a new call
  with the same shapes does not recompile; new inputs, a new BlockMask of a
  data-dependent mask and new closure tensors do not recompile either). On CPU
  Flex's fused kernel is inference only: no lse, no backward, no float64, and
  it needs equal Q and KV block sizes (``fused_ok``);
- Flex's dense implementation (its eager path: the scores materialised,
  O(N^2) memory) otherwise: CPU calls that need gradients, the lse, float64 or
  unequal block sizes, and every call with ``runner.compiled = False``. On CPU it is called at the
  level of Flex's higher-order op with the captured tensors as explicit
  operands, because ``flex_attention`` refuses CPU tensors that require grad
  while the op's own autograd formula (dense) is correct, including the
  gradients of captured tensors (bias inputs, FoX gates).

Checks and non-finite values, as on the other backends (REFERENCE.md, docs/limits.md):

- a bias index out of range on an attended pair raises the ``SpecError`` the others raise: the
  indices intervals do not prove in range are checked on the host over the plan's tile lists
  (``indices``: once per plan for indices of positions only, at every call for those that read an
  input; no check, no host copy, where all are proven);
- the mask's captured inputs are detached (a mask is not differentiated; Flex refuses mask_mod
  buffers that require grad);
- the dense implementation lets a non-finite value reach only the queries that attend its key, as
  the reference (``dense_call``); the fused kernels, as the tiled backends, keep it out of the
  queries whose block pair with it is EMPTY (a visited block's zero weights multiply whole rows).

Routing (``route topk``): per call, ``runtime.plan.routing`` selects the key blocks
of each query (as the CPU backend does, over the static schedule's tiles); the
BlockMask then has one list per (batch element, head) and the mask_mod reads
the selection from captured tensors. Refused at compile time (``SpecError``):
recurrences (no softmax to lower).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.schedule import TileSchedule
from ....compiler.analysis.tiles import (
    RANK_REFINE_BUDGET,
    check_tile,
    classify_tiles,
    layout_extents,
    one_thread,
)
from ....compiler.codegen.flex import DECAY_BUFFERS, TokenMap, check_lowerable, generate
from ....compiler.cost.search import classify_flat, tile_shapes
from ....core import ir
from ....core.errors import SpecError
from ...numerics import accumulated, empty_batch_outputs, needs_grad, tied_to, timing_inputs
from ...ops.common import Registered
from ...plan.cache import mask_input_names, ranked_schedule
from ...runner import Call, Support
from . import kernels
from .block_masks import (
    FlexPlan,
    Order,
    bind_mask_mod,
    bind_score_mod,
    block_mask_of,
    demote_padded,
    row_major_blocks,
    schedule_cost,
)
from .indices import first_error, index_checks, inputs_read
from .kernels import (
    compile_errors,
    compiled_call,
    dense_call,
    fused_ok,
    kernel_key,
    kernel_options,
    namespace_of,
    nan_kept,
    prefix_sums,
)

#: Flex block sizes (tokens) tried when the tiles are not forced.
FLEX_TILE_TOKENS = (64, 128)
#: On CUDA: Flex's GPU kernels tile a block with BLOCK_M x BLOCK_N of up to 128 tokens (its default
#: BlockMask block is 128) and refuse a block that is not a multiple of them (seen on an H100, torch
#: 2.11: 64-token blocks failed to lower for d = 128 bf16), so 128-token blocks only.
CUDA_FLEX_TILE_TOKENS = (128,)
#: Whether CUDA plans read mask terms of grid coordinates alone from tables (``compiler.codegen.tables.tabulate``,
#: a CPU speed-up): they do not. In Flex's GPU kernels a table read is a gather of BLOCK_M x BLOCK_N int64
#: (or float64) entries per KV block, which Triton's software pipeliner stages through shared memory as it
#: does K and V: on an H200 (torch 2.11, Triton 3.6, d = 128 bf16, Flex's 128 x 64 forward blocks, 3 stages)
#: window_2d's kernel with two tables asked 384 KiB and halo_2d's with four 640 KiB (128 KiB and 128 KiB
#: per table) of 227 KiB, and failed to compile. Computed in the mask_mod, the terms are a few integer
#: operations in registers.
CUDA_TABLES = False


class FlexRunner(Registered):
    """Plans per shapes (cached; data-dependent masks per distinct inputs) and runs Flex."""

    def __init__(self, pat: ir.PatternIR, q_tile=None, kv_tile=None):
        check_lowerable(pat)
        self.pattern = pat
        self.q_tile, self.kv_tile = q_tile, kv_tile
        #: False: Flex's dense implementation for every call (tests; debugging mods)
        self.compiled = True
        self.plans: dict = {}
        self.last: FlexPlan | None = None
        self.last_path: str | None = None
        self.last_routed: TileSchedule | None = None  # routing: the latest call's per (batch, head) lists
        self.last_block_mask = None
        self._dynamic_last: tuple | None = None
        #: backend="auto": the CPU runner whose classified schedules (static masks) this one shares
        self.schedule_source = None
        self.register_op()  # under torch.compile: attnc::runner_attention

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle, torch.save of a model) keep the configuration, not the plans:
        generated functions and compiled kernels do not pickle; a copy plans again at its first call."""
        state = dict(self.__dict__)
        state.update(plans={}, last=None, last_path=None, last_routed=None, last_block_mask=None, _dynamic_last=None)
        return state

    # ------------------------------------------------------------ planning
    def _tiles(self, bound: E.Bound, tensors: dict, cuda: bool = False
               ) -> tuple[tuple, tuple, bool, TileSchedule | None]:
        """(Q tile, KV tile, flat, its schedule or None) with the least modelled Flex work;
        ``flat``: 1-D tiles on a grid. ``cuda``: blocks of ``CUDA_FLEX_TILE_TOKENS`` only."""
        pat = self.pattern
        q_ext = layout_extents(pat.queries, bound, bound.n)
        kv_ext = layout_extents(pat.keys, bound, bound.nk)
        grid = len(q_ext) > 1 or len(kv_ext) > 1
        boxes = pat.queries.kind == "grid" and pat.keys.kind == "grid" and len(q_ext) == len(kv_ext)
        if self.q_tile is not None or self.kv_tile is not None:
            qt = self.q_tile if self.q_tile is not None else self.kv_tile
            kt = self.kv_tile if self.kv_tile is not None else qt
            as_tuple = [(t,) if isinstance(t, int) and not isinstance(t, bool) else t for t in (qt, kt)]
            flat = grid and (not boxes or all(isinstance(t, tuple | list) and len(t) == 1 for t in as_tuple))
            if flat:
                return (check_tile("q_tile", as_tuple[0], (bound.n,)), check_tile("kv_tile", as_tuple[1], (bound.nk,)),
                        True, None)
            return check_tile("q_tile", as_tuple[0], q_ext), check_tile("kv_tile", as_tuple[1], kv_ext), False, None
        best = None
        for tokens in CUDA_FLEX_TILE_TOKENS if cuda else FLEX_TILE_TOKENS:
            # blocks of exactly `tokens` (a power of two) on both sides, as Flex's own 128, even beyond a
            # short sequence (Flex bounds it): the fused CPU kernel needs them (see fused_ok)
            # flat blocks of the token order too (on a grid: whole rows or pieces of one, e.g. radial's
            # in-frame blocks, which the most cube-like boxes are not), then those boxes
            cands = [((tokens,), (tokens,), grid)]
            if boxes:
                q_shapes = tile_shapes(tokens, q_ext, limit=3)
                kv_shape = tile_shapes(tokens, kv_ext, limit=1) if q_ext != kv_ext else q_shapes[:1]
                if q_shapes and kv_shape:  # else a grid smaller than one box: flat blocks only
                    cands += [(s, s if q_ext == kv_ext else kv_shape[0], False) for s in q_shapes]
            for qs, ks, flat in cands:
                sched = self._classify(bound, qs, ks, flat, tensors, rank=True)
                cost = schedule_cost(sched)
                if best is None or cost < best[0]:
                    best = (cost, qs, ks, flat)
        _, qs, ks, flat = best
        return qs, ks, flat, self._classify(bound, qs, ks, flat, tensors)

    def _classify(self, bound: E.Bound, q_tile, kv_tile, flat: bool, tensors: dict, rank: bool = False) -> TileSchedule:
        """The exact schedule of these tiles (shared with the executor's plans of a static mask), or
        with ``rank`` one refined within ``RANK_REFINE_BUDGET`` to compare candidates by."""
        memo = None
        if self.schedule_source is not None and not mask_input_names(self.pattern):
            memo = self.schedule_source.schedules_for((tuple(sorted(bound.axis_sizes.items())), bound.n, bound.nk,
                                                       bound.heads))
            known = ranked_schedule(memo, (q_tile, kv_tile, flat)) if rank else memo.get((q_tile, kv_tile, flat))
            if known is not None:
                return known
        budget = {"refine_budget": RANK_REFINE_BUDGET, "witness": False} if rank else {}
        if flat:
            sched = classify_flat(self.pattern, bound, q_tile, kv_tile, tensors, **budget)
        else:
            sched = classify_tiles(self.pattern, bound, q_tile, kv_tile, tensors, **budget)
        if memo is not None:
            memo[("ranked", q_tile, kv_tile, flat) if rank else (q_tile, kv_tile, flat)] = sched
        return sched

    def plan(self, bound: E.Bound, tensors: dict, batched: frozenset, cuda: bool = False) -> FlexPlan:
        """The plan of these shapes (and inputs of a data-dependent mask) for a CPU or a CUDA call:
        cached, else made on one torch thread (``tiles.one_thread``)."""
        with one_thread():
            return self._plan(bound, tensors, batched, cuda)

    def _plan(self, bound: E.Bound, tensors: dict, batched: frozenset, cuda: bool) -> FlexPlan:
        pat = self.pattern
        used = {n: t for n, t in tensors.items() if n in mask_input_names(pat)}
        key = (tuple(sorted(bound.axis_sizes.items())), bound.n, bound.nk, bound.heads, batched, cuda)
        if not used and key in self.plans:
            self.last = self.plans[key]
            return self.last
        if used and self._dynamic_last is not None and self._dynamic_last[0] == key:
            seen = self._dynamic_last[1]
            if all(seen[n].shape == t.shape and torch.equal(seen[n], t.detach().cpu()) for n, t in used.items()):
                self.last = self._dynamic_last[2]
                return self.last
        cpu_used = {n: t.detach().cpu() for n, t in used.items()}
        if used and key in self.plans:  # data-dependent: keep the tiles, reclassify for these inputs
            old = self.plans[key]
            q_tile, kv_tile, flat, sched = old.schedule.q_tile, old.schedule.kv_tile, old.flat, None
        else:
            q_tile, kv_tile, flat, sched = self._tiles(bound, cpu_used, cuda)
        if sched is None:
            sched = self._classify(bound, q_tile, kv_tile, flat, cpu_used)
        q_ext = layout_extents(pat.queries, bound, bound.n)
        kv_ext = layout_extents(pat.keys, bound, bound.nk)
        boxes = not flat and len(q_tile) > 1
        q_map = TokenMap(q_ext, q_tile if boxes and not row_major_blocks(q_tile, q_ext) else None)
        k_map = TokenMap(kv_ext, kv_tile if boxes and not row_major_blocks(kv_tile, kv_ext) else None)
        sched = demote_padded(sched, k_map)
        if used and key in self.plans and self.plans[key].q_map == q_map and self.plans[key].k_map == k_map:
            old = self.plans[key]
            source, namespace = old.source, old.namespace
        else:
            decay_batched = pat.decay is not None and pat.decay in batched
            source = generate(pat, bound, q_map, k_map, batched, decay_batched, tables=CUDA_TABLES or not cuda)
            namespace = namespace_of(source, pat)
        once, each = index_checks(pat, bound)
        plan = FlexPlan(bound, sched, q_map, k_map, source, namespace, Order.of(q_map), Order.of(k_map), flat,
                        checks_once=once, checks_each=each)
        self.plans[key] = plan
        self.last = plan
        if used:
            self._dynamic_last = (key, cpu_used, plan)
        return plan

    def _route(self, plan: FlexPlan, q, k, tensors: dict, batched: frozenset):
        """The routed lists and selection of this call (``runtime.plan.routing``, as the CPU backend),
        over the static schedule's tiles (never N x N)."""
        from ...plan import routing

        cpu = {n: t.detach().cpu() for n, t in tensors.items()}
        return routing.route_plan(self._exec_plan(plan), q.detach(), k.detach(), cpu, set(batched))  # on q's device

    def _exec_plan(self, plan: FlexPlan):
        """The executor's plan over the static schedule (made once per plan)."""
        from ...plan import tile_plan

        if plan.exec_plan is None:
            plan.exec_plan = tile_plan.Plan.build(self.pattern, plan.bound, plan.schedule)
        return plan.exec_plan

    def check_indices(self, plan: FlexPlan, tensors: dict, batched: frozenset, routed) -> None:
        """Raise the ``SpecError`` of a bias index out of range on an attended pair (``indices``);
        nothing to do, and no host copy, where every index is proven in range."""
        pat = self.pattern
        if plan.checks_once:  # positions only: this plan's answer, found once
            once, plan.checks_once = plan.checks_once, ()
            host = {n: tensors[n].detach().cpu() for n in inputs_read(pat, once)}
            err = first_error(self._exec_plan(plan), once, host, batched)  # over every pair the mask allows
            if err is not None and routed is None:
                plan.index_error = err
            elif err is not None:  # routed: a call's selection may skip those pairs, so check at every call
                plan.checks_each = once + plan.checks_each
        if plan.index_error is not None:
            raise plan.index_error.with_traceback(None)  # (one error raised at every call: no growing traceback)
        if plan.checks_each:
            host = {n: tensors[n].detach().cpu() for n in inputs_read(pat, plan.checks_each)}
            target = self._exec_plan(plan) if routed is None else dataclasses.replace(
                routed, selection=routed.selection.cpu(), key_block=routed.key_block.cpu())
            err = first_error(target, plan.checks_each, host, batched)
            if err is not None:
                raise err

    # ------------------------------------------------------------ running
    def fused_failure(self, plan: FlexPlan) -> str | None:
        """Why Flex's fused kernel failed to compile for these mods (None: it has not failed)."""
        return plan.namespace.get("fused_failed")

    def kernel_ready(self, plan: FlexPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     need_lse: bool) -> bool:
        """Whether a fused call with these shapes runs without compiling Flex's kernel: the kernel of
        these mods ran with these shapes in this process, or with two other lengths and the same rest
        (dynamo then holds a kernel with dynamic lengths: ``compiled_call``), or nothing is compiled
        (``compiled = False``)."""
        if not self.compiled:
            return True
        key = kernel_key(plan, q, k, v, need_lse)
        seen = plan.namespace.get("compiled_keys", set())
        return key in seen or sum(rest == key[1] for _, rest in seen) >= 2

    def _compile_failed(self, plan, err, qp, kp, vp, bm, scale, mask_bufs, score_bufs, need_lse):
        """torch.compile of Flex's CPU kernel can fail on some mods and block sizes (torch 2.13: a C++
        compile error for FoX prefix-sum loads with 16-token blocks): the call, and later calls with
        these mods, use the dense implementation instead, with a warning."""
        lines = str(err).strip().splitlines()
        # the compiler's own first error line where there is one (Inductor's text opens with its command)
        first = next((ln.strip() for ln in lines if "error:" in ln), lines[0] if lines else type(err).__name__)[:200]
        plan.namespace["fused_failed"] = f"torch.compile of Flex's kernel failed ({type(err).__name__}: {first})"
        warnings.warn(f"attnc flex: {plan.namespace['fused_failed']}; using Flex's dense implementation",
                      RuntimeWarning, stacklevel=3)
        self.last_path = "dense"
        out, lse = dense_call(qp, kp, vp, plan.namespace, bm, scale, mask_bufs, score_bufs)
        return (out, lse) if need_lse else out

    # ------------------------------------------------------------ the Runner protocol (runtime.runner)
    name = "flex"
    op = "runner"  # under torch.compile: attnc::runner_attention
    #: queries after a KV cache: their rows' positions folded into the mods (a sequence's; grids refused)
    support = Support(query_offset="sequence")

    @property
    def last_schedule(self):
        return None if self.last is None else self.last.schedule

    def forward(self, call: Call, q, k, v):
        return self(call.bound, q, k, v, call.inputs, call.scale, call.need_lse)

    def describe(self) -> str:
        return describe(self, self.pattern)

    def __call__(self, bound: E.Bound, q, k, v, inputs: dict, scale: float, need_lse: bool = True):
        pat = self.pattern
        B, Hq, Nq, _ = q.shape
        tensors, _ = E.bind_inputs(pat, bound, inputs, batch=B)
        if B == 0:  # an empty batch: Flex's dense backward cannot reshape 0 elements; zeros as elsewhere
            out, lse = (tied_to(x, q, k, v, *tensors.values()) for x in empty_batch_outputs(q, v, torch.float32))
            return out, (lse if need_lse else None)
        batched = frozenset(n for n, t in tensors.items() if t.dim() > len(pat.input(n).dims))
        plan = self.plan(bound, tensors, batched, q.is_cuda)
        dev = q.device
        names = plan.source.mask_inputs[:-2] if pat.route is not None else plan.source.mask_inputs  # then SEL, KB
        for n in names:  # the mask's tables, moved once per device
            if n in plan.source.tables and (n, dev) not in plan.tables:
                plan.tables[(n, dev)] = plan.source.tables[n].to(dev)
        # detached: a mask is not differentiated (and Flex refuses mask_mod buffers that require grad)
        mask_bufs = tuple(plan.tables[(n, dev)] if n in plan.source.tables else tensors[n].detach().to(dev)
                          for n in names)
        sched, per_batch, routed = plan.schedule, False, None
        if pat.route is not None:  # this call's selection: per (batch, head) lists and the per-query mask
            routed = self._route(plan, q, k, tensors, batched)
            sched, per_batch = routed.schedule, True
            mask_bufs += (routed.selection.to(dev), routed.key_block.to(dev))
            self.last_routed = sched
        self.check_indices(plan, tensors, batched, routed)
        names = [n for n in plan.source.score_inputs if n not in DECAY_BUFFERS]
        score_bufs = [accumulated(tensors[n].to(dev)) for n in names]  # gradients summed in float32
        if pat.decay is not None:
            hi, lo, reset = prefix_sums(tensors[pat.decay].to(dev), q.dtype)
            score_bufs += [hi, lo, reset, hi.clone(), lo.clone()]  # DECAY_BUFFERS: key-side reads apart
        score_bufs = tuple(score_bufs)
        qo, ko = plan.q_order.to(dev), plan.k_order.to(dev)
        qp = q if qo.token is None else q.index_select(2, qo.token)
        kp = k if ko.token is None else k.index_select(2, ko.token)
        vp = v if ko.token is None else v.index_select(2, ko.token)
        ns = plan.namespace
        mask_mod = bind_mask_mod(ns["mask_mod"], mask_bufs)
        score_mod = bind_score_mod(ns["score_mod"], score_bufs) if plan.source.has_score_mod else None
        bm = None if per_batch else plan.block_masks.get(dev)
        if bm is None:  # a plan holds one BlockMask (a data-dependent mask: one plan per distinct inputs)
            bm = block_mask_of(sched, mask_mod, plan.q_map.length, plan.k_map.length, dev, B if per_batch else 1,
                               plan.block_size)
            if not per_batch:
                plan.block_masks[dev] = bm
        bm.mask_mod = mask_mod  # this call's captured tensors
        self.last_block_mask = bm
        grad = needs_grad(q, k, v, *mask_bufs, *score_bufs)
        if not grad:  # Flex refuses CPU tensors that require grad even under no_grad
            qp, kp, vp = qp.detach(), kp.detach(), vp.detach()
            score_mod = bind_score_mod(ns["score_mod"], tuple(t.detach() for t in score_bufs)) if score_mod else None
        dense_cpu = dev.type == "cpu" and not (self.compiled and fused_ok(plan, q.dtype, grad, need_lse)
                                               and self.fused_failure(plan) is None)
        gqa = Hq != k.shape[1]
        if dense_cpu:
            self.last_path = "dense"
            with kernels.TRACE_LOCK:
                out, lse = dense_call(qp, kp, vp, ns, bm, scale, mask_bufs, score_bufs)
        else:
            self.last_path = "fused" if self.compiled else "eager"
            from torch.nn.attention.flex_attention import flex_attention

            if self.compiled:
                key = kernel_key(plan, q, k, v, need_lse)
                ready = self.kernel_ready(plan, q, k, v, need_lse)
                started = time.perf_counter()
                if dev.type == "cpu":  # its compiled kernel drops a NaN score from the row: made +inf
                    score_mod = nan_kept(score_mod)
                try:
                    # its compile: one thread at a time (dynamo's compile is the process's)
                    with kernels.TRACE_LOCK if not ready else contextlib.nullcontext():
                        res = compiled_call(ns)(qp, kp, vp, score_mod, bm, scale, gqa, need_lse,
                                            kernel_options(dev, q.shape[-1], score_bufs if grad else ()))
                except compile_errors() as err:
                    if dev.type != "cpu":
                        raise
                    res = self._compile_failed(plan, err, qp, kp, vp, bm, scale, mask_bufs, score_bufs, need_lse)
                else:
                    if not ready:  # this call compiled (or recompiled with dynamic lengths) Flex's kernel
                        kernels.COMPILE_SECONDS.append(time.perf_counter() - started)
                    ns.setdefault("compiled_keys", set()).add(key)
            else:
                res = flex_attention(qp, kp, vp, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa,
                                     return_lse=need_lse)
            out, lse = res if need_lse else (res, None)
        if qo.position is not None:
            out = out.index_select(2, qo.position)
            lse = lse.index_select(2, qo.position) if lse is not None else None
        return out, lse


def describe(runner: FlexRunner, pat: ir.PatternIR) -> str:
    """``Attention.source`` for backend='flex': the plan and the generated mods."""
    lines = [f"# flex backend: FlexAttention lowering of '{pat.name}'", *("# " + t for t in pat.describe_terms())]
    plan = runner.last
    if plan is None:
        lines.append("# no call yet: the BlockMask and the mods are generated at the first call (per shapes)")
        return "\n".join(lines) + "\n"
    s = plan.schedule
    lines += [
        f"# BlockMask from attnc's tile lists: BLOCK_SIZE {plan.block_size}, q_tile {s.q_tile}, kv_tile {s.kv_tile}",
        f"# visited block pairs: {s.full} FULL (mask_mod skipped), {s.partial} PARTIAL, {s.empty} EMPTY (skipped)",
        f"# last call ran Flex's {runner.last_path or '-'} implementation",
        "",
        plan.source.text,
    ]
    return "\n".join(lines)


def refuse_recurrence(rec: ir.RecurrenceIR) -> None:
    raise SpecError(f"'{rec.name}' is a recurrence: it has no softmax to lower to FlexAttention",
                    where="argument backend", hint="use backend='cpu', 'triton' or 'reference' for recurrences")


class FlexBuilder:
    """The Flex lowering as an autotuner candidate (``runtime.tuning.autotune``'s ``KernelBuilder``
    protocol): ``source`` is the generated mods, ``runner`` times a training step of this lowering
    on random q, k, v of the tuned shape, forward then backward, as the Triton candidates are timed
    (the compiled kernels; compiled once, before timing, by the timer's warm-up; comparing a Flex
    forward with a Triton forward+backward had Flex win wrongly: seen on an H100).
    ``compiled=False``: Flex's dense implementation (tests)."""

    name = "flex"

    def __init__(self, compiled: bool = True):
        self.compiled = compiled
        self._runners: dict = {}

    def _runner(self, pat: ir.PatternIR) -> FlexRunner:
        key = pat.key()
        if key not in self._runners:
            self._runners[key] = FlexRunner(pat)
            self._runners[key].compiled = self.compiled
        return self._runners[key]

    def source(self, pat: ir.PatternIR, bound: E.Bound, schedule, config) -> str:
        if mask_input_names(pat):
            return f"# flex lowering of '{pat.name}': mods and BlockMask generated per call (data-dependent mask)\n"
        return self._runner(pat).plan(bound, {}, frozenset()).source.text

    def load(self, path):
        return None  # nothing to load: the runner compiles Flex's kernel itself

    def runner(self, kernels, pat: ir.PatternIR, bound: E.Bound, schedule, config, *, head_dim: int, dtype: str,
               batch: int, device, inputs: dict | None, kv_heads: int | None = None):
        q, k, v, dout = timing_inputs(bound, head_dim=head_dim, dtype=dtype, batch=batch, device=device,
                                     kv_heads=kv_heads)
        runner, scale, given = self._runner(pat), head_dim ** -0.5, dict(inputs or {})
        leaves = tuple(t.requires_grad_() for t in (q, k, v))

        def run():  # a training step, like the Triton candidates': forward, then dq, dk, dv
            out, lse = runner(bound, q, k, v, given, scale, True)
            return (out, lse, *torch.autograd.grad(out, leaves, dout))

        return run
