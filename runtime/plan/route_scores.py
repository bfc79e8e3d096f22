"""What every routing form shares: the two sides of a route's score, the scores themselves, ``keep`` per block and
the top-k choice rule (``choose``), used by the forms' selections (``runtime.plan.forms``) on the host and the
device alike:

- the score of a block is ``q . mean(k_block)`` per query token (MoBA), ``mean(q_block) . mean(k_block)`` per
  query block (BiFormer), the bound of ``q . k`` over the block from its keys' extremes (Quest), ``q . k`` of a
  single key or an indexer's product (token routes), unscaled, in fp32 (fp64 for fp64 inputs); ``shared``
  averages it over heads;
- a block with no key the mask allows is never chosen; blocks where ``keep`` holds (k bound to the block's first
  key) always are, and count towards K; the remaining places go to the highest scores, ties to the lower index.
"""

from __future__ import annotations

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.route_blocks import block_ids, route_sizes
from ...core import ir, route_kinds
from ...core.errors import SpecError


def score_vectors(pat: ir.PatternIR, q: torch.Tensor, k: torch.Tensor, inputs: dict | None,
                  rows: slice | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sides of the routing score: ``q`` and ``k``, or a token route's indexer inputs
    ``(QI [B | 1, Hq, Nq, DI], KI [B | 1, Hq, Nk, DI])`` (a leading batch dimension added); a route
    whose scores are given (``by probs(BRANCH)`` in a combined pattern): that input ``[B | 1, Hq, Nq,
    blocks]`` on both sides. An indexer's inputs are declared over the whole sequence (``n``): the query side
    is their ``rows`` of this call's queries (a slice, or positions; default the first ``Nq``): after a KV
    cache ``q_offset`` on, a context-parallel rank's its own positions; so are the rows of block scores given
    over the whole sequence (``blocks(B) by NAME``, ``float[heads, n, blocks]``)."""
    route = scoring(pat.route)
    if route.scores is not None:
        given = inputs[route.scores]
        given = given if given.dim() == 4 else given[None]
        if pat.input(route.scores).dim_names[1] == "n":  # `blocks(B) by NAME`: the whole sequence's rows
            given = given[:, :, slice(0, q.shape[2]) if rows is None else rows]
        return given, given
    if route.indexer is None:
        return q, k
    rows = slice(0, q.shape[2]) if rows is None else rows
    if route.score == "key":  # a score per key: ones [1, H, Nq, 1] against S as one-channel keys [B | 1, H, Nk, 1]
        (scores,) = (inputs[name] for name in route.indexer)
        scores = scores if scores.dim() == 3 else scores[None]
        return scores.new_ones(()).expand(1, scores.shape[1], q.shape[2], 1), scores[..., None]
    if route.score == "indexer":  # DeepSeek's lightning indexer: (QI | W [B | 1, J, Nq, DI + 1], KI [B | 1, 1, Nk, DI])
        qi, ki, w = (inputs[name] for name in route.indexer)
        qi, ki, w = (x if x.dim() == rank else x[None] for x, rank in ((qi, 4), (ki, 3), (w, 3)))
        dtype = torch.float64 if torch.float64 in (qi.dtype, ki.dtype, w.dtype) else torch.float32  # w not rounded
        sq = torch.cat([qi.transpose(1, 2).to(dtype), w.transpose(1, 2)[..., None].to(dtype)], -1)
        return sq[:, :, rows], ki[:, None]
    qi, ki = (inputs[name] for name in route.indexer)
    return (qi if qi.dim() == 4 else qi[None])[:, :, rows], (ki if ki.dim() == 4 else ki[None])


def scoring(route: ir.Route) -> route_kinds.TopK:
    """How ``route`` scores its units: a top-k route's (or a given selection's) own values; a min-max share
    route's scores are a top-k blocks route's ``q @ mean(k)``, one selection per query head."""
    if route.is_top_k():
        return route.params
    return route_kinds.TopK(route.block, route.keep, None, "token")


def query_rows(bound: E.Bound, q: torch.Tensor) -> slice:
    """The rows of this call's queries in inputs declared over the whole sequence: after a KV cache, the last."""
    return slice(bound.q_offset, bound.q_offset + q.shape[2])


def key_summary(pat: ir.PatternIR, k: torch.Tensor, key_block: torch.Tensor, nblocks: int, heads: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """What a block route's score reads of the keys, per block and query head ``[B, Hq, nblocks, D]``: the
    mean key ``(mean,)`` (a token route: the keys themselves), or Quest's per-dimension extremes ``(max, min)``
    (``q @ bound(k)``). Made once per call: the scores are made a run of queries at a time."""
    kd = k.to(dtype)
    key_block = placed(key_block, k.device)
    if scoring(pat.route).score == "bound":
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
    route = scoring(pat.route)
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
    if route.score in ("token", "key"):  # a key's own vector (a score per key: one channel against ones)
        score = q.to(dtype) @ k_mean.transpose(-1, -2)  # [B, Hq, Nq, nb]
    else:
        if bound.q_offset:  # the mean over a query block needs the block's earlier queries
            raise SpecError(f"'{pat.name}' routes by the mean of query blocks, which needs every query of a block: "
                            "queries after a KV cache (nk > n) are not supported", where="argument k",
                            hint="call with all the queries (nk == n)")
        if q_block is None:
            q_block = block_ids(pat.queries, route_sizes(pat, bound)[0], bound, Nq)[0]
        q_block = placed(q_block, q.device)
        q_onehot = torch.nn.functional.one_hot(q_block, nblocks).to(dtype)
        q_mean = (q.to(dtype).transpose(-1, -2) @ q_onehot).transpose(-1, -2) / q_onehot.sum(0).clamp(min=1)[:, None]
        score = (q_mean @ k_mean.transpose(-1, -2))[:, :, q_block, :]
    if route.shared:
        score = score.mean(dim=1, keepdim=True)
    return score.expand(max(B, score.shape[0]), Hq, Nq, nblocks)


def head_dots(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q . k`` ``[B, Hq, R, S]`` of ``q`` ``[B, Hq, R, D]`` and ``k`` ``[B, Hkv, S, D]``, each query head against its
    K/V head (no copy of the keys per query head), in their dtype."""
    B, Hq, R, D = q.shape
    Hkv = k.shape[1]
    return (q.view(B, Hkv, Hq // Hkv, R, D) @ k[:, :, None].transpose(-1, -2)).view(B, Hq, R, k.shape[2])


def placed(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: itself where it is there already (no copy, and no call that asks for one: on a GPU
    a copy from the host waits for the device's queued work)."""
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


#: Query rows scored at once by a token route's selection: its scores are ``[B, Hq, rows, Nk]``
SELECT_ELEMENTS = 1 << 25
#: ... and at most this many rows at once by a token route
TOKEN_ROWS = 512


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


def score_sides(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``score_vectors`` of this call's queries (``query_rows``), on q's device."""
    dev = q.device
    return tuple(t if t.device == dev else t.to(dev) for t in score_vectors(pat, q, k, inputs, query_rows(bound, q)))
