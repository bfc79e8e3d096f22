"""A route's selection (top-k, or top-p by antidiagonal scoring) and its tile lists, made on the call's device
at every call (issue 42): a warm call of a routed pattern on the Triton backend reads nothing on the host
(``routing.route_plan`` chose on the device but built its lists on the host, reading the selection back).

What depends on the shapes alone is made once per plan and device (``Constants``): the block of every key,
which blocks the mask lets each query reach and the keep rule (a block route's; a token route's are
evaluated per run of queries, on the device, over the span of keys the mask lets the run reach, found once),
an antidiagonal route's stride tiles, the static schedule's tile pairs as fixed-width candidate lists per Q
tile and per KV tile, and the blocks each KV tile's keys fall in. At every call: the scores and the choice
(``device_choice.choose``: the rule of ``routing.choose`` with no host read; ``antidiagonal.threshold`` for
top-p), then per (batch, head) the candidates some query of the Q tile selected a block of (FULL where the
mask's tile is FULL and every query of the tile selected every block the KV tile touches, as
``routing.selected_plan`` has it), compacted into lists of the candidates' widths.

The launch orders and split counts a launch derives from its lists' counts are decided by a plan's first
call and kept (``call_plan.CallState``): any order of the Q tiles gives the same answer.

Applies to routes whose mask and keep read no call-time input (``applies``); the others, and a selection
made across ranks (context parallelism), keep ``routing.route_plan``."""

from __future__ import annotations

import dataclasses

import sympy
import torch

from ...compiler import evaluate as E
from ...compiler.route_blocks import block_ids, route_sizes, route_stride
from . import antidiagonal, call_plan, device_choice, given, routing, share
from .device_tiles import candidates, compact, pair_keys


def applies(pat) -> bool:
    """Whether a call's selection and lists of ``pat`` are made by this module: a route (top-k, or top-p by
    antidiagonal scoring) whose mask and keep read no call-time input (its indexer's or given scores are read
    on the device)."""
    route = pat.route
    keep_inputs = isinstance(route.keep, sympy.Basic) and bool(E.input_names(route.keep)) if route else False
    return route is not None and not E.input_names(pat.mask) and not keep_inputs


@dataclasses.dataclass
class Constants:
    """What a routed plan's calls share on one device (the module docstring)."""

    key_block: torch.Tensor  # [Nk] int64
    key_block32: torch.Tensor  # [Nk] int32, as the kernels read it
    nblocks: int
    topk: int
    q_block: torch.Tensor | None  # a block-scored route's block of every query
    allowed: torch.Tensor | None  # a block route's [1, Hq | 1, Nq, nblocks]
    keep: torch.Tensor | None  # a block route's keep, broadcastable to the same
    q_index: torch.Tensor  # [nQ, Tq] the query rows of each Q tile
    q_valid: torch.Tensor
    rows_in_order: bool  # Q tiles of consecutive rows: a view of the selection
    sides: dict  # "q" / "k" -> device_tiles.Side: the static schedule's pairs, flagged where the mask's tile is FULL
    block_lo: torch.Tensor | None  # [nK] the first and last block of each KV tile's keys (runs of blocks)
    block_hi: torch.Tensor | None
    tile_blocks: torch.Tensor | None  # [nK, M] the blocks of each KV tile's keys, -1 padded (otherwise)
    top_p: dict | None = None  # an antidiagonal route's stride tiles, candidate and forced blocks (_top_p)
    exprs: dict | None = None  # a token route's mask and keep at these sizes (evaluated per run of queries)


def _tile_blocks(plan, key_block: torch.Tensor) -> tuple:
    """(first block, last block) of each KV tile's keys where they are runs of blocks, else the padded list
    of each tile's blocks: ``(lo, hi, None)`` or ``(None, None, blocks)``."""
    slot = torch.where(plan.k_tokens.valid, key_block[plan.k_tokens.index], -1)  # [nK, Tk]
    big = torch.iinfo(torch.int64).max
    lo = torch.where(slot >= 0, slot, big).amin(1)
    hi = slot.amax(1)
    distinct = torch.sort(slot, 1).values
    fresh = torch.cat([distinct[:, :1] >= 0, (distinct[:, 1:] != distinct[:, :-1]) & (distinct[:, 1:] >= 0)], 1)
    if bool(((hi - lo + 1) == fresh.sum(1)).all()):
        return lo, hi, None
    width = max(1, int(fresh.sum(1).max()))
    order = torch.sort((~fresh).to(torch.int8), dim=1, stable=True).indices
    blocks = torch.where(fresh.gather(1, order), distinct.gather(1, order), -1)[:, :width]
    return None, None, blocks


def _top_p(plan, allowed: torch.Tensor, keep: torch.Tensor | None, block: int) -> dict:
    """What an antidiagonal route's calls share: the stride tiles the mask reaches ``[1, Hq, runs, runs]``
    (``antidiagonal.block_mass``'s), and per (query block, key block) whether the mask reaches it and whether
    ``keep`` forces it (``antidiagonal.select``'s candidates and forced blocks)."""
    pat, bound = plan.pattern, plan.bound
    stride = route_stride(pat, bound)
    tiles = antidiagonal.classified_stride_tiles(pat, bound, None, stride)
    if tiles is None:  # the classifier left pairs open: the mask pooled densely, once
        tiles = antidiagonal.stride_tiles(pat, bound, None, 1, stride, range(0, -(-bound.n // stride)))
    nblocks = allowed.shape[-1]
    forced = None if keep is None else antidiagonal.per_block(torch.broadcast_to(keep, allowed.shape), block,
                                                             nblocks)
    return {"tiles": tiles, "stride": stride, "candidates": antidiagonal.per_block(allowed, block, nblocks),
            "forced": forced}


def constants(plan, device: torch.device) -> Constants:
    """``Constants`` of a routed plan on ``device``: made once, on the host, and moved there."""
    pat, bound = plan.pattern, plan.bound
    route = pat.route
    if route.antidiagonal:
        antidiagonal.refuse_query_offset(pat, bound)
    block, topk = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, bound.nk)
    allowed = keep = q_block = exprs = None
    if route.tokens and route.scores is None:  # a token route: its mask and keep, evaluated per run of queries
        exprs = {"mask": E.substitute(pat.mask, bound),
                 "keep": None if route.keep is None else E.substitute(route.keep, bound)}
    else:  # a block route: its reach and keep as the host has them
        allowed = routing.allowed_blocks(plan, key_block, nblocks, {}, set(), 1)
        keep = routing.keep_blocks(pat, bound, {}, 1, key_block, nblocks)
        if route.score == "block" and not bound.q_offset:
            q_block = block_ids(pat.queries, block, bound, bound.n)[0]
    tok = plan.q_tokens
    in_order = bool(tok.valid.all()) and tok.index.numel() == bound.n and torch.equal(
        tok.index.flatten(), torch.arange(bound.n))
    top_p = _top_p(plan, allowed, keep, block[0]) if route.antidiagonal else None
    lo, hi, blocks = _tile_blocks(plan, key_block)
    full = pair_keys(plan.schedule, plan.schedule.heads_stored, True)
    sides = {"q": candidates(plan.schedule, full, False), "k": candidates(plan.schedule, full, True)}

    def on(t):
        return None if t is None else t.to(device)

    return Constants(on(key_block), on(key_block.to(torch.int32)), nblocks, topk, on(q_block), on(allowed), on(keep),
                     on(tok.index), on(tok.valid), in_order,
                     {s: dataclasses.replace(c, index=on(c.index), flag=on(c.flag)) for s, c in sides.items()}, on(lo),
                     on(hi), on(blocks), None if top_p is None else {n: v if isinstance(v, int) else on(v)
                                                                      for n, v in top_p.items()}, exprs)


def _device_mask(expr: sympy.Basic, pat, bound: E.Bound, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``expr`` (substituted, of positions and sizes alone) at query rows ``rows`` and key rows ``keys`` (device
    tensors) for every head: bool ``[1, Hq | 1, len(rows) | 1, len(keys) | 1]`` on their device."""
    heads = torch.arange(bound.heads, device=rows.device).view(1, -1, 1, 1)
    env = E.token_env(pat, bound, rows.view(1, 1, -1, 1), keys.view(1, 1, 1, -1), heads)
    value = E.as_tensor(E.Evaluator(env, {}, set(), None)(expr), torch.bool)
    value = torch.zeros((), dtype=torch.bool, device=rows.device) | value  # a constant made on the device
    return value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))


def _score_vectors(pat, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, tensors: dict
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    dev = q.device
    sides = routing.score_vectors(pat, q, k, tensors, routing.query_rows(bound, q))
    return tuple(t if t.device == dev else t.to(dev) for t in sides)


def _select_blocks(pat, bound: E.Bound, q, k, tensors: dict, c: Constants) -> torch.Tensor:
    """``routing._select``'s selection of a block route ``[B, Hq, Nq, nblocks]``, on q's device, runs of queries
    at a time (a fixed number of them)."""
    sq, sk = _score_vectors(pat, bound, q, k, tensors)
    B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
    nb = c.nblocks
    rows = Nq if pat.route.score == "block" else max(1, routing.SELECT_ELEMENTS // max(1, B * Hq * nb))
    selected = torch.empty(max(B, sq.shape[0]), Hq, Nq, nb, dtype=torch.bool, device=q.device)
    allowed = torch.broadcast_to(c.allowed, (*c.allowed.shape[:2], Nq, nb))
    keep = None if c.keep is None else torch.broadcast_to(c.keep, (*c.keep.shape[:2], Nq, nb))
    dtype = torch.float64 if torch.float64 in (sq.dtype, sk.dtype) else torch.float32
    if pat.route.given:  # the selection itself (a call's selection=): the blocks the mask lets a query reach
        return (routing.block_scores(pat, bound, sq, sk, c.key_block, nb) > 0) & allowed
    summary = None if pat.route.scores is not None else routing.key_summary(pat, sk, c.key_block, nb, Hq, dtype)
    for start in range(0, Nq, rows):
        part = slice(start, min(Nq, start + rows))
        score = routing.block_scores(pat, bound, sq[:, :, part], sk, c.key_block, nb, q_block=c.q_block,
                                     summary=summary)
        selected[:, :, part] = device_choice.choose(score, allowed[:, :, part], None if keep is None else
                                                    keep[:, :, part], c.topk)
    return selected


def _spans(pat, bound: E.Bound, c: Constants, rows: int, nq: int) -> list[tuple[slice, int, int]]:
    """Per run of ``rows`` queries, the first key and one past the last that the mask allows any query of it
    (``routing.allowed_span``): the mask reads no input, so they are found once per run length, on the host."""
    spans = c.exprs.setdefault("spans", {})
    if rows not in spans:
        spans[rows] = []
        unrouted = dataclasses.replace(pat, route=None)  # the mask alone (an indexer's inputs are not asked for)
        for start in range(0, nq, rows):
            part = torch.arange(start, min(nq, start + rows))
            lo, hi = routing.allowed_span(E.mask_tensor(unrouted, bound, {}, q_index=part), bound.nk)
            spans[rows].append((slice(start, start + len(part)), lo, hi))
    return spans[rows]


def _select_tokens(pat, bound: E.Bound, q, k, tensors: dict, c: Constants) -> torch.Tensor:
    """``routing._select_tokens``'s selection ``[B, Hq, Nq, Nk]`` on q's device, runs of queries at a time, each
    over the keys from the first to the last that the mask allows it (``_spans``: the host's spans, so the scores
    are the host's too), the mask and keep evaluated there."""
    sq, sk = _score_vectors(pat, bound, q, k, tensors)
    B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
    nk = k.shape[2]
    rows = max(1, min(routing.TOKEN_ROWS, routing.SELECT_ELEMENTS // max(1, B * max(Hq, sq.shape[1]) * nk)))
    selected = torch.zeros(max(B, sq.shape[0]), Hq, Nq, nk, dtype=torch.bool, device=q.device)
    for part, lo, hi in _spans(pat, bound, c, rows, Nq):
        if lo == hi:
            continue
        here = torch.arange(part.start, part.stop, device=q.device)
        keys = c.key_block[lo:hi]
        allowed = _device_mask(c.exprs["mask"], pat, bound, here, keys)
        keep = None if c.exprs["keep"] is None else _device_mask(c.exprs["keep"], pat, bound, here, keys)
        score = routing.block_scores(pat, bound, sq[:, :, part], sk[:, :, lo:hi], keys, hi - lo)
        selected[:, :, part, lo:hi] = device_choice.choose(score, allowed, keep, c.topk)
    return selected


def _select_top_p(pat, bound: E.Bound, q, k, c: Constants) -> torch.Tensor:
    """``antidiagonal.select``'s selection ``[B, Hq, Nq, nblocks]`` on q's device."""
    (block,), _ = route_sizes(pat, bound)
    t = c.top_p
    mass = antidiagonal.block_mass(pat, bound, q, k, None, block, t["stride"], tiles=t["tiles"])
    B = mass.shape[0]
    forced = None if t["forced"] is None else t["forced"].expand(B, *t["forced"].shape[1:])
    chosen = antidiagonal.threshold(mass, t["candidates"].expand(B, *t["candidates"].shape[1:]), forced,
                                    float(pat.route.topp))  # [B, Hq, nblocks, nblocks]
    return chosen[:, :, c.key_block[:q.shape[2]]] & c.allowed


def _select_share(pat, bound: E.Bound, q, k, c: Constants) -> torch.Tensor:
    """``routing._select_share``'s selection ``[B, Hq, Nq, nblocks]`` on q's device."""
    score = routing.block_scores(pat, bound, q, k, c.key_block, c.nblocks)
    return share.threshold(score, c.allowed, c.keep, float(pat.route.topp), pat.route.group)


def _per_tile(selected: torch.Tensor, c: Constants) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks selected by some query, by every query) of each Q tile: bool ``[B, Hq, nQ, nblocks]``."""
    nQ, Tq = c.q_index.shape
    if c.rows_in_order:  # tiles of consecutive rows: a view; a byte max / min over a tile's rows
        per_tile = selected.view(*selected.shape[:2], nQ, Tq, selected.shape[-1]).view(torch.uint8)
        return per_tile.amax(-2).bool(), per_tile.amin(-2).bool()
    per_tile = selected[:, :, c.q_index]  # [B, Hq, nQ, Tq, nb]
    valid = c.q_valid[..., None]
    return (per_tile & valid).any(-2), (per_tile | ~valid).all(-2)


def _classes(any_sel: torch.Tensor, all_sel: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, c: Constants
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(some query of Q tile ``qt`` selected a block of KV tile ``kt``, every query selected every one) for
    index tensors ``qt``, ``kt`` ``[Hq | 1, X, Y]``: bool ``[B, Hq, X, Y]``."""
    B, Hq, nQ, nb = any_sel.shape
    shape = torch.broadcast_shapes(qt.shape, kt.shape)
    qt, kt = qt.expand(shape), kt.expand(shape)

    def gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # table [B, Hq, ...] at [Hq | 1, ...]
        flat = index.reshape(index.shape[0], -1)
        return table.flatten(2).gather(-1, flat.expand(B, Hq, flat.shape[-1])).view(B, Hq, *index.shape[1:])

    if c.tile_blocks is None:  # each KV tile's blocks are a run: counted from running sums over the blocks
        pad = torch.zeros(B, Hq, nQ, 1, dtype=torch.int32, device=any_sel.device)
        runs_any = torch.cat([pad, any_sel.cumsum(-1, dtype=torch.int32)], -1)
        runs_all = torch.cat([pad, all_sel.cumsum(-1, dtype=torch.int32)], -1)
        lo, hi = c.block_lo[kt], c.block_hi[kt]
        first, past = qt * (nb + 1) + lo, qt * (nb + 1) + hi + 1
        some = gather(runs_any, past) - gather(runs_any, first) > 0
        every = gather(runs_all, past) - gather(runs_all, first) == (hi - lo + 1)
        return some, every
    blocks = c.tile_blocks[kt]  # [Hq | 1, X, Y, M]
    ok = blocks >= 0
    at = qt[..., None] * nb + blocks.clamp(min=0)
    some = (gather(any_sel, at) & ok).any(-1)
    every = (gather(all_sel, at) | ~ok).all(-1)
    return some, every


def route_call_plan(plan, q: torch.Tensor, k: torch.Tensor, tensors: dict):
    """``routing.route_plan`` on the device: ``plan`` (a routed plan's static one) with this call's selection
    and its lists per (batch, head) (``call_plan.for_call``), nothing read on the host."""
    pat, bound = plan.pattern, plan.bound
    device = q.device
    c = plan.on_device(("route", device), lambda: constants(plan, device))
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        if pat.route.antidiagonal:
            selected = _select_top_p(pat, bound, q, k, c)
        elif pat.route.group is not None:
            selected = _select_share(pat, bound, q, k, c)
        elif pat.route.tokens and pat.route.scores is None:
            selected = _select_tokens(pat, bound, q, k, tensors, c)
        else:
            selected = _select_blocks(pat, bound, q, k, tensors, c)
        given.record(selected)
        any_sel, all_sel = _per_tile(selected, c)
        B, Hq = selected.shape[:2]
        lists = {}
        for own, prefix in (("q", ""), ("k", "T_")):
            side = c.sides[own]
            tiles = side.index.shape[1]
            mine = torch.arange(tiles, device=device).view(1, -1, 1)
            other = side.index.clamp(min=0)
            some, every = _classes(any_sel, all_sel, *((mine, other) if own == "q" else (other, mine)), c)
            present = side.index >= 0
            visit = some & present
            full = visit & every & side.flag
            index = side.index.expand(Hq, *side.index.shape[1:]).unsqueeze(0).expand(B, -1, -1, -1).flatten(0, 1)
            for name, keep in (("FULL", full), ("PART", visit & ~full)):
                lists[f"{prefix}{name}_N"], lists[f"{prefix}{name}_I"] = compact(index, keep.flatten(0, 1))
    sched = call_plan.device_schedule(plan.schedule, B * Hq, lists)
    return call_plan.for_call(plan, sched, selection=selected, key_block=c.key_block32, batch=B)
