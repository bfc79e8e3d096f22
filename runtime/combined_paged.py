"""A combined pattern's paged batch with one launch per branch (stdlib ``nsa``, ``combiner``): every row of a batch
over a paged KV cache, each with its own key and query counts, nothing read on the host, nothing gathered per length.

At every call (``PagedCombined.paged_forward``, which ``frontends.paged.run`` calls as any runner's one launch):

- a pooled branch gets each row's runs from its pages:
  - ``keys pooled(mean, SIZE)``: the runs' mean keys and values (its runner's ``paged_pool_means``: each cached key
    read once, the last run the mean of its own keys, as ``combined.pool_mean``);
  - ``keys pooled(max, SIZE)`` (Combiner's summaries): the runs' elementwise-max keys, and per query head each run's
    attention over its own keys by the elementwise max of its queries (its runner's ``paged_max_summaries``, as
    ``combined.pool_summary``). A run's value reads every query of the run, so such a batch serves prefill rows
    only (every query of every key), as the contiguous call does: a row with cached keys before its queries fails a
    device assert that gives the contiguous call's error (``PREFILL_ROWS_FAILED``);

  its probabilities are each query's softmax of ``scale * q . k`` over the runs its mask allows at the query's
  absolute position among its row's runs, 0 on a query with none (as ``pooled_probs``), and its output those
  probabilities times the runs' values: plain torch, a product of 1/SIZE of attention's;
- a route ``by probs(NAME)`` gets those probabilities averaged over each GQA group (``group_mean``), laid out as
  q's rows (the route's scores are declared over the queries, ``[heads, nq, blocks]``), and its branch runs its
  runner's one launch, which chooses each query's blocks on the device;
- every other branch runs its runner's one launch;
- the output is the gated sum of the ``combine`` terms, the gates given per present query as q lays its rows out:
  ``[B | 1, heads, n]`` (``[B, n, heads]`` under ``"bnhd"``), or ``[1, heads, total]`` for packed rows
  (``cu_seqlens_q``); with ``combine softmax(...)`` the branches merged by their log-sum-exps into one softmax
  (``numerics.merge_softmax``), whose log-sum-exp the call returns.

So a batch is the same launches whatever its lengths (two ``attnc_paged_summary`` per mean-pooled branch, one
``attnc_paged_max_summary`` per max-pooled branch, one ``attnc_fwd_paged`` per other branch), and a captured graph
replays it. Under ``torch.compile`` the whole is the ``attnc::paged_attention`` op (this object is registered as a
runner), so ``fullgraph=True`` traces it.

Served (``applies``): every pooled branch a mean or max over runs with a mask of positions alone, no branch reading an
input but a route's probabilities, at least one branch not pooled (its ``attnc_fwd_paged`` checks the rows' values on
the device: the block table, the lengths); each other branch one its runner serves in one launch
(``pages_in_one_launch``: Triton's dtypes, pools with a contiguous head dim). Anything else takes the path by length
(``frontends.paged``).
"""

from __future__ import annotations

import sympy
import torch

from ..compiler.analysis import evaluate as E
from ..core import ir
from ..core import symbols as S
from .backends.triton.paged_max_summaries import run_max_queries
from .backends.triton.paged_queries import PagedQueries, queries_of, refuse_cached_rows, row_matmul
from .numerics import merge_softmax
from .ops.common import Registered
from .plan.cache import PlanCache
from .plan.forms.top_k_tokens import device_mask
from .pooled_probs import group_mean, mask_only, masked_probs

#: The sizes a pooled branch's mask may not name: its runs are evaluated at each query's own position alone.
_LENGTHS = {S.N, S.NK, S.NQ}


def applies(pat) -> bool:
    """Whether ``pat``'s paged calls may run one launch per branch (module docstring); the runners decide the rest
    per call."""
    if not isinstance(pat, ir.CombinedIR):
        return False
    if all(b.pool is not None for b in pat.branches):  # the rows' values are checked by a branch's attnc_fwd_paged
        return False
    for b in pat.branches:
        if b.pool is not None:
            mask = b.pattern.mask
            if b.pool[0] not in ("mean", "max") or not mask_only(b.pattern) or b.pattern.inputs:
                return False
            if isinstance(mask, sympy.Basic) and (mask.free_symbols & _LENGTHS or E.input_names(mask)):
                return False
            continue
        scores = {b.pattern.route.scores_input} if b.probs_of is not None else set()
        if {decl.name for decl in b.pattern.inputs} - scores:
            return False
    return True


def prefill_only(pat: ir.CombinedIR) -> bool:
    """Whether a batch serves prefill rows only, as the contiguous call refuses queries after a cache: a max summary's
    run reads every query of the run; a merge into one softmax is not served after a cache."""
    return pat.merge == "softmax" or any(b.pool is not None and b.pool[0] == "max" for b in pat.branches)


def check_gates(pat: ir.CombinedIR, inputs: dict, q: torch.Tensor, layout: str, faults: list) -> dict | None:
    """The gates of a paged call as the one launch reads them, laid out as q's rows (``q`` ``[B | 1, Hq, rows, D]``
    in attnc's layout): each a float tensor on q's device of shape ``[Hq, rows]`` or ``[B | 1, Hq, rows]``
    (``"bnhd"``: ``[rows, Hq]``, ``[B | 1, rows, Hq]``), returned as ``[B | 1, Hq, rows]``; None, with ``(argument,
    why, final)`` in ``faults``, where one is not so (``final``: nor would the path by length take it, so the call is
    refused with this message)."""
    B, H, rows, _ = q.shape
    declared = {decl.name for decl in pat.inputs}
    if set(inputs) != declared:
        name = sorted(set(inputs) ^ declared)[0]
        faults.append((f"argument {name}", f"missing gate '{name}'" if name not in inputs
                       else f"'{pat.name}' declares no input '{name}'", False))
        return None
    out = {}
    for name, t in inputs.items():
        want = [H, rows] if layout != "bnhd" else [rows, H]
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.device != q.device or (
                list(t.shape[-2:]) != want or t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != B)):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            faults.append((f"argument {name}", f"a gate of the present queries is a float tensor on q's device of "
                                               f"shape {want} or [{B}, {', '.join(map(str, want))}] (q's rows, "
                                               f"{'[.., n, heads]' if layout == 'bnhd' else '[.., heads, n]'}), "
                                               f"got {got}", True))  # (nor would the path by length take it)
            return None
        t = t if t.dim() == 3 else t[None]
        out[name] = t.transpose(1, 2) if layout == "bnhd" else t
    return out


class PagedCombined(Registered):
    """The one-launch server of a combined pattern's paged calls, over its branches' modules (``branches``: name ->
    ``Attention``; each call reads their current runners). It has a runner's paged methods, so that
    ``frontends.paged.run`` and the ``attnc::paged_attention`` op call it as any runner."""

    def __init__(self, pattern: ir.CombinedIR, branches):
        self.pattern = pattern
        self.branches = branches
        self._bounds = PlanCache()  # per (runs, heads, head dim): the pooled branch's bound and mask
        self.register_op()

    def pages_in_one_launch(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
        """Whether every branch's runner serves these tensors: a pooled branch's pools its pages, every other runs
        its one launch."""
        for b in self.pattern.branches:
            runner = self.branches[b.name].runner
            if b.pool is not None:  # the summary kernels read the pools' head dim contiguous
                pools = "paged_pool_means" if b.pool[0] == "mean" else "paged_max_summaries"
                if getattr(runner, pools, None) is None or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
                    return False
            elif getattr(runner, "pages_in_one_launch", None) is None or not runner.pages_in_one_launch(
                    q, k_cache, v_cache):
                return False
        return True

    def paged_forward(self, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q: int, scale: float,
                      inputs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of a paged batch, as a runner's ``paged_forward`` (q ``[B, Hq, n, D]``, or packed ``[1, Hq,
        total, D]`` with ``q_start``, ``q_count``); ``inputs`` the gates (``check_gates``). A gated sum has no single
        log-sum-exp: ``lse`` is NaN (the combined call refuses ``return_lse``)."""
        packed = q_start is not None
        rows, capacity = block_table.shape[0], block_table.shape[1] * k_cache.shape[1]
        qs = queries_of(q, seqlens, q_start, q_count, packed, capacity)
        merged = self.pattern.merge == "softmax"
        if prefill_only(self.pattern):
            refuse_cached_rows(qs, rows)
        outs, lses, probs = {}, {}, {}
        for b in self.pattern.branches:
            runner = self.branches[b.name].runner
            if b.pool is not None:
                size = int(b.pool[1])
                if b.pool[0] == "mean":
                    keys = runner.paged_pool_means(k_cache, block_table, seqlens, size)
                    values = runner.paged_pool_means(v_cache, block_table, seqlens, size)
                else:  # the values per query head, rounded to q's dtype as the contiguous call's are
                    qmax = run_max_queries(qs, rows, -(-capacity // size), size)
                    keys, values = runner.paged_max_summaries(qmax, k_cache, v_cache, block_table, seqlens, size,
                                                              scale)
                    values = values.to(q.dtype)
                score, allowed = self._scores(b, q, qs, keys, scale, size)
                p = probs[b.name] = masked_probs(score, allowed)
                outs[b.name] = _as_q(qs, row_matmul(p, values, qs.row if packed else None))
                if merged:  # (a gated sum reads no log-sum-exp)
                    lse = torch.logsumexp(score.masked_fill(~allowed, float("-inf")), -1, keepdim=True)
                    lses[b.name] = _as_q(qs, lse)[..., 0]
                continue
            given = None
            if b.probs_of is not None:  # the route's scores, as q lays its rows out
                given = {b.pattern.route.scores_input: _as_q(qs, group_mean(probs[b.probs_of], k_cache.shape[2]))}
            outs[b.name], lses[b.name] = runner.paged_forward(q, k_cache, v_cache, block_table, seqlens, q_start,
                                                              q_count, max_q, scale, given)
        names = [name for _, name in self.pattern.terms]
        if merged:
            out, lse = merge_softmax([outs[n] for n in names], [lses[n].float() for n in names])
            return out.to(q.dtype), lse
        gates = inputs or {}
        out = None
        for gate, name in self.pattern.terms:
            term = outs[name].float() if gate is None else gates[gate][..., None].float() * outs[name].float()
            out = term if out is None else out + term
        return out.to(q.dtype), torch.full(q.shape[:3], float("nan"), device=q.device)

    def _scores(self, branch: ir.Branch, q: torch.Tensor, qs: PagedQueries, keys: torch.Tensor, scale: float,
                size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A pooled branch's scores ``[X, Hq, n, runs]`` fp32 (q's rows as ``row_matmul`` lays them out), ``scale * q .
        k``, and where they count: the runs its mask allows at each query's position among its row's runs (a run
        holding a cached key), none on a query not valid."""
        heads, runs = qs.q_shape[1], keys.shape[2]
        a, row_of = (qs.flat.unsqueeze(2), qs.row) if qs.packed else (q, None)
        score = row_matmul(a, keys.transpose(-1, -2), row_of) * scale
        pat = branch.pattern
        key = (runs, heads, int(qs.flat.shape[-1]))
        made = self._bounds.get(key)
        if made is None:  # binding is sympy work: once per shape
            bound = E.bind_sizes(pat, n=runs * size, nk=runs, heads=heads, dk=key[2])
            made = self._bounds[key] = (bound, E.substitute(pat.mask, bound) if isinstance(pat.mask, sympy.Basic)
                                        else pat.mask)
        bound, mask = made
        index = torch.arange(runs, device=keys.device)
        allowed = (index * size < qs.lengths[qs.row].view(-1, 1)) & qs.valid.view(-1, 1)  # [X * n, runs]
        if isinstance(mask, sympy.Basic):
            allowed = allowed & device_mask(mask, pat, bound, qs.pos, index)[0]  # [Hq | 1, X * n, runs]
        X, n = score.shape[0], score.shape[2]
        allowed = allowed.view(-1, X, n, runs).transpose(0, 1)  # [X, Hq | 1, n, runs]
        return score, allowed


def _as_q(qs: PagedQueries, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[X, Hq, n, F]`` (``row_matmul``'s layout) as q lays its rows out: packed ``[total, Hq, 1, F]`` to
    ``[1, Hq, total, F]``; an unpacked call's ``[B, Hq, n, F]`` is q's already."""
    return qs.as_q(x[:, :, 0]) if qs.packed else x


__all__ = ["PagedCombined", "applies", "check_gates", "prefill_only"]
