"""Combined patterns at run time (``ir.CombinedIR``: ``branch`` ... ``combine``, e.g. stdlib ``nsa``).

Every branch is an ordinary ``PatternIR`` run by its own ``Attention`` on the chosen backend, so each
backend runs it unchanged; what a combined pattern adds is plain torch, differentiable:

- a pooled branch (``keys pooled(mean, SIZE)``) gets the means of runs of SIZE keys and values (the
  last, shorter run the mean of its own tokens), as flash-linear-attention's ``mean_pooling``; with
  ``keys pooled(max, SIZE)`` (Combiner's summaries) the runs' elementwise-max keys, and as values each run's
  own attention (softmax of ``scale * qmax . k`` over the run's keys) by the run's elementwise-max query
  (``pool_summary``: one value per query head);
- a route ``by probs(NAME)`` gets its scores as an input: NAME's attention probabilities (softmax of
  ``scale * q . k`` over the keys NAME's mask allows; 0 for a query with none), averaged over the query
  heads of each GQA group (one selection per KV head, as NSA's kernels load one KV block per group);
  not differentiated, as any route's selection;
- the output ``sum(gate[b, h, q] * branch_out)`` over the ``combine`` terms (gates differentiable), or with
  ``combine softmax(A, B, ...)`` the branches merged by their log-sum-exps into one softmax over all their
  keys (``merge_softmax``);
- packed sequences (``cu_seqlens``): each sequence computed alone, every input cut along its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..compiler.analysis.call_keywords import CALL_KEYWORDS, unknown_input_hint
from ..core import ir
from ..core.errors import SpecError
from .checks import check_qkv, resolve_scale
from .combined_paged import PagedCombined, check_gates
from .combined_paged import applies as paged_applies
from .compiling import compiling
from .frontends import paged
from .frontends.layouts import check_layout, sequence_qkv
from .frontends.paged import bind_qkv
from .numerics import compute_dtype, merge_softmax, tied_to
from .ops.paged import launcher
from .plan import forms
from .plan.cache import PlanCache
from .pooled_probs import group_mean, mask_only, pooled_probs


def _runs(x: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """``x`` ``[B, H, N, D]`` as ``[B, H, ceil(N / size), size, D]`` in its compute dtype, the last run padded
    with ``fill`` (a view of x where it needs neither a copy nor a pad)."""
    B, H, N, D = x.shape
    runs = -(-N // size)
    work = x.to(compute_dtype(x.dtype))
    if runs * size != N:
        work = torch.nn.functional.pad(work, (0, 0, 0, runs * size - N), value=fill)
    return work.reshape(B, H, runs, size, D)


def pool_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Means of runs of ``size`` tokens: ``[B, H, N, D]`` -> ``[B, H, ceil(N / size), D]``; the last run,
    when shorter, is the mean of its own tokens. Computed in fp32 (fp64) and returned in x's dtype."""
    N = x.shape[2]
    runs = _runs(x, size, 0.0)
    counts = (N - torch.arange(runs.shape[2], device=x.device) * size).clamp(max=size).to(runs.dtype)
    return (runs.sum(3) / counts[:, None]).to(x.dtype)


def pool_max(x: torch.Tensor, size: int) -> torch.Tensor:
    """Elementwise maxima of runs of ``size`` tokens: ``[B, H, N, D]`` -> ``[B, H, ceil(N / size), D]`` (the last
    run, when shorter, of its own tokens), in x's dtype."""
    return _runs(x, size, -math.inf).amax(3).to(x.dtype)


def pool_summary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: int, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combiner's max summaries of runs of ``size`` tokens (``keys pooled(max, SIZE)``): the keys' elementwise
    maxima, and as values each run's attention over its own keys (all of them) by its elementwise-max query,
    ``softmax(scale * qmax_r . k_j) v_j``. Both per query head, ``[B, Hq, ceil(N / size), D | Dv]`` (the
    values differ per query head, so the keys are repeated to match), in q's dtype; differentiable."""
    Hq, Hkv, N = q.shape[1], k.shape[1], k.shape[2]
    group = Hq // Hkv
    heads = (lambda x: x.repeat_interleave(group, 1)) if group > 1 else (lambda x: x)  # noqa: E731
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else compute_dtype(q.dtype)
    qmax = _runs(q, size, -math.inf).amax(3).to(dtype)  # [B, Hq, R, D]
    kr, vr = heads(_runs(k, size, 0.0).to(dtype)), heads(_runs(v, size, 0.0).to(dtype))  # [B, Hq, R, size, D]
    score = torch.einsum("bhrd,bhrsd->bhrs", qmax, kr) * scale
    if N % size:  # the last run's padded slots weigh 0
        inside = torch.arange(kr.shape[2] * size, device=q.device).view(kr.shape[2], size) < N
        score = score.masked_fill(~inside, -math.inf)
    values = torch.einsum("bhrs,bhrsd->bhrd", torch.softmax(score, dim=-1), vr)
    return heads(pool_max(k, size)), values.to(q.dtype)


class CombinedAttention(torch.nn.Module):
    """A compiled combined pattern; call it as ``attn(q, k, v, GATE=..., ...)``: q ``[B, Hq, n, D]``, k and v
    ``[B, Hkv, n, D]`` (``layout="bnhd"``: ``[B, n, H, D]``, gates ``[B, n, heads]`` as fla's), gates
    ``[heads, n]`` or ``[B, heads, n]``; returns ``[B, Hq, n, Dv]`` in q's dtype (and, merged into one softmax
    with ``combine softmax(...)``, its log-sum-exp ``[B, Hq, n]`` with ``return_lse=True``). ``branches`` holds one
    ``Attention`` per branch. Differentiable in q, k, v and the gates.

    Queries after a KV cache (k, v ``[B, Hkv, nk, D]`` with nk > n: the queries are the last n tokens) take
    gates ``[heads, n]`` for the present queries or ``[heads, nk]`` for the whole sequence (its last n rows
    read); paged caches (``block_table=``, ``cache_seqlens=``, as ``Attention``'s) take them for the present
    queries, ``[B, heads, n]`` (``[1, heads, total]`` with ``cu_seqlens_q``), one launch per branch where the
    branches' runners serve it (``combined_paged``)."""

    def __init__(self, pattern: ir.CombinedIR, make: Callable[[ir.PatternIR], torch.nn.Module], backend: str,
                 layout: str = "bhnd"):
        super().__init__()
        self.pattern = pattern
        self.backend = backend
        self.layout = layout
        self.branches = torch.nn.ModuleDict({b.name: make(b.pattern) for b in pattern.branches})
        # the branches' one-launch server of paged calls (made here: a traced call registers nothing), or None
        self._paged_server = PagedCombined(pattern, self.branches) if paged_applies(pattern) else None
        self._last_n: int | None = None

    #: No single tile schedule: each branch has its own (``branches[NAME].schedule``).
    schedule = None

    def report(self, hardware="h100", dtype: str = "bf16", **kwargs) -> CombinedReport:
        """The simulator's prediction for the shapes of the latest call: every branch's own ``report`` (a pooled
        branch against its runs), summed as ``attnc.simulate`` sums a combined pattern's branches."""
        if self._last_n is None:
            raise SpecError("call the module once first: the report is for the shapes of a call", where="report")
        reports = {name: attn.report(hardware, dtype, **kwargs) for name, attn in self.branches.items()}
        return CombinedReport(self.pattern.name, self._last_n, reports, [unmodelled(self.pattern)])

    @property
    def source(self) -> str:
        """What ran in the latest call, branch by branch."""
        return "\n\n".join(f"# branch {name}\n{attn.source}" for name, attn in self.branches.items())

    def extra_repr(self) -> str:
        return f"combined {self.pattern.name!r}, backend={self.backend!r}"

    def _refuse(self, return_lse, initial_state, return_state, key_summary=None) -> None:
        name = self.pattern.name
        if key_summary is not None:
            raise SpecError(f"'{name}' is a combined pattern: it keeps no key summary", where="argument key_summary",
                            hint="key_summary= is for routes scored by q @ bound(k) or q @ mean(k) (quest, moba)")
        if return_lse and self.pattern.merge != "softmax":
            raise SpecError(f"'{name}' sums several attentions: it has no single log-sum-exp", where="argument return_lse",
                            hint="a pattern merging its branches with 'combine softmax(...)' returns theirs")
        if initial_state is not None or return_state:
            raise SpecError("only recurrences carry a state",
                            where="argument initial_state" if initial_state is not None else "argument return_state")

    def _inputs(self, q: torch.Tensor, nk: int, inputs: dict, bnhd: bool) -> tuple[dict, dict]:
        """(gates ``[B | ..., heads, n]`` checked, the branches' inputs) in attnc's layout: under bnhd an input
        declared ``[heads, n, ...]`` comes ``[n, heads, ...]`` (as every pattern's; ``frontends.layouts``).
        After a KV cache (``nk`` keys, more than q's n) a gate is the present queries' ``[heads, n]`` or the
        whole sequence's ``[heads, nk]``, of which the last n rows are read."""
        B, H, N, _ = q.shape
        declared = {d.name: d for d in self.pattern.inputs}
        for name in inputs:
            if name not in declared:
                if name in CALL_KEYWORDS:
                    raise SpecError(f"{name}= is a keyword of a single pattern's call; '{self.pattern.name}' "
                                    "combines several attentions and does not take it", where=f"argument {name}",
                                    hint="call a branch's pattern (pattern.branch(NAME).pattern) for it")
                raise SpecError(f"'{self.pattern.name}' has no input '{name}'", where=f"argument {name}",
                                hint=unknown_input_hint(name, sorted(declared), dict(self.pattern.params)))
        own = {}
        for name, t in inputs.items():
            decl = declared[name]
            if bnhd and isinstance(t, torch.Tensor) and decl.dim_names[:2] == ("heads", "n") and t.dim() >= 2:
                lead = t.dim() - len(decl.dims)  # 1 with a batch dimension
                t = t.transpose(lead, lead + 1) if lead in (0, 1) else t
            own[name] = t
        gates = {}
        lengths = (N,) if nk == N else (N, nk)
        for decl in self.pattern.gates:
            t = own.pop(decl.name, None)
            tokens = " or ".join(str(x) for x in lengths)
            want = (f"[{tokens}, {H}] or [{B}, {tokens}, {H}] (layout bnhd)" if bnhd
                    else f"[{H}, {tokens}] or [{B}, {H}, {tokens}]")
            if t is None:
                raise SpecError(f"missing gate '{decl.name}' (float[heads, n])", where=f"argument {decl.name}")
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise SpecError(f"gate '{decl.name}' must be a float tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}", where=f"argument {decl.name}")
            if t.device != q.device:
                raise SpecError(f"gate '{decl.name}' is on {t.device}, q on {q.device}", where=f"argument {decl.name}")
            if not any(tuple(t.shape) in ((H, x), (B, H, x)) for x in lengths):
                shown = list(inputs[decl.name].shape)
                raise SpecError(f"gate '{decl.name}' has shape {shown}, expected {want}", where=f"argument {decl.name}")
            gates[decl.name] = t[..., t.shape[-1] - N:]  # the present queries' rows
        return gates, own

    def forward(self, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                v: torch.Tensor | None = None, /, *, scale: float | None = None,
                return_lse: bool = False, layout: str | None = None, sizes: dict | None = None,
                cu_seqlens: torch.Tensor | None = None, initial_state=None, return_state: bool = False,
                block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                key_summary=None, **inputs) -> torch.Tensor:
        q, k, v = bind_qkv(q, k, v, inputs)  # keyword q, k, v; k=, v= beside k, v: a paged call's new ones
        self._refuse(return_lse, initial_state, return_state, key_summary)
        layout = self.layout if layout is None else check_layout(layout)
        if block_table is not None or cache_seqlens is not None:  # paged KV caches: one launch per branch, or by length
            return self._paged(layout, q, k, v, block_table, cache_seqlens, cu_seqlens, scale, return_lse, sizes,
                               inputs)
        return self._forward(q, k, v, scale, return_lse, layout, sizes, cu_seqlens, inputs)

    def _paged(self, layout, q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens, scale, return_lse, sizes,
               inputs):
        """A paged call (``frontends.paged``): each branch's one launch where every branch's runner serves it
        (``combined_paged``; under ``torch.compile`` the ``attnc::paged_attention`` op around it), else by length
        (eager, a graph break under ``torch.compile``)."""
        server = self._paged_server
        one_launch = take = None
        if server is not None:
            one_launch = launcher(server) if compiling() else server.paged_forward

            def take(given, q, block_table, k_cache, layout, faults):
                return check_gates(self.pattern, given, q, layout, faults)

        return paged.run(self.forward, self.pattern, layout, q, k_cache, v_cache, block_table, cache_seqlens,
                         cu_seqlens, scale=scale, return_lse=return_lse, initial_state=None, return_state=False,
                         sizes=sizes, inputs=inputs, runner=server, one_launch=one_launch, take_inputs=take,
                         refuse_cached_rows=self._refuse_cached_rows)

    def _refuse_cached_rows(self) -> None:
        """The one launch found a row with cached keys before its queries (a branch's prefill route, or a max
        summary's run, needs every query of it): the contiguous call's error."""
        self._refuse_cache()
        for b in self.pattern.branches:
            forms.refuse_query_offset(b.pattern)

    @torch.compiler.disable  # plain torch around the branches' own calls: under torch.compile it runs eagerly
    def _forward(self, q, k, v, scale, return_lse: bool, layout: str, sizes, cu_seqlens, inputs: dict):
        bnhd = layout == "bnhd"
        q, k, v = sequence_qkv(layout, q, k, v)
        check_qkv(q, k, v, packed=cu_seqlens is not None)
        self._check_cache(q, k, cu_seqlens)
        gates, own = self._inputs(q, k.shape[2], inputs, bnhd)
        self._last_n = q.shape[2]
        scale = resolve_scale(scale, q.shape[-1], q.dtype)
        if cu_seqlens is None:
            out, lse = self._combined(q, k, v, gates, own, scale, sizes)
        else:  # packed sequences: each computed alone (its own runs, blocks and window), joined again
            from .frontends.varlen import check_cu_seqlens

            packing = check_cu_seqlens(cu_seqlens, self.pattern, q, k)
            parts = []
            for start, length in zip(packing.starts, packing.lengths, strict=True):
                if length == 0:
                    continue
                cut = slice(start, start + length)
                parts.append(self._combined(q[:, :, cut], k[:, :, cut], v[:, :, cut],
                                            {name: g[..., cut] for name, g in gates.items()},
                                            {name: self._cut(name, t, cut) for name, t in own.items()}, scale, sizes))
            # every sequence empty: an empty output, differentiable as any call's (zero gradients)
            out = torch.cat([o for o, _ in parts], dim=2) if parts else tied_to(
                q.new_zeros(*q.shape[:3], v.shape[-1]), q, k, v, *gates.values(), *own.values())
            lse = (torch.cat([x for _, x in parts], dim=2) if parts else q.new_zeros(*q.shape[:3])) if return_lse \
                else None
        if bnhd:
            out, lse = out.transpose(1, 2), None if lse is None else lse.transpose(1, 2)
        return (out, lse) if return_lse else out

    def _check_cache(self, q: torch.Tensor, k: torch.Tensor, cu_seqlens) -> None:
        """Queries after a KV cache (more keys than queries): the queries are the last n tokens; not packed, and
        every pooled branch only a mask (``pooled_probs`` computes it at the queries' positions)."""
        n, nk = q.shape[2], k.shape[2]
        if nk == n:
            return
        name = self.pattern.name
        if nk < n:
            raise SpecError(f"{nk} keys but {n} queries: the queries are the last n of the nk tokens, so nk >= n",
                            where="argument k")
        if cu_seqlens is not None:
            raise SpecError(f"'{name}' (a combined pattern) takes packed sequences with as many keys as queries",
                            where="argument cu_seqlens", hint="decode each sequence with its own KV cache")
        self._refuse_cache()

    def _refuse_cache(self) -> None:
        """Queries after a KV cache: refused where a branch or the merge needs every query of the sequence."""
        name = self.pattern.name
        if self.pattern.merge == "softmax":
            raise SpecError(f"'{name}' merges its branches into one softmax (combine softmax(...)): queries after a "
                            "KV cache are not supported for it in this version", where="argument k",
                            hint="call with every token (as many queries as keys)")
        for b in self.pattern.branches:
            if b.pool is not None and b.pool[0] == "max":
                raise SpecError(f"branch '{b.name}' of '{name}' summarises runs by their max query (keys pooled(max, "
                                "...)): a run's value reads every query of the run, so queries after a KV cache are "
                                "not supported", where="argument k", hint="call with every token (as many queries "
                                "as keys)")
            if b.pool is not None and not mask_only(b.pattern):
                raise SpecError(f"branch '{b.name}' of '{name}' pools its keys and has more than a mask: queries "
                                "after a KV cache are not supported for it in this version", where="argument k",
                                hint="call with every token (as many queries as keys)")

    def _cut(self, name: str, t, cut: slice):
        """One packed sequence's part of an input: its token dimensions (declared n or nk) cut."""
        decl = next(d for d in self.pattern.inputs if d.name == name)
        if not isinstance(t, torch.Tensor):
            return t
        lead = t.dim() - len(decl.dims)
        index = [slice(None)] * t.dim()
        for dim in decl.token_dims:
            index[lead + dim] = cut
        return t[tuple(index)]

    def _combined(self, q, k, v, gates: dict, own: dict, scale: float, sizes: dict | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The branches of one call (q ``[B, H, n, D]``, k, v ``[B, Hkv, nk, D]``: a KV cache when nk > n),
        summed with their gates, in q's dtype, or merged into one softmax (then with their log-sum-exp, else None).
        With a KV cache a pooled branch is computed here, as its probabilities (``pooled_probs``, which score a route by probs(...) too) times the pooled values: every
        pooled key is read once, what the queries visit; the other branches run on their backend with the
        cache."""
        nk = k.shape[2]
        cached = nk > q.shape[2]
        sizes = dict(sizes or {})
        bounds = self.__dict__.setdefault("_bounds", PlanCache())  # bounded: a decode step is a new nk
        outs, pooled, probs, lses = {}, {}, {}, {}
        merged = self.pattern.merge == "softmax"
        for b in self.pattern.branches:
            kb, vb = k, v
            if b.pool is not None:
                size = int(b.pool[1])
                kb, vb = pooled[b.name] = (pool_mean(k, size), pool_mean(v, size)) if b.pool[0] == "mean" else \
                    pool_summary(q, k, v, size, scale)
            args = {d.name: own[d.name] for d in b.pattern.inputs if d.name in own}
            if cached and b.pool is not None:
                p = probs[b.name] = pooled_probs(b.pattern, q, kb, scale, own, sizes, nk, bounds)
                outs[b.name] = p @ vb.to(p.dtype).repeat_interleave(q.shape[1] // vb.shape[1], 1)
                continue
            if b.probs_of is not None:
                source = self.pattern.branch(b.probs_of)
                p = probs.get(source.name)
                if p is None:
                    with torch.no_grad():
                        p = pooled_probs(source.pattern, q, pooled[source.name][0], scale, own, sizes, nk, bounds)
                args[b.pattern.route.scores_input] = group_mean(p, k.shape[1])
            if merged:
                outs[b.name], lses[b.name] = self.branches[b.name](q, kb, vb, scale=scale, sizes=sizes,
                                                                   return_lse=True, **args)
                continue
            outs[b.name] = self.branches[b.name](q, kb, vb, scale=scale, sizes=sizes, **args)
        if merged:
            names = [name for _, name in self.pattern.terms]
            out, lse = merge_softmax([outs[n] for n in names], [lses[n] for n in names])
            return out.to(q.dtype), lse
        out = None
        for gate, name in self.pattern.terms:
            term = outs[name] if gate is None else gates[gate][..., None] * outs[name]
            out = term if out is None else out + term
        return out.to(q.dtype), None


class CombinedReport:
    """``attnc.simulate`` of a combined pattern: one ``SimulationReport`` per branch (``branches``) and their
    predicted times summed (each branch is its own kernel); the pooling, the probabilities that score a
    ``by probs(...)`` route and the gated sum are not modelled."""

    def __init__(self, name: str, n: int, reports: dict, notes: list[str]):
        self.pattern, self.n, self.branches, self.assumptions = name, n, reports, notes

    @property
    def forward_s(self) -> float:
        return sum(r.best.forward_s for r in self.branches.values())

    @property
    def backward_s(self) -> float:
        return sum(r.best.backward_s for r in self.branches.values())

    @property
    def dense_forward_s(self) -> float:
        """Dense attention over all n keys (the largest branch's dense baseline)."""
        return max(r.dense_forward_s for r in self.branches.values())

    @property
    def predicted_speedup(self) -> float:
        return self.dense_forward_s / self.forward_s

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "kind": "combined", "n": self.n,
                "forward_s": self.forward_s, "backward_s": self.backward_s,
                "dense_forward_s": self.dense_forward_s, "predicted_speedup": self.predicted_speedup,
                "branches": {name: r.to_dict() for name, r in self.branches.items()},
                "assumptions": list(self.assumptions)}

    def __str__(self) -> str:
        lines = [f"{self.pattern}: combined pattern, {len(self.branches)} branches, n = {self.n}",
                 f"  predicted forward {self.forward_s * 1e3:.3f} ms, backward {self.backward_s * 1e3:.3f} ms "
                 f"(sum of the branches); dense attention forward {self.dense_forward_s * 1e3:.3f} ms: "
                 f"speedup {self.predicted_speedup:.2f}x"]
        lines += [f"  note: {note}" for note in self.assumptions]
        for name, r in self.branches.items():
            lines += ["", f"# branch {name}", str(r)]
        return "\n".join(lines)


def unmodelled(pat: ir.CombinedIR) -> str:
    """What a combined pattern's prediction leaves out (a note of its report)."""
    merge = "the merge into one softmax" if pat.merge == "softmax" else "the gated sum"
    return ("the combined prediction is the sum of the branches' predicted times (each branch its own kernel); the "
            "key pooling (a max summary's attention within each run too), the probabilities that score a route by "
            f"probs(...) and {merge} are not modelled")


def simulate_combined(pat: ir.CombinedIR, run: Callable, n: int | None, nk: int | None, inputs: dict | None,
                      **kwargs) -> CombinedReport:
    """Each branch simulated by ``run`` (``attnc.simulate``) at its own shapes (a pooled branch against
    ceil(n / SIZE) keys), summed in a ``CombinedReport``."""
    if n is None:
        raise SpecError(f"'{pat.name}' runs over a sequence: give n", where="argument n")
    if nk is not None and nk != n:
        raise SpecError(f"'{pat.name}' (a combined pattern) takes as many keys as queries", where="argument nk")
    reports = {}
    notes = [unmodelled(pat)]
    for b in pat.branches:
        given = {d.name: inputs[d.name] for d in b.pattern.inputs if inputs and d.name in inputs}
        keys = None if b.pool is None else -(-int(n) // int(b.pool[1]))
        if b.probs_of is not None:  # the simulator models a route's selection without reading scores
            blocks = -(-int(n) // int(b.pattern.route.block[0]))
            given[b.pattern.route.scores_input] = torch.zeros(int(kwargs.get("heads", 1)), int(n), blocks)
            notes.append(f"branch {b.name}: its route by probs({b.probs_of}) is modelled as any block route "
                         "(per query: its keep blocks, then the nearest ones it reaches); the probabilities are not computed")
        reports[b.name] = run(b.pattern, n=n, nk=keys, inputs=given or None, **kwargs)
    return CombinedReport(pat.name, int(n), reports, notes)
