"""Content-dependent block selection (the ``route`` clause), exactly as
DESIGN.md section 2 states it:

- keys are partitioned into blocks (flat runs of SIZE tokens, or grid tiles);
- the score of a block is ``q . mean(k_block)`` per query token (MoBA),
  ``mean(q_block) . mean(k_block)`` per query block (BiFormer) or the bound of
  ``q . k`` over the block from its keys' extremes per query token (Quest),
  unscaled, in fp32 (fp64 for fp64 inputs); ``shared`` averages it over heads;
- a block with no key the mask allows is never selected; blocks where
  ``keep`` holds (k bound to the block's first key) always are, and count
  towards K; the remaining places go to the highest scores, ties to the lower
  block index.
"""

from __future__ import annotations

import math

import torch

from ...compiler import evaluate as E
from ...compiler.route_blocks import WORD_BITS, block_ids, route_sizes  # noqa: F401 (re-exported)
from ...core import ir
from ...core.errors import SpecError
from . import antidiagonal, given, share


def score_vectors(pat: ir.PatternIR, q: torch.Tensor, k: torch.Tensor, inputs: dict | None,
                  rows: slice | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sides of the routing score: ``q`` and ``k``, or a token route's indexer inputs
    ``(QI [B | 1, Hq, Nq, DI], KI [B | 1, Hq, Nk, DI])`` (a leading batch dimension added); a route
    whose scores are given (``by probs(BRANCH)`` in a combined pattern): that input ``[B | 1, Hq, Nq,
    blocks]`` on both sides. An indexer's inputs are declared over the whole sequence (``n``): the query side
    is their ``rows`` of this call's queries (a slice, or positions; default the first ``Nq``): after a KV
    cache ``q_offset`` on, a context-parallel rank's its own positions."""
    if pat.route.scores is not None:
        given = inputs[pat.route.scores]
        given = given if given.dim() == 4 else given[None]
        return given, given
    if pat.route.indexer is None:
        return q, k
    rows = slice(0, q.shape[2]) if rows is None else rows
    if pat.route.score == "indexer":  # DeepSeek's lightning indexer: (QI | W [B | 1, J, Nq, DI + 1], KI [B | 1, 1, Nk, DI])
        qi, ki, w = (inputs[name] for name in pat.route.indexer)
        qi, ki, w = (x if x.dim() == rank else x[None] for x, rank in ((qi, 4), (ki, 3), (w, 3)))
        dtype = torch.float64 if torch.float64 in (qi.dtype, ki.dtype, w.dtype) else torch.float32  # w not rounded
        sq = torch.cat([qi.transpose(1, 2).to(dtype), w.transpose(1, 2)[..., None].to(dtype)], -1)
        return sq[:, :, rows], ki[:, None]
    qi, ki = (inputs[name] for name in pat.route.indexer)
    return (qi if qi.dim() == 4 else qi[None])[:, :, rows], (ki if ki.dim() == 4 else ki[None])


def query_rows(bound: E.Bound, q: torch.Tensor) -> slice:
    """The rows of this call's queries in inputs declared over the whole sequence: after a KV cache, the last."""
    return slice(bound.q_offset, bound.q_offset + q.shape[2])


def key_summary(pat: ir.PatternIR, k: torch.Tensor, key_block: torch.Tensor, nblocks: int, heads: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """What a block route's score reads of the keys, per block and query head ``[B, Hq, nblocks, D]``: the
    mean key ``(mean,)`` (a token route: the keys themselves), or Quest's per-dimension extremes ``(max, min)``
    (``q @ bound(k)``). Made once per call: the scores are made a run of queries at a time."""
    kd = k.to(dtype)
    key_block = _on(key_block, k.device)
    if pat.route.score == "bound":
        B, Hkv, _, D = k.shape
        index = key_block.view(1, 1, -1, 1).expand(B, Hkv, -1, D)
        empty = kd.new_empty(B, Hkv, nblocks, D)
        return tuple(empty.scatter_reduce(2, index, kd, reduce=r, include_self=False).repeat_interleave(
            heads // Hkv, 1) for r in ("amax", "amin"))
    if pat.route.tokens:
        k_mean = kd
    else:
        onehot = torch.nn.functional.one_hot(key_block, nblocks).to(dtype)  # [Nk, nb]
        k_mean = (kd.transpose(-1, -2) @ onehot).transpose(-1, -2) / onehot.sum(0)[:, None]  # [B, Hkv, nb, D]
    return (k_mean.repeat_interleave(heads // k.shape[1], dim=1),)


def block_scores(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, key_block: torch.Tensor,
                 nblocks: int, q_block: torch.Tensor | None = None,
                 summary: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Routing scores ``[B, Hq, Nq, nblocks]``: q . mean(k_block) per query token, or
    mean(q_block) . mean(k_block) per query block; averaged over heads if ``shared``.
    A token route's blocks are single keys: the score is ``q . k`` itself. Quest's (``q @ bound(k)``): per query
    and block the upper bound of ``q . k`` over the block's keys from their per-dimension extremes,
    ``sum_d max(q_d * max k_d, q_d * min k_d)`` = ``q+ . max(k) + q- . min(k)``. ``q_block``: the block of every
    query where the caller keeps it (on q's device), else made here; ``summary``: ``key_summary`` of this
    call where the caller keeps it, else made here."""
    route = pat.route
    B, Hq, Nq, _ = q.shape
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    if route.scores is not None:  # given (score_vectors): q is the scores themselves
        score = q.to(dtype)
        score = score.mean(dim=1, keepdim=True) if route.shared else score
        return score.expand(max(B, score.shape[0]), Hq, Nq, nblocks)
    if route.score == "indexer":  # DeepSeek's lightning indexer, one score for every head: [B, 1, Nq, Nk]
        qi, w = q[..., :-1].to(dtype), q[..., -1].to(dtype)
        return (torch.relu(qi @ k.to(dtype).transpose(-1, -2)) * w[..., None]).sum(1, keepdim=True)
    summary = key_summary(pat, k, key_block, nblocks, Hq, dtype) if summary is None else summary
    if route.score == "bound":
        kmax, kmin = summary
        qd = q.to(dtype)
        score = qd.clamp(min=0) @ kmax.transpose(-1, -2) + qd.clamp(max=0) @ kmin.transpose(-1, -2)
        score = score.mean(dim=1, keepdim=True) if route.shared else score
        return score.expand(max(B, score.shape[0]), Hq, Nq, nblocks)
    (k_mean,) = summary
    if route.score == "token":
        score = q.to(dtype) @ k_mean.transpose(-1, -2)  # [B, Hq, Nq, nb]
    else:
        if bound.q_offset:  # the mean over a query block needs the block's earlier queries
            raise SpecError(f"'{pat.name}' routes by the mean of query blocks, which needs every query of a block: "
                            "queries after a KV cache (nk > n) are not supported", where="argument k",
                            hint="call with all the queries (nk == n)")
        if q_block is None:
            q_block = block_ids(pat.queries, route_sizes(pat, bound)[0], bound, Nq)[0]
        q_block = _on(q_block, q.device)
        q_onehot = torch.nn.functional.one_hot(q_block, nblocks).to(dtype)
        q_mean = (q.to(dtype).transpose(-1, -2) @ q_onehot).transpose(-1, -2) / q_onehot.sum(0).clamp(min=1)[:, None]
        score = (q_mean @ k_mean.transpose(-1, -2))[:, :, q_block, :]
    if route.shared:
        score = score.mean(dim=1, keepdim=True)
    return score.expand(max(B, score.shape[0]), Hq, Nq, nblocks)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: itself where it is there already (no call to ask for)."""
    return t if t.device == device else t.to(device)


#: Where ``evaluate.index_error`` says an out-of-range read happened when the expression is a mask, and
#: what that is for the route's ``keep``, which is evaluated like one.
_MASK_READ = "in the mask (evaluated on every pair)"
_KEEP_READ = "in the route's keep (evaluated at every query and the first key of each block)"


def keep_blocks(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None, batch: int, key_block: torch.Tensor,
                nblocks: int, q_index: torch.Tensor | None = None) -> torch.Tensor | None:
    """``keep`` per (query, block), with k bound to the block's first key: ``[B | 1, Hq, Nq, nblocks]``
    (the query rows ``q_index`` only, where given)."""
    if pat.route.keep is None:
        return None
    first_key = torch.full((nblocks,), len(key_block), dtype=torch.int64).scatter_reduce(
        0, key_block, torch.arange(len(key_block)), reduce="amin")
    keep_pat = ir.PatternIR(pat.name, pat.queries, pat.keys, pat.route.keep, None, None, None, None,
                            pat.inputs, pat.params)
    try:
        return E.mask_tensor(keep_pat, bound, inputs, batch=batch, q_index=q_index, k_index=first_key)
    except SpecError as err:  # an input read out of range: say it is the keep's read, not the mask's
        if _MASK_READ not in err.message:
            raise
        raise SpecError(err.message.replace(_MASK_READ, _KEEP_READ), where=err.where,
                        hint="keep reads its inputs at every query and block: keep the index in range "
                             "(e.g. with clamp)") from None


def choose(score: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor | None, topk: int) -> torch.Tensor:
    """The selection rule: never a block with no allowed key; ``keep`` blocks always
    (counted in K); the rest by highest score, ties to the lower block index."""
    nblocks = score.shape[-1]
    shape = torch.broadcast_shapes(score.shape, allowed.shape, *(() if keep is None else (keep.shape,)))
    score, allowed = score.expand(shape), allowed.expand(shape)
    if keep is None:
        forced, candidates = torch.zeros_like(allowed), allowed
        remaining = torch.full((*shape[:-1], 1), topk, dtype=torch.int64, device=score.device)
    else:
        forced = allowed & torch.broadcast_to(keep, allowed.shape)
        candidates = allowed & ~forced
        remaining = (topk - torch.count_nonzero(forced, -1).unsqueeze(-1)).clamp(min=0)
    ranked = torch.where(candidates, score, torch.full_like(score, -torch.inf))
    fast = _top_by_threshold(ranked, candidates, remaining)
    if fast is not None:
        return forced | fast
    # NaN or -inf among the scores it would take: the rule's literal form, a stable sort of every block
    # by score, then (stable) the candidates first: a candidate scored -inf ranks before every block
    # that is no candidate
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(candidates.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                                        stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nblocks, device=order.device).expand_as(order)
                                            .contiguous())
    return forced | (candidates & (rank < remaining))


def _top_by_threshold(ranked: torch.Tensor, candidates: torch.Tensor, remaining: torch.Tensor
                      ) -> torch.Tensor | None:
    """``choose``'s rule without sorting every block (a token route has one per key): per row the
    ``remaining`` highest-scoring candidates, ties to the lower index, from ``torch.topk``'s top
    places; where the last place taken ties with the first one left out, the tied candidates are cut
    in index order on those rows only. None where a NaN or a -inf score would be taken (``choose``
    sorts then)."""
    # candidates per row, counted once where they are broadcast (a mask shared by the heads)
    count = torch.broadcast_to(_count(_unexpanded(candidates)), (*candidates.shape[:-1], 1))
    flat = remaining.flatten()
    if flat.numel() and int(flat[0]) > 0 and bool((flat == flat[0]).all()):  # the same places on every row
        places = int(flat[0])
        over = (count > places).squeeze(-1)  # rows with more candidates than places; the others take all
        if not bool(over.any()):
            return candidates.clone()
        if bool(over.all()):
            return _top_places(ranked, candidates, places)
        top = _top_places(ranked[over], candidates[over], places)
        if top is None:
            return None
        chosen = candidates.clone()
        chosen[over] = top
        return chosen
    take = torch.minimum(remaining, count)
    most = int(take.max()) if take.numel() else 0
    if most == 0:
        return torch.zeros_like(candidates)
    values, index = torch.topk(ranked, min(most + 1, ranked.shape[-1]), dim=-1, sorted=True)
    last = values.gather(-1, (take - 1).clamp(min=0))
    taking = take > 0
    if bool(torch.isnan(values).any()) or bool((taking & (last == -torch.inf)).any()):
        return None
    # the first `take` places of each row (distinct keys: the other places write False over False)
    chosen = torch.zeros_like(candidates)
    places = torch.arange(values.shape[-1], device=values.device)
    chosen.scatter_(-1, index, (places < take).expand(index.shape))
    left_out = values.gather(-1, take.clamp(max=values.shape[-1] - 1))
    spill = (taking & (take < values.shape[-1]) & (left_out == last)).squeeze(-1)
    return _cut_ties(chosen, ranked, candidates, values, last, take, spill)


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its broadcast dimensions (stride 0) cut to one entry."""
    for dim in range(t.dim() - 1):
        if t.stride(dim) == 0 and t.shape[dim] > 1:
            t = t.narrow(dim, 0, 1)
    return t


def _count(flags: torch.Tensor) -> torch.Tensor:
    """True entries per row of a bool tensor, ``[..., 1]`` (a byte sum: faster than count_nonzero)."""
    return flags.view(torch.uint8).sum(-1, keepdim=True, dtype=torch.int32).long()


def _top_places(ranked: torch.Tensor, candidates: torch.Tensor, places: int) -> torch.Tensor | None:
    """The ``places`` best candidates of rows that each have more than ``places``: an unsorted
    ``topk`` of ``places + 1``, whose smallest is the first left out."""
    values, index = torch.topk(ranked, places + 1, dim=-1, sorted=False)
    ends = torch.topk(values, 2, dim=-1, largest=False).values  # ascending: the first left out, the last taken
    left_out, last = ends[..., :1], ends[..., 1:]
    if bool(torch.isnan(values).any()) or bool((last == -torch.inf).any()):
        return None
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(-1, index, values > left_out)
    spill = (left_out == last).squeeze(-1)
    take = torch.full_like(index[..., :1], places)
    return _cut_ties(chosen, ranked, candidates, values, last, take, spill)


def _cut_ties(chosen: torch.Tensor, ranked: torch.Tensor, candidates: torch.Tensor, values: torch.Tensor,
              last: torch.Tensor, take: torch.Tensor, spill: torch.Tensor) -> torch.Tensor:
    """On the ``spill`` rows (more candidates tie with the ``last`` score taken than places are left;
    ``topk``'s order among them is unspecified), every candidate above it and the first tied ones in
    index order up to ``take``."""
    if bool(spill.any()):
        rows_ranked, rows_cand, row_last = ranked[spill], candidates[spill], last[spill]
        tied = rows_cand & (rows_ranked == row_last)
        need = take[spill] - (values[spill] > row_last).sum(-1, keepdim=True)
        chosen[spill] = (rows_cand & (rows_ranked > row_last)) | (
            tied & (torch.cumsum(tied, -1, dtype=torch.int32) <= need))
    return chosen


def select_blocks(
    pat: ir.PatternIR,
    bound: E.Bound,
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    inputs: dict | None,
) -> torch.Tensor:
    """The token mask restricted to the selected blocks: bool ``[B, Hq, Nq, Nk]`` (dense: the reference).

    ``q`` is ``[B, Hq, Nq, D]``, ``k`` ``[B, Hkv, Nk, D]``; ``mask`` the pattern's
    mask broadcastable to ``[B, Hq, Nq, Nk]``. The selection is not differentiated.
    """
    B, Hq, Nq, _ = q.shape
    full_mask = torch.broadcast_to(mask, (B, Hq, Nq, k.shape[2]))

    def allowed(key_block, nblocks, dtype):  # [B, Hq, Nq, nb]
        if pat.route.tokens:  # single keys: the mask itself
            return full_mask
        onehot = torch.nn.functional.one_hot(key_block, nblocks).to(dtype)
        return (full_mask.to(dtype) @ onehot) > 0

    selected, key_block, _ = _select(pat, bound, q, k, inputs, allowed)
    return full_mask & selected[..., key_block]


#: Query rows scored at once by a token route's selection: its scores are ``[B, Hq, rows, Nk]``
SELECT_ELEMENTS = 1 << 25
#: ... and at most this many rows at once by a token route
TOKEN_ROWS = 512


def _select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, allowed
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``_selection`` (below), noted for a call's ``return_selection`` (``given.record``)."""
    selected, key_block, nblocks = _selection(pat, bound, q, k, inputs, allowed)
    return given.record(selected), key_block, nblocks


def _selection(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, allowed
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The selection of this call (not differentiated): ``(selected [B, Hq, Nq, nblocks], key_block,
    nblocks)``; ``allowed(key_block, nblocks, score dtype)`` says, per query, whether the mask allows
    some key of each block (densely for the reference, over the schedule's tiles for the executor).
    The scores are computed a run of queries at a time (a token route has one per key), on q's
    device, as is the selection; ``inputs``, the mask and ``keep`` are evaluated where they live
    (the CPU, for the tiled backends) and moved there. ``key_block`` is returned on the CPU."""
    if pat.route.antidiagonal:  # top-p by antidiagonal scoring (XAttention): its own module
        return antidiagonal.select(pat, bound, q, k, inputs, allowed, lambda key_block, nblocks: keep_blocks(
            pat, bound, inputs, q.shape[0], key_block, nblocks))
    if pat.route.group is not None:  # top-p by min-max share (VMoBA): ranked across a group of queries
        return _select_share(pat, bound, q, k, inputs, allowed)
    if pat.route.tokens and pat.route.scores is None:
        return _select_tokens(pat, bound, q, k, inputs)
    block, topk = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, k.shape[2])
    dev = q.device
    sq, sk = (t.to(dev) for t in score_vectors(pat, q, k, inputs, query_rows(bound, q)))
    with torch.no_grad():
        dtype = torch.float64 if torch.float64 in (sq.dtype, sk.dtype) else torch.float32
        reachable = allowed(key_block, nblocks, dtype).to(dev)
        if pat.route.given:  # the selection itself (a call's selection=): the blocks the mask lets a query reach
            return (block_scores(pat, bound, sq, sk, key_block, nblocks) > 0) & reachable, key_block, nblocks
        keep = keep_blocks(pat, bound, inputs, q.shape[0], key_block, nblocks)
        keep = None if keep is None else keep.to(dev)
        B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
        rows = Nq if pat.route.score == "block" else max(1, SELECT_ELEMENTS // max(1, B * Hq * nblocks))
        summary = None if pat.route.scores is not None else key_summary(pat, sk, key_block, nblocks, Hq, dtype)
        if rows >= Nq:
            return (choose(block_scores(pat, bound, sq, sk, key_block, nblocks, summary=summary), reachable, keep,
                           topk), key_block, nblocks)
        selected = torch.empty(max(B, sq.shape[0]), Hq, Nq, nblocks, dtype=torch.bool, device=q.device)
        for start in range(0, Nq, rows):
            part = slice(start, min(Nq, start + rows))
            score = block_scores(pat, bound, sq[:, :, part], sk, key_block, nblocks, summary=summary)
            sub_keep = None if keep is None else torch.broadcast_to(keep, (*keep.shape[:2], Nq, nblocks))[:, :, part]
            selected[:, :, part] = choose(score, torch.broadcast_to(reachable, (*reachable.shape[:2], Nq, nblocks))[:, :, part],
                                          sub_keep, topk)
        return selected, key_block, nblocks


def _select_share(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None,
                  allowed) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``_select`` for a min-max share route (``share.threshold``): every query's scores at once, as a group
    may span all of a head's queries."""
    block, _ = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, k.shape[2])
    dev = q.device
    with torch.no_grad():
        dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
        reachable = allowed(key_block, nblocks, dtype).to(dev)
        keep = keep_blocks(pat, bound, inputs, q.shape[0], key_block, nblocks)
        score = block_scores(pat, bound, q, k.to(dev), key_block, nblocks)
        chosen = share.threshold(score, reachable, None if keep is None else keep.to(dev),
                                 float(pat.route.topp), pat.route.group)
    return chosen, key_block, nblocks


def _select_tokens(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``_select`` for a token route, a run of query rows at a time: a unit is one key, so the keys the
    mask allows are the mask itself, evaluated densely for those rows (on the CPU, where the inputs
    live), as is ``keep``; nothing of size n x nk is held but the selection."""
    _, topk = route_sizes(pat, bound)
    nk = k.shape[2]
    key_block = torch.arange(nk)
    dev = q.device
    sq, sk = (t.to(dev) for t in score_vectors(pat, q, k, inputs, query_rows(bound, q)))
    B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
    selected = torch.empty(max(B, sq.shape[0]), Hq, Nq, nk, dtype=torch.bool, device=dev)
    # short runs of rows: a causal run's keys end where it does (an indexer's J heads of scores each)
    rows = max(1, min(TOKEN_ROWS, SELECT_ELEMENTS // max(1, B * max(Hq, sq.shape[1]) * nk)))
    tensors, batch = E.bind_inputs(pat, bound, inputs) if inputs else ({}, None)
    with torch.no_grad():
        for start in range(0, Nq, rows):
            part = torch.arange(start, min(Nq, start + rows))
            rows_here = slice(start, start + len(part))
            allowed = E.mask_tensor(pat, bound, tensors, batch=batch, q_index=part).to(dev)
            keep = keep_blocks(pat, bound, tensors, B, key_block, nk, q_index=part)
            # only the keys from the first to the last one the mask allows these rows (a causal run
            # of rows scores and ranks the keys before it, not all nk)
            lo, hi = allowed_span(allowed, nk)
            selected[:, :, rows_here, :lo] = False
            selected[:, :, rows_here, hi:] = False
            if lo == hi:
                continue
            span = slice(lo, hi)
            score = block_scores(pat, bound, sq[:, :, rows_here], sk[:, :, span], key_block[span], hi - lo)
            selected[:, :, rows_here, span] = choose(score, _key_slice(allowed, span),
                                                     None if keep is None else _key_slice(keep, span).to(dev), topk)
    return selected, key_block, nk


def allowed_span(allowed: torch.Tensor, nk: int) -> tuple[int, int]:
    """The first key and one past the last that ``allowed`` (``[..., rows, nk | 1]``) holds anywhere."""
    if allowed.shape[-1] != nk:  # the same for every key
        return (0, nk) if bool(allowed.any()) else (0, 0)
    # a byte max over the rows (any() over a leading dimension is many times slower)
    present = _unexpanded(allowed).reshape(-1, nk).view(torch.uint8).amax(0).nonzero()
    return (int(present[0]), int(present[-1]) + 1) if len(present) else (0, 0)


def _key_slice(table: torch.Tensor, span: slice) -> torch.Tensor:
    """``table[..., span]`` where it has a column per key (one broadcast column stays)."""
    return table if table.shape[-1] == 1 else table[..., span]


def allowed_blocks(plan, key_block: torch.Tensor, nblocks: int, inputs: dict, batched: set[str], B: int) -> torch.Tensor:
    """Whether the mask allows some key of each block, per query: bool ``[B, Hq, Nq, nblocks]``,
    computed over the static schedule's tiles only (chunked, never N x N)."""
    from . import tile_plan as TP

    Hq, Nq = plan.bound.heads, plan.bound.n
    nQ, Tq = plan.q_tokens.index.shape
    out_t = torch.zeros(B, Hq, nQ, Tq, nblocks, dtype=torch.bool)
    sched = plan.schedule
    for cls, bsel, heads in plan.groups():
        width = sched.full_index.shape[-1] + sched.partial_index.shape[-1]
        per = B * len(heads) * Tq * max(1, width) * plan.k_tokens.index.shape[1] * 2
        for own in TP.chunks(nQ, per):
            lists = TP.trim_lists(TP.visited_lists(sched, cls, own, False))
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            blk = TP.TileBlock(plan, heads, own, lists, False, inputs, batched, bsel)
            allowed = blk.allowed()  # [B | 1, Hs, C, R, K]
            kb = key_block[blk.col_index]  # [C, K]
            hit = torch.zeros(*allowed.shape[:-1], nblocks, dtype=torch.int8)
            hit.scatter_reduce_(-1, kb[:, None, :].expand(allowed.shape[-3:]).expand(allowed.shape).contiguous(),
                                allowed.to(torch.int8), reduce="amax")
            out_t[bsel, heads, own[0]:own[-1] + 1] |= hit.bool().expand(out_t[bsel, heads, own[0]:own[-1] + 1].shape)
    out = torch.zeros(B, Hq, Nq, nblocks, dtype=torch.bool)
    valid = plan.q_tokens.valid
    out[:, :, plan.q_tokens.index[valid]] = out_t[:, :, valid]
    return out


def route_plan(plan, q: torch.Tensor, k: torch.Tensor, inputs: dict, batched: set[str]):
    """The executor plan of one call of a routing pattern: lists per (batch, head) holding
    the KV tiles of blocks some query of the Q tile selected (FULL only where the mask
    tile is FULL and every query of the tile selected every block the KV tile touches),
    and the per-query selection applied on PARTIAL tiles."""
    B = q.shape[0]
    selected, key_block, _ = _select(  # [B, Hq, Nq, nb]
        plan.pattern, plan.bound, q, k, inputs,
        lambda key_block, nblocks, _: allowed_blocks(plan, key_block, nblocks, inputs, batched, B))
    return selected_plan(plan, selected, key_block)


def selected_plan(plan, selected: torch.Tensor, key_block: torch.Tensor):
    """``plan`` with a given selection ``[B, Hq, Nq, nblocks]`` of its query rows and the block of each
    of its key rows (``route_plan``'s lists; context parallelism selects across ranks)."""
    from ...compiler.schedule import TileSchedule

    pat, bound = plan.pattern, plan.bound
    B, Hq = selected.shape[0], bound.heads
    with torch.no_grad():
        # per Q tile: blocks selected by any / by every query of the tile (on the selection's device; the
        # lists are built on the CPU, where the schedule lives)
        dev = selected.device
        qi_tok, q_valid = plan.q_tokens.index.to(dev), plan.q_tokens.valid.to(dev)
        nQ, Tq = qi_tok.shape
        if nQ * Tq == selected.shape[2] and bool(q_valid.all()) and torch.equal(
                qi_tok.flatten(), torch.arange(nQ * Tq, device=dev)):  # tiles of consecutive rows: a view
            per_tile = selected.view(*selected.shape[:2], nQ, Tq, selected.shape[-1]).view(torch.uint8)
            # byte max / min over a tile's rows (any() / all() over a middle dimension are many times slower)
            any_sel, all_sel = per_tile.amax(-2).bool().cpu(), per_tile.amin(-2).bool().cpu()
        else:
            per_tile = selected[:, :, qi_tok]  # [B, Hq, nQ, Tq, nb]
            any_sel = (per_tile & q_valid[..., None]).any(-2).cpu()
            all_sel = (per_tile | ~q_valid[..., None]).all(-2).cpu()
        del per_tile
        # the block of each KV tile's slot; padded slots count as no block (a padded slot's stand-in
        # index may share a block with valid ones: it must neither add nor withhold one)
        slot_block = key_block[plan.k_tokens.index]  # [nK, Tk]
        slot_valid = plan.k_tokens.valid
        hs, qi, ki, full = plan.schedule.pairs()
        heads, qs, ks, fulls = [], [], [], []
        stored = plan.schedule.heads_stored
        for b in range(B):
            for h in range(Hq):
                sel = hs == (h if stored > 1 else 0)
                pq, pk, pf = qi[sel], ki[sel], full[sel]
                blocks, valid = slot_block[pk], slot_valid[pk]  # [pairs, Tk]
                visit = (any_sel[b, h][pq[:, None], blocks] & valid).any(-1)
                is_full = pf & ~(~all_sel[b, h][pq[:, None], blocks] & valid).any(-1)
                heads.append(torch.full((int(visit.sum()),), b * Hq + h, dtype=torch.int64))
                qs.append(pq[visit])
                ks.append(pk[visit])
                fulls.append(is_full[visit])
        s = plan.schedule
        sched = TileSchedule.from_pairs(s.q_extents, s.kv_extents, s.q_tile, s.kv_tile, Hq, B * Hq,
                                        torch.cat(heads), torch.cat(qs), torch.cat(ks), torch.cat(fulls),
                                        torch.zeros(B * Hq, dtype=torch.float64), exact=False, density_exact=False)
    return type(plan)(pat, bound, sched, plan.q_tokens, plan.k_tokens, plan.mask, plan.bias, plan.softcap,
                      selection=selected, key_block=key_block, batch=B, pair_mask=plan.pair_mask, tables=plan.tables)


def selection_words(selected: torch.Tensor) -> torch.Tensor:
    """The per-query block selection as the kernels read it: bit ``b % 32`` of word ``b // 32``
    is block ``b`` (int32 ``[B, Hq, Nq, words + 1]``; the last word is zero, so that a KV tile
    can always read the two words its blocks fall in, see ``compiler.triton_codegen.source``). Packed a run of
    queries at a time (a token route has a block per key)."""
    *lead, nq, nblocks = selected.shape
    words = -(-nblocks // WORD_BITS) + 1
    dev = selected.device
    weights = torch.bitwise_left_shift(torch.ones(WORD_BITS, dtype=torch.int64, device=dev),
                                       torch.arange(WORD_BITS, device=dev))
    out = torch.empty(*lead, nq, words, dtype=torch.int32, device=dev)
    rows = max(1, SELECT_ELEMENTS // max(1, math.prod(lead) * words * WORD_BITS))
    for start in range(0, nq, rows):
        part = selected[..., start:start + rows, :]
        bits = torch.zeros(*part.shape[:-1], words * WORD_BITS, dtype=torch.int64, device=dev)
        bits[..., :nblocks] = part.to(torch.int64)
        packed = (bits.view(*part.shape[:-1], words, WORD_BITS) * weights).sum(-1)  # 0 .. 2**32 - 1
        out[..., start:start + rows, :] = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return out
