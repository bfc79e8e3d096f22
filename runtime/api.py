"""The public entry points: ``compile_attention`` and ``materialize_mask``."""

from __future__ import annotations

import contextlib
import functools

import torch

from ..compiler.analysis import evaluate as E
from ..compiler.analysis.tile_args import parse_tiles
from ..core import ir, route_kinds
from ..core import symbols as S
from ..core.errors import SpecError
from ..core.recurrence_rules import RULES
from . import call_requests, ops, scale_clause
from .admission import admit, first_order
from .checks import (
    WORK_BYTES_PER_PAIR,
    check_fits,
    check_fla_reading,
    check_flag,
    check_qkv,
    check_state,
    resolve_scale,
    state_heads,
)
from .frontends.layouts import check_layout, check_orientation, to_bhnd
from .frontends.paged import DEFAULT_LAYOUT, UnnamedLayout, bind_qkv, refuse_new_tokens
from .numerics import needs_grad, unnormalized_output
from .plan import block_max, clusters, forms, given, kept_summary, routing
from .plan.cache import PlanCache, score_input_names
from .registry import BACKENDS, check_backend, check_recurrence_backend, make_runner

__all__ = ["BACKENDS", "Attention", "compile_attention", "materialize_mask", "resolve_scale", "simulate",
           "simulate_decode"]
from .compiling import compiling
from .pattern_arg import Pattern, as_pattern
from .runner import Call
from .simulation import simulate, simulate_decode
from .warm_calls import WarmCalls, replayable

#: Bound sizes kept per module (distinct shapes of its calls; least recently used dropped).
BOUND_CACHE_SIZE = 16

def materialize_mask(
    pattern,
    n: int | None = None,
    heads: int = 1,
    sizes: dict | None = None,
    inputs: dict | None = None,
    *,
    nk: int | None = None,
    name: str | None = None,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    dk: int | None = None,
    **params,
) -> torch.Tensor:
    """The exact mask of a pattern: bool ``[heads, Nq, Nk]`` (``heads`` is 1 unless given; ``[B, heads, Nq, Nk]``
    when an input has a batch dimension).

    ``pattern`` is a loaded pattern, a path, ``"stdlib:NAME"`` or spec text
    (then ``name=`` and parameters apply). ``n`` is the number of queries (for
    a grid, implied by ``sizes``); ``nk`` the number of keys of a cross-attention
    pattern, or of a self-attention one with a KV cache (``nk > n``: the rows of the
    last n tokens). A routing pattern's selection depends on q and k: with ``q`` and ``k`` given it is
    applied (``[B, heads, Nq, Nk]``), else the mask before selection is returned. A pattern that clusters
    vectors (``cluster(q, C) == cluster(k, C)``) needs ``q`` ``[B, heads, n, dk]`` and ``k``
    ``[B, kv_heads, nk, dk]``; its mask is then ``[B, heads, Nq, Nk]``. ``dk``: the head dim, for a mask that
    reads it (read from ``q`` where it is given).
    """
    pat = as_pattern(pattern, name, params)
    if isinstance(pat, ir.CombinedIR):
        raise SpecError(f"'{pat.name}' combines several attentions: it has no single mask", where="argument pattern",
                        hint="materialize a branch's: pattern.branch(NAME).pattern")
    if isinstance(pat, ir.BucketedIR):
        raise SpecError(f"'{pat.name}' averages each token's attentions over buckets chosen from q and k at every "
                        "call: it has no single mask", where="argument pattern",
                        hint="the mask within a bucket: pattern.pattern")
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is a recurrence and has no mask", where="argument pattern")
    if isinstance(q, torch.Tensor) and q.dim() == 4:
        if dk is not None and dk != q.shape[-1]:
            raise SpecError(f"dk={dk} but q's head dim is {q.shape[-1]}", where="argument dk")
        dk = q.shape[-1]
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes, dk=dk, offset_ok=True)
    vectors = isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    if pat.route is not None and (q is not None or k is not None) and not vectors:
        # one of them given, or not a tensor: the mask before selection would be returned for a call that asked
        # for a selection
        wrong = next((what for what, t in (("q", q), ("k", k)) if not isinstance(t, torch.Tensor)), "q")
        raise SpecError(f"'{pat.name}' routes by q and k: its selection needs both, as tensors (got {wrong} = "
                        f"{type(q if wrong == 'q' else k).__name__})", where=f"argument {wrong}",
                        hint="pass q= [B, heads, n, dk] and k= [B, kv_heads, nk, dk] tensors, or neither for the mask "
                             "before the selection")
    if clusters.mask_derived_inputs(pat) or (pat.route is not None and vectors):
        if not vectors:  # cluster() or a vertical-slash route: the mask depends on the vectors
            why = "clusters" if any(d.derived[0] == "cluster" for d in clusters.derived_inputs(pat)) else "routes by"
            raise SpecError(f"'{pat.name}' {why} the query and key vectors: its mask needs them",
                            where="argument q" if not isinstance(q, torch.Tensor) else "argument k",
                            hint="pass q= [B, heads, n, dk] and k= [B, kv_heads, nk, dk] tensors")
        check_qkv(q, k, k)
        rows = bound.n  # the query rows (after a KV cache, the last n of the nk tokens)
        for what, t, want in (("q", q, (bound.heads, rows)), ("k", k, (None, bound.nk))):
            if t.dim() != 4 or (want[0] is not None and t.shape[1] != want[0]) or t.shape[2] != want[1]:
                raise SpecError(f"{what} has shape {list(t.shape)}; expected [B, {want[0] or 'kv_heads'}, {want[1]}, dk]"
                                f" (heads = {bound.heads}, {rows} queries, {bound.nk} keys)", where=f"argument {what}")
        inputs = clusters.derive_inputs(pat, q, k, dict(inputs or {}), mask_only=True)
    tensors, batch = E.bind_inputs(pat, bound, inputs, required=E.mask_input_names(pat))  # not a bias's
    # the mask is evaluated per head only when it depends on h (else a broadcast view)
    evaluated = (batch or 1) * (bound.heads if S.H in E.substitute(pat.mask, bound).free_symbols else 1)
    sizes_text = f"n = {bound.n}" + (f", nk = {bound.nk}" if bound.nk != bound.n else "") + (
        f", heads = {bound.heads}" if evaluated > 1 else "")
    check_fits(f"materialize_mask: {sizes_text} needs a {float(evaluated * bound.n * bound.nk):.3g}-byte mask",
                evaluated * bound.n * bound.nk * (1 + WORK_BYTES_PER_PAIR),
                "argument n" if pat.queries.kind == "seq" else "argument sizes")
    mask = E.mask_tensor(pat, bound, tensors)
    if pat.route is not None and vectors:  # this q and k's selection applied
        return routing.select_blocks(pat, bound, q.detach(), k.detach(), mask, tensors)
    batched = batch is not None
    return mask if batched else mask[0]


class Attention(torch.nn.Module):
    """A compiled attention pattern or recurrence; call it as ``attn(q, k, v, **inputs)``.

    Softmax patterns: ``q`` ``[B, Hq, Nq, D]``, ``k`` ``[B, Hkv, Nk, D]``, ``v``
    ``[B, Hkv, Nk, Dv]`` with Hq a multiple of Hkv (GQA); returns ``out``
    ``[B, Hq, Nq, Dv]`` or ``(out, lse)`` with ``return_lse=True``. Self-attention with
    ``Nk > Nq`` (a KV cache): the queries are the last Nq of the Nk tokens (positions
    ``Nk - Nq + i``; spec/REFERENCE.md).
    Recurrences: ``initial_state=`` ``[B, Hq, D, Dv]``; ``return_state=True``
    returns ``(out, final_state)``. ``scale`` defaults to ``1/sqrt(D)``.
    Call-time inputs are keyword arguments with their declared shape,
    optionally with a leading batch dimension. ``layout="bnhd"`` (at compile
    time or per call) takes and returns ``[B, N, H, D]`` tensors instead
    (``[B, *spatial, H, D]`` on a grid; see ``runtime.frontends.layouts``).
    ``cu_seqlens=`` (int32/int64 offsets ``[0, n0, n0 + n1, ..., total]``): q, k, v
    pack sequences along the tokens of a batch of one, each computed as if alone
    (a recurrence's ``initial_state`` and final state are then ``[num_seqs, Hq, D, Dv]``;
    see ``runtime.frontends.varlen``).
    ``block_table=`` and ``cache_seqlens=`` (both int32; FlashAttention's ``flash_attn_with_kvcache`` and
    vLLM's convention): k and v are paged KV caches ``[num_pages, page_size, Hkv, D]`` (also under
    ``"bnhd"``), row b's keys the first ``cache_seqlens[b]`` slots of its pages ``block_table[b]``
    (``[B, max_pages]``), its ``Nq`` queries the last of them (positions ``cache_seqlens[b] - Nq + i``);
    with no layout named, a q that reads both as ``[B, H, n, D]`` and as ``[B, n, H, D]`` is refused;
    ``k=``, ``v=`` are appended into the pages first (flash_attn_with_kvcache's); forward only. On the Triton
    backend, a pattern with no route, gate, call-time input or ``scale`` clause reads the pages inside one launch
    per batch (rows of their own query counts with ``cu_seqlens_q=`` and ``max_seqlen_q=``, q ``[1, H, total, D]``;
    nothing read on the host; ``fullgraph=True`` traces it); any other paged call runs once per row length,
    eager under ``torch.compile`` (a graph break; ``runtime.frontends.paged``).
    ``key_summary=`` (an ``attnc.KeySummary``): a block route's key summaries (Quest's page bounds, MoBA's block
    means) kept across the decode steps of one sequence; a step summarises only the keys after the kept blocks,
    which must not change between calls (``runtime.plan.kept_summary``).
    """

    def __init__(self, pattern: Pattern, backend: str, sizes: dict | None, q_tile=None, kv_tile=None,
                 layout: str = "bhnd"):
        super().__init__()
        self.layout = layout  # the default layout of calls (runtime.frontends.layouts)
        self.pattern = pattern
        self.backend = backend
        self.sizes = dict(sizes or {})
        #: what runs: a ``runtime.runner.Runner`` (``auto``: the runner that chooses among the others)
        self.runner = make_runner(pattern, backend, q_tile, kv_tile)
        self._tiles = (q_tile, kv_tile)  # as given (a call with selection= runs a module of the same tiles)
        #: the call-time inputs a softmax pattern's scores read: the only ones differentiated
        self._scored = frozenset(score_input_names(pattern)) if isinstance(pattern, ir.PatternIR) else None
        if isinstance(pattern, ir.PatternIR) and pattern.route is not None and pattern.route.kind != route_kinds.GIVEN.name:
            self._given_module()  # made here, not inside a torch.compile trace of a call with selection=
        # the module's key in the ops' registry: attnc::varlen_attention (cu_seqlens) and attnc::score_scale
        # (a `scale E` clause) find it by this key under torch.compile
        self._varlen_key = ops.register(self)
        self._last_call: dict | None = None
        #: the launches of calls the runner may replay, per signature (``runtime.warm_calls``); None where the
        #: module's calls are never replayed
        self._warm: WarmCalls | None = WarmCalls() if replayable(pattern, self.runner) else None

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("_warm") is not None:  # kernels and device tensors: a copy binds its own
            state = {**state, "_warm": WarmCalls()}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._varlen_key = ops.register(self)  # a copy (deepcopy, pickle) gets its own registry entry

    @property
    def auto(self) -> bool:
        return self.backend == "auto"

    @property
    def chosen_backend(self) -> str | None:
        """The backend that ran the latest softmax call: ``"cpu"`` or ``"flex"`` under ``auto`` on CPU
        tensors (``last_choice`` says why), ``"triton"`` or ``"flex"`` (the autotuner's winner) under
        ``auto`` on CUDA tensors, else the backend asked for; None before the first call of ``auto``."""
        return getattr(self.runner, "chosen", self.backend)

    @property
    def last_choice(self):
        """``auto`` on CPU tensors: the ``auto.cpu.Choice`` of the latest call (modelled times, reason)."""
        return self.runner.last if self.auto else None

    def warmup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> str | None:
        """One call ``attn(q, k, v, **kwargs)`` that pays the first call's costs now, before serving: plans,
        and under ``backend="auto"`` on CPU tensors the compile of Flex's kernel for these shapes where Flex
        is modelled faster (tens of seconds; otherwise ``auto`` compiles it mid-run, at the call where the
        break-even rule says so). Call it as the serving calls will run (the same shapes, dtype and grad
        mode: under ``torch.inference_mode()`` for inference). With
        ``attnc.runtime.auto.cpu.COMPILE_COST_S = math.inf`` besides, ``auto`` never compiles mid-run:
        shapes not warmed up stay on the executor. Returns the backend that ran (``chosen_backend``);
        what ``auto`` chose and why is logged to the ``attnc.auto`` logger."""
        policy = self.runner if self.auto and hasattr(self.runner, "compile_now") else None
        if policy is not None:
            policy.compile_now = True
        try:
            self(q, k, v, **kwargs)
        finally:
            if policy is not None:
                policy.compile_now = False
        return self.chosen_backend

    @property
    def schedule(self):
        """The TileSchedule of the latest call (None before the first call or on the reference backend)."""
        return self.runner.last_schedule

    def report(self, hardware="h100", dtype: str = "bf16", **kwargs):
        """The simulator's prediction for the shapes of the latest call (``attnc.simulate``) on a hardware
        model (``hardware``) in ``dtype`` (bf16 or fp16): what the pattern can reach there, whatever
        device and dtype the call itself ran on."""
        last = self._last_call
        if last is None:  # under torch.compile the call's shapes are known where its op ran
            runners = [self.runner, *(r for r in vars(self.runner).values() if hasattr(r, "traced_call"))]
            last = next((r.traced_call for r in runners if getattr(r, "traced_call", None) is not None), None)
        if last is None:
            raise SpecError("call the module once first (eagerly or compiled): the report is for the shapes of a "
                            "call", where="report")
        args = {**last, **kwargs}
        if self.schedule is not None and "q_tile" not in kwargs:
            args.update(q_tile=self.schedule.q_tile, kv_tile=self.schedule.kv_tile)
        if isinstance(self.pattern, ir.RecurrenceIR) and "q_tile" not in kwargs and self.runner.chunk is None:
            args.pop("q_tile", None)  # the chunk the call chose, not one it was given: the simulator chooses too
        return simulate(self.pattern, hardware=hardware, dtype=dtype, **args)

    @property
    def source(self) -> str:
        """What runs: the runner's plan, generated code or dense computation for the latest call."""
        return self.runner.describe()

    def extra_repr(self) -> str:
        return f"{self.pattern.kind} {self.pattern.name!r}, backend={self.backend!r}"

    def forward(
        self,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        /,  # q=, k=, v= by keyword are bound by bind_qkv: k=, v= beside k, v are a paged call's new ones
        *,
        scale: float | None = None,
        return_lse: bool = False,
        initial_state: torch.Tensor | None = None,
        return_state: bool = False,
        sizes: dict | None = None,
        layout: str | None = None,
        cu_seqlens: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
        cache_seqlens: torch.Tensor | None = None,
        selection: torch.Tensor | None = None,
        return_selection: bool = False,
        return_block_max: int | None = None,
        key_summary: kept_summary.KeySummary | None = None,
        **inputs,
    ):
        warm = self.__dict__.get("_warm")
        if (warm is not None and not inputs and sizes is None and layout is None and cu_seqlens is None
                and block_table is None and cache_seqlens is None and selection is None and return_selection is False
                and return_block_max is None and key_summary is None and initial_state is None
                and return_state is False and self.layout == "bhnd"):
            key = warm.key(self, q, k, v, scale, return_lse)
            if key is not None:  # a call its runner may replay (runner.launcher): plan once, run many
                return warm.call(self, key, q, k, v, scale, return_lse, self._forward_call)
        elif (warm is not None and block_table is not None and cache_seqlens is not None and sizes is None
              and cu_seqlens is None and selection is None and return_selection is False and return_block_max is None
              and key_summary is None and initial_state is None and return_state is False):
            key = warm.paged_key(self, q, k, v, block_table, cache_seqlens, scale, return_lse, layout, inputs)
            if key is not None:  # a paged call its runner may replay (runner.paged_launcher): lengths on the device
                return warm.paged_call(self, key, q, k, v, block_table, cache_seqlens, scale, return_lse, layout,
                                       inputs, self._forward_call)
        return self._forward_call(q, k, v, scale=scale, return_lse=return_lse, initial_state=initial_state,
                                  return_state=return_state, sizes=sizes, layout=layout, cu_seqlens=cu_seqlens,
                                  block_table=block_table, cache_seqlens=cache_seqlens, selection=selection,
                                  return_selection=return_selection, return_block_max=return_block_max,
                                  key_summary=key_summary, **inputs)

    def _forward_call(
        self,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        /,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        initial_state: torch.Tensor | None = None,
        return_state: bool = False,
        sizes: dict | None = None,
        layout: str | None = None,
        cu_seqlens: torch.Tensor | None = None,
        block_table: torch.Tensor | None = None,
        cache_seqlens: torch.Tensor | None = None,
        selection: torch.Tensor | None = None,
        return_selection: bool = False,
        return_block_max: int | None = None,
        key_summary: kept_summary.KeySummary | None = None,
        **inputs,
    ):
        q, k, v = bind_qkv(q, k, v, inputs)
        if sizes is not None and not isinstance(sizes, dict):
            raise SpecError(f"expected a dict of sizes, got {type(sizes).__name__}", where="argument sizes")
        if key_summary is not None:  # the route's block summaries kept across decode steps (plan.kept_summary)
            call_requests.check_key_summary(self.pattern, key_summary, selection, cu_seqlens, block_table, cache_seqlens)
            with kept_summary.keeping(key_summary):
                return self.forward(q, k, v, scale=scale, return_lse=return_lse, sizes=sizes, layout=layout,
                                    block_table=block_table, cache_seqlens=cache_seqlens,
                                    return_selection=return_selection, return_block_max=return_block_max,
                                    **inputs)
        if return_block_max is not None:  # SeerAttention's map, made by the forward (runtime.plan.block_max)
            size = call_requests.check_block_max(self.pattern, self.backend, return_block_max, cu_seqlens, block_table,
                                                 cache_seqlens)
            with block_max.requesting(size) as made:
                result = self.forward(q, k, v, scale=scale, return_lse=return_lse, sizes=sizes, layout=layout,
                                      selection=selection, return_selection=return_selection, **inputs)
            if not made:  # a path that pools nothing where this call can see it
                raise SpecError("this call made no block max it can return", where="argument return_block_max")
            pooled = made[-1].to(q.device)
            return (*result, pooled) if isinstance(result, tuple) else (result, pooled)
        if selection is not None and any(d.name == given.SELECTION for d in getattr(self.pattern, "inputs", ())):
            inputs[given.SELECTION], selection = selection, None  # the pattern's own input of that name
        return_selection = check_flag("return_selection", return_selection)
        if selection is not None or return_selection:
            call_requests.check_selection(self.pattern, selection, return_selection, cu_seqlens, block_table,
                                             cache_seqlens)
            if selection is not None:  # the route reads it instead of choosing (runtime.plan.given)
                for name in self.__dict__["_route_only"]:  # an indexer's inputs: not needed, not refused
                    inputs.pop(name, None)
                inputs[given.SELECTION] = selection.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
                return self._given_module().forward(q, k, v, scale=scale, return_lse=return_lse, sizes=sizes,
                                                    layout=layout, return_selection=return_selection, **inputs)
            with given.recording() as made:
                result = self.forward(q, k, v, scale=scale, return_lse=return_lse, sizes=sizes, layout=layout,
                                      **inputs)
            if not made:  # a path that does not select where this call can see it (it would be a wrong answer)
                raise SpecError("this call made no selection it can return", where="argument return_selection")
            B, Hq, Nq = q.shape[0], made[0].shape[1], made[0].shape[2]
            chosen = made[0].expand(B, Hq, Nq, made[0].shape[-1]).to(q.device)  # the reference selects on the CPU
            return (*result, chosen) if isinstance(result, tuple) else (result, chosen)
        return self._plain_call(q, k, v, scale, return_lse, initial_state, return_state, sizes, layout, cu_seqlens,
                                block_table, cache_seqlens, inputs)

    def _plain_call(self, q, k, v, scale, return_lse, initial_state, return_state, sizes, layout, cu_seqlens,
                    block_table, cache_seqlens, inputs: dict):
        """A call with no selection, block max or kept summary asked for: its layout, paged caches and packed
        sequences resolved, its arguments checked, then the runner's forward (``_forward``)."""
        layout = self.layout if layout is None else check_layout(layout)
        route = getattr(self.pattern, "route", None)
        given_scores = route is not None and route.scores_input is not None
        if given_scores and cu_seqlens is not None:
            raise SpecError(f"'{self.pattern.name}' reads block scores given per call ('{route.scores_input}', one column "
                            "per key block of one sequence): not with packed sequences in this version",
                            where="argument cu_seqlens", hint="call each sequence on its own")
        if block_table is not None or cache_seqlens is not None:  # paged KV caches keep their own layout
            from .frontends import paged

            one_launch = getattr(self.runner, "paged_forward", None)  # a runner that reads pages in its kernels
            if one_launch is not None and compiling():  # the op around it: nothing traced inside
                from .ops.paged import launcher

                one_launch = launcher(self.runner)
            kept = (not compiling() and isinstance(self.pattern, ir.PatternIR)  # (refused there)
                    and kept_summary.open_for(self.pattern) is not None)
            only = (kept_summary.WHERE, "a paged call keeps its route's block summaries only where it runs in one "
                    "launch (the Triton backend, MoBA's and Quest's routes, q of the kernels' dtypes)") if kept else None
            if given_scores:  # each row's columns are its own key blocks: the one launch reads them at its positions
                only = ("argument block_table", f"'{self.pattern.name}' reads block scores given per call "
                        f"('{route.scores_input}', one column per key block of a row): a paged call takes them only where "
                        f"it runs in one launch (the Triton backend, q of the kernels' dtypes, '{route.scores_input}' "
                        "over the block table's capacity, [B | 1, heads, max_pages * page_size, blocks])")
            return paged.run(self.forward, self.pattern, layout, q, k, v, block_table, cache_seqlens, cu_seqlens,
                             scale=scale, return_lse=return_lse, initial_state=initial_state,
                             return_state=return_state, sizes=sizes, inputs=inputs, runner=self.runner,
                             one_launch=one_launch, one_launch_only=only,
                             refuse_cached_rows=functools.partial(forms.refuse_query_offset, self.pattern))
        refuse_new_tokens(self.pattern, inputs)  # k=, v= without pages: named, not an unknown input
        if isinstance(self.pattern, ir.RecurrenceIR) and isinstance(layout, UnnamedLayout):
            check_fla_reading(q, v, initial_state)  # fla's [B, T, H, K] would run as T heads of H tokens
        # the runners compute in [B, H, N, D]: other layouts become views here and the results views back
        q, k, v, inputs, sizes, restore = to_bhnd(self.pattern, layout, q, k, v, inputs, sizes, self.sizes)
        check_qkv(q, k, v, gva=getattr(self.pattern, "rule", None) == "delta", packed=cu_seqlens is not None)
        if cu_seqlens is not None:  # inputs over the packed tokens: checked before any other shape rule
            from .frontends.varlen import check_packed_inputs

            check_packed_inputs(self.pattern, inputs, q.shape[2])
        if restore.spatial is None:
            check_orientation(self.pattern, layout, q, k, inputs, {**self.sizes, **(sizes or {})})
        check_state(initial_state, q, "initial_state")
        return_lse, return_state = check_flag("return_lse", return_lse), check_flag("return_state", return_state)
        if isinstance(self.pattern, ir.PatternIR):
            inputs = self._scored_only_differentiated(inputs)
        q, k, v, inputs = first_order(self.runner, q, k, v, inputs)  # double backward: one refusal everywhere
        run = self._forward
        if cu_seqlens is not None and compiling():  # the offsets are data: the op reads them
            from .ops import varlen as varlen_op

            scale = resolve_scale(scale, q.shape[-1], q.dtype)
            run = functools.partial(varlen_op.run, self, cu_seqlens)
        elif cu_seqlens is not None:  # packed sequences: one forward per group of equal lengths (frontends.varlen)
            from .frontends import varlen

            run = functools.partial(varlen.run, self._forward, self.pattern,
                                    varlen.check_cu_seqlens(cu_seqlens, self.pattern, q, k))
        with autocast_off(q.device.type, q.dtype) as low:
            if low is not None:
                q, k, v = q.to(low), k.to(low), v.to(low)
            return restore.result(run(q, k, v, scale=scale, return_lse=return_lse, initial_state=initial_state,
                                      return_state=return_state, sizes=sizes, **inputs), return_lse, return_state)

    def _given_module(self) -> Attention:
        """The module a call with ``selection=`` runs (``given.given_pattern``), made once."""
        module = self.__dict__.get("_given")
        if module is None:
            q_tile, kv_tile = getattr(self, "_tiles", (None, None))
            module = Attention(given.given_pattern(self.pattern), self.backend, self.sizes, q_tile, kv_tile,
                               self.layout)
            self.__dict__["_given"] = module
            self.__dict__["_route_only"] = given.route_only_inputs(self.pattern)
        return module

    def _forward(self, q, k, v, *, scale, return_lse, initial_state, return_state, sizes, **inputs):
        scale = resolve_scale(scale, q.shape[-1], q.dtype)
        all_sizes = {**self.sizes, **{name: E.plain_ints(value) for name, value in (sizes or {}).items()}}
        if isinstance(self.pattern, ir.RecurrenceIR):
            return self._recurrence(q, k, v, scale, return_lse, initial_state, return_state, all_sizes, inputs)
        # cluster(q | k, C): the ids of this call's vectors, on q's device, before anything binds the inputs
        inputs = clusters.derive_inputs(self.pattern, q, k, inputs, scale)
        if self.pattern.score_scale is not None:  # `scale E`: every backend runs the queries times E
            scaled = self._score_scale(q, k.shape[2], all_sizes)
            q = (q.to(scaled.dtype) * scaled).to(q.dtype)  # in fp32 (fp64 for fp64 q), rounded once to q's dtype
        if initial_state is not None or return_state:
            raise SpecError(f"'{self.pattern.name}' is a softmax pattern: only recurrences carry a state",
                            where="argument initial_state" if initial_state is not None else "argument return_state",
                            hint="return_lse=True returns (out, lse)" if initial_state is None else None)
        weights = getattr(self.pattern, "weights", None)
        unnormalized = weights is not None and not weights.normalized  # its output needs the row sums (lse)
        if compiling():
            # Sizes and inputs are bound inside the runner's custom op (sympy is not traceable);
            # eager calls check them here, with clear errors.
            need_lse = return_lse or unnormalized
            runner = self.runner.traced(q, k, v, inputs, need_lse) if hasattr(self.runner, "traced") else self.runner
            if runner.support.compile:
                out, lse = ops.traced_attention(runner, q, k, v, inputs, all_sizes, scale, need_lse)
                out = unnormalized_output(self.pattern, out, lse)
                return (out, lse) if return_lse else out
        call = self._bind_call(q, k, v, scale, return_lse or unnormalized, all_sizes, inputs)
        out, lse = self.runner.forward(call, q, k, v)
        out = unnormalized_output(self.pattern, out, lse)  # weights not divided by their sum: times that sum
        return (out, lse) if return_lse else out

    def _scored_only_differentiated(self, inputs: dict) -> dict:
        """The inputs the scores do not read (a route's indexer or gate, a mask's table) detached: they take no
        gradient, None on every backend (a kernel backend's op would otherwise hand back zeros for them)."""
        return {name: t.detach() if isinstance(t, torch.Tensor) and t.requires_grad and name not in self._scored
                else t for name, t in inputs.items()}

    def _score_scale(self, q: torch.Tensor, Nk: int, all_sizes: dict) -> torch.Tensor:
        """The pattern's ``scale E`` at every query row and head of this call, ``[1, Hq, Nq, 1]`` on q's device
        in q's compute dtype (float32, float64 for float64 q): multiplied into q (the product rounded to q's
        dtype), it scales each query's dot products, on every backend and path, differentiably."""
        _, Hq, Nq, D = q.shape
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if compiling():  # sympy binds the sizes: inside a custom op (fullgraph traces)
            from .ops.score_scale import score_scale

            return score_scale(self._varlen_key, Nq, Nk, Hq, D, ops.encode_sizes(all_sizes), q.device, dtype)
        return self._score_scale_of(Nq, Nk, Hq, D, all_sizes, q.device, dtype)

    def _score_scale_of(self, Nq: int, Nk: int, Hq: int, D: int, all_sizes: dict, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
        """``_score_scale`` of these sizes, checked and cached per sizes (``attnc::score_scale`` runs it)."""
        key = (Nq, Nk, Hq, D, tuple(sorted(all_sizes.items())), device, dtype)
        cache = self.__dict__.setdefault("_score_scales", PlanCache(BOUND_CACHE_SIZE))
        if key not in cache:
            cache[key] = scale_clause.checked(self.pattern, self._bound_of(Nq, Nk, Hq, D, all_sizes), Hq, Nq, device,
                                              dtype)
        return cache[key]

    def _bound_of(self, Nq: int, Nk: int, Hq: int, D: int, all_sizes: dict) -> E.Bound:
        """The sizes of a call bound and checked (``evaluate.bind_sizes``), once per distinct shapes: binding
        substitutes into the layout's sympy extents, most of a small call's host time."""
        try:
            key = (Nq, Nk, Hq, D, tuple(sorted(all_sizes.items())))
            hash(key)
        except TypeError:  # a size that is not even hashable: bind_sizes names it
            key = None
        cache = self.__dict__.setdefault("_bounds", PlanCache(BOUND_CACHE_SIZE))
        if key is not None and key in cache:
            return cache[key]
        try:
            bound = E.bind_sizes(self.pattern, n=Nq, nk=Nk, heads=Hq, sizes=all_sizes, dk=D, offset_ok=True)
        except SpecError as err:  # n and nk come from q and k here: name those
            if err.where not in ("argument n", "argument nk"):
                raise
            raise SpecError(err.message, where="argument q" if err.where == "argument n" else "argument k",
                            hint=err.hint) from None
        if key is not None:
            cache[key] = bound
        return bound

    def _bind_call(self, q, k, v, scale: float, need_lse: bool, all_sizes: dict, inputs: dict) -> Call:
        """The call bound once (sizes, inputs, softcap, route sizes), every argument checked before any
        work; errors name the argument."""
        pat = self.pattern
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        bound = self._bound_of(Nq, Nk, Hq, D, all_sizes)
        self._last_call = {"n": Nq, "nk": Nk if not pat.self_attention else None, "heads": Hq,
                           "head_dim": D, "batch": B, "sizes": all_sizes or None}
        admit(self.runner, bound, q, k, v, inputs)  # the checks every path applies (the compiled one in its op)
        return Call(bound=bound, batch=B, heads=Hq, kv_heads=Hkv, head_dim=D, value_dim=Dv, dtype=q.dtype,
                    device=q.device, grad=needs_grad(q, k, v, *inputs.values()), need_lse=need_lse,
                    scale=float(scale), inputs=dict(inputs), sizes=all_sizes)

    def _recurrence(self, q, k, v, scale: float, return_lse, initial_state, return_state, all_sizes: dict,
                    inputs: dict):
        B, _, Nq, D = q.shape
        Hq = state_heads(q, v)  # q's heads, or v's under grouped value attention (the delta rule)
        if return_lse:
            raise SpecError("a recurrence has no log-sum-exp", where="argument return_lse")
        if Nq != k.shape[2]:
            raise SpecError(f"q has {Nq} tokens but k has {k.shape[2]}", where="argument k")
        if initial_state is not None:
            rows = RULES[self.pattern.rule].state_rows * D  # Titans: the memory, then its momentum
            check_state(initial_state, q, "initial_state", (B, Hq, rows, v.shape[-1]))
        if compiling():
            # sympy and the cost model are not traceable: sizes, inputs and the chunk are bound
            # inside the custom op; eager calls check them here, with clear errors
            from .ops.recurrence import recurrence_op

            out, state = recurrence_op(q, k, v, list(inputs.values()), initial_state, self.runner.op_key,
                                       ",".join(inputs), ops.encode_sizes(all_sizes), float(scale))
            return (out, state) if return_state else out
        out, state, chunk = self.runner.run(q, k, v, inputs, all_sizes, float(scale), initial_state)
        self.runner.last_chunk = chunk
        self._last_call = {"n": Nq, "heads": Hq, "head_dim": D, "batch": B, "q_tile": chunk}
        return (out, state) if return_state else out

    def step(self, q, k, v, state=None, *, scale: float | None = None, layout: str | None = None, **inputs):
        """One decoding step of a recurrence (the recurrent form, for inference loops):
        ``o_t, state = attn.step(q_t, k_t, v_t, state, **gates)``.

        ``q_t`` ``[B, Hq, Dk]``, or with a token axis of 1 where the layout puts it (``[B, Hq, 1, Dk]``;
        ``[B, 1, Hq, Dk]`` under ``layout="bnhd"``, fla's decoding shape), ``k_t`` ``[B, Hkv, Dk]``, ``v_t``
        ``[B, Hkv, Dv]`` (q's form); ``state`` ``[B, Hq, Dk, Dv]`` in both layouts (None: zeros, e.g. the first
        token; or the final state of a forward with ``return_state=True``); call-time gates for this token in
        the same form: ``[B, Hq, 1(, Dk)]`` (``g[:, :, t:t+1]`` of a ``[B, heads, n]`` input), ``[B, 1, Hq(, Dk)]``
        under ``"bnhd"`` (fla's ``g[:, t:t+1]``), or ``[B, Hq(, Dk)]`` in both (the batch optional). ``layout``
        defaults to the module's. Returns ``(o_t, new_state)``: ``o_t`` in q's form with Dv, the state in
        float32 (float64 for float64 inputs). Differentiable."""
        if not isinstance(self.pattern, ir.RecurrenceIR):
            raise SpecError(f"'{self.pattern.name}' is a softmax pattern: step() is for recurrences",
                            where="argument pattern", hint="decode a softmax pattern with a KV cache and forward")
        from .recurrences import runner as recurrence

        for name, why in (("return_state", "step() always returns (o_t, new_state)"),
                          ("initial_state", "step() takes the state as its fourth argument: step(q_t, k_t, v_t, state)")):
            if name in inputs:  # a keyword of forward, not of step (it would be read as an input of that name)
                raise SpecError(f"{name}= is a keyword of the forward, not of step()", where=f"argument {name}",
                                hint=why)
        layout = self.layout if layout is None else check_layout(layout)
        if isinstance(q, torch.Tensor):
            check_state(state, q, "state")
        return recurrence.decode_step(self.pattern, self.sizes, q, k, v, state, scale, inputs, layout)


@contextlib.contextmanager
def autocast_off(device: str, dtype: torch.dtype):
    """As torch's own attention under autocast: q, k, v in the autocast dtype (yielded; None when autocast is off
    or q is float64), the output in that dtype; each runner then computes in its own precision (fp32
    accumulation), with autocast off so that no matmul inside changes dtype."""
    if not torch.is_autocast_enabled(device) or dtype == torch.float64:
        yield None
        return
    low = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        yield low


def compile_attention(
    pattern,
    *,
    backend: str = "auto",
    sizes: dict | None = None,
    name: str | None = None,
    q_tile=None,
    kv_tile=None,
    layout: str = DEFAULT_LAYOUT,  # "bhnd", but not named: a paged call refuses a q it can read both ways
    **params,
) -> Attention:
    """Compile a pattern or recurrence into a differentiable ``torch.nn.Module``.

    ``pattern``: a loaded pattern, a path, ``"stdlib:NAME"`` or spec text
    (``name=`` picks a declaration; other keywords set parameters).
    ``sizes``: grid axis extents by size name (also accepted at call time).
    ``backend``: ``"cpu"`` runs the tile executor (only the KV tiles each Q
    tile needs; forward and backward); ``"reference"`` is the exact dense
    implementation; ``"triton"`` runs generated Triton kernels (natively on
    CUDA tensors, under the Triton interpreter on CPU tensors); ``"flex"``
    lowers the pattern to PyTorch's FlexAttention (``runtime.backends.flex``);
    ``"auto"``
    picks Triton on CUDA tensors and, on CPU tensors, the CPU executor or the Flex
    lowering per call by a modelled rule (``runtime.auto.cpu``; the pick is
    ``attn.chosen_backend``).
    ``q_tile``/``kv_tile`` force the tile shape: tokens per tile on a sequence; on a
    grid one extent per axis (a box) or one int (flat tiles of the row-major token
    order); kv_tile defaults to q_tile (``compiler.analysis.tile_args``; checked now).
    Recurrences: ``"cpu"`` is the chunked torch path, ``"triton"`` the chunked
    Triton kernels (the interpreter on CPU tensors), ``"auto"`` Triton on CUDA
    tensors and the chunked torch path otherwise; ``q_tile`` forces the chunk
    size (16, 32 or 64; the simulator chooses otherwise). Decoding: ``step``.
    ``layout``: ``"bhnd"`` (``[B, H, N, D]``) or ``"bnhd"`` (``[B, N, H, D]``, and
    ``[B, *spatial, H, D]`` on a grid, whose extents then give the sizes): the
    default of every call (a call may pass its own); results come back in it
    (``runtime.frontends.layouts``; ``step`` takes ``[B, H, D]`` or the layout's one-token form).
    Not given, it is ``"bhnd"``, except that a recurrence's call that names no layout either is refused
    where its q reads as more heads than tokens (more than one token), as flash-linear-attention's
    ``[B, T, H, K]`` tensors read (fla's layout is ``"bnhd"``), or where its ``initial_state`` has as many
    heads as q has tokens (``checks.check_fla_reading``): naming the layout runs it.
    """
    check_layout(layout)
    check_backend(backend)
    # numpy integers and 0-d int tensors as ints, once: a backend that checks them later saw another type
    q_tile, kv_tile = E.plain_ints(q_tile), E.plain_ints(kv_tile)
    if isinstance(sizes, dict):
        sizes = {name: E.plain_ints(value) for name, value in sizes.items()}
    pat = as_pattern(pattern, name, params)
    if isinstance(pat, ir.BucketedIR):  # buckets chosen per call, attended in plain torch (runtime.bucketed)
        from .bucketed import BucketedAttention

        for what, value in (("q_tile", q_tile), ("kv_tile", kv_tile)):
            if value is not None:
                raise SpecError(f"'{pat.name}' attends its buckets in torch: it has no tiles", where=f"argument {what}")
        if sizes is not None:
            E.check_size_names(pat.pattern, sizes)
        return BucketedAttention(pat, backend, layout)
    if sizes is not None:
        # Bad names and values, and windows that do not fit a fully sized grid,
        # are reported now rather than at the first call.
        E.check_size_names(pat, sizes)
        layouts = (pat.queries, pat.keys) if isinstance(pat, ir.PatternIR) else ()
        if (layouts and all(lay.token_count() is not None for lay in layouts)  # grids, concatenations
                and len(sizes) == len(E.check_size_names(pat, {}))):
            E.bind_sizes(pat, sizes=sizes)
    if isinstance(pat, ir.RecurrenceIR):
        from .recurrences import common as recurrence

        check_recurrence_backend(pat, backend)
        if kv_tile is not None:
            raise SpecError("a recurrence has no KV tiles", where="argument kv_tile",
                            hint="q_tile= sets its chunk size (16, 32 or 64)")
        chunk = None if q_tile is None else E.positive_int("q_tile", q_tile)
        return Attention(pat, backend, sizes, recurrence.check_chunk(chunk), None, layout)
    if isinstance(pat, ir.CombinedIR):  # one Attention per branch, combined in plain torch (runtime.combined)
        from .combined import CombinedAttention

        for b in pat.branches:
            parse_tiles(b.pattern, q_tile, kv_tile)
        return CombinedAttention(pat, lambda p: Attention(p, backend, sizes, q_tile, kv_tile), backend, layout)
    parse_tiles(pat, q_tile, kv_tile)  # refused now, on every backend, rather than at the first call
    return Attention(pat, backend, sizes, q_tile, kv_tile, layout)
