"""A route's selection (by its form, ``plan/forms/``) and its tile lists, made on the call's device
at every call (issue 42): a warm call of a routed pattern on the Triton backend reads nothing on the host
(``routing.route_plan`` chose on the device but built its lists on the host, reading the selection back).

What depends on the shapes alone is made once per plan and device (``Constants``): the block of every key,
which blocks the mask lets each query reach and the keep rule (a block route's; a token route's are
evaluated per run of queries, on the device, over the span of keys the mask lets the run reach, found once),
what the form reads besides (``RouteForm.device_extras``: an antidiagonal route's stride tiles), the static
schedule's tile pairs as fixed-width candidate lists per Q tile and per KV tile, and the blocks each KV tile's
keys fall in. At every call: the form's selection (``RouteForm.select_on_device``: the host's rule with no host
read), then per (batch, head) the candidates some query of the Q tile selected a block of (FULL where the
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

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.route_blocks import block_ids, route_sizes
from . import call_plan, decode_lists, forms, given, routing
from .device_tiles import Side, candidates, compact, pair_keys
from .forms.top_k_tokens import device_mask


def applies(pat) -> bool:
    """Whether a call's selection and lists of ``pat`` are made by this module: a route (top-k, or top-p by
    antidiagonal scoring) whose mask and keep read no call-time input (its indexer's or given scores are read
    on the device)."""
    route = pat.route
    keep_inputs = isinstance(route.keep, sympy.Basic) and bool(E.input_names(route.keep)) if route else False
    return (route is not None and not E.input_names(pat.mask) and not keep_inputs
            and forms.form_of(route).select_on_device is not None)


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
    extras: dict | None = None  # what the form's device selection reads besides these (RouteForm.device_extras)
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


def constants(plan, device: torch.device) -> Constants:
    """``Constants`` of a routed plan on ``device``: made once, on the host, and moved there."""
    pat, bound = plan.pattern, plan.bound
    route = pat.route
    form = forms.form_of(route)
    if bound.q_offset:  # admission refuses it first: a plan never has such a call
        forms.refuse_query_offset(pat)
    block, topk = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, bound.nk)
    allowed = keep = q_block = exprs = None
    if route.tokens and route.scores_input is None:  # a token route: its mask and keep, evaluated per run of queries
        exprs = {"mask": E.substitute(pat.mask, bound),
                 "keep": None if route.keep is None else E.substitute(route.keep, bound)}
    else:  # a block route: its reach and keep as the host has them
        allowed = routing.allowed_blocks(plan, key_block, nblocks, {}, set(), 1)
        keep = routing.keep_blocks(pat, bound, {}, 1, key_block, nblocks)
        if route.is_top_k() and route.params.score == "block" and not bound.q_offset:
            q_block = block_ids(pat.queries, block, bound, bound.n)[0]
    tok = plan.q_tokens
    in_order = bool(tok.valid.all()) and tok.index.numel() == bound.n and torch.equal(
        tok.index.flatten(), torch.arange(bound.n))
    extras = form.device_extras(plan, allowed, keep, block) if form.device_extras is not None else None
    lo, hi, blocks = _tile_blocks(plan, key_block)
    full = pair_keys(plan.schedule, plan.schedule.heads_stored, True)
    sides = {"q": candidates(plan.schedule, full, False), "k": candidates(plan.schedule, full, True)}

    def on(t):
        return None if t is None else t.to(device)

    return Constants(on(key_block), on(key_block.to(torch.int32)), nblocks, topk, on(q_block), on(allowed), on(keep),
                     on(tok.index), on(tok.valid), in_order,
                     {s: dataclasses.replace(c, index=on(c.index), flag=on(c.flag)) for s, c in sides.items()}, on(lo),
                     on(hi), on(blocks), None if extras is None else {n: v if isinstance(v, int) else on(v)
                                                                       for n, v in extras.items()}, exprs)


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
    c = plan.on_device(("route", q.device), lambda: constants(plan, q.device))
    selected, lists = _select_and_list(pat, bound, q, k, tensors, c)
    sched = call_plan.device_schedule(plan.schedule, lists["FULL_N"].shape[0], lists)
    return call_plan.for_call(plan, sched, selection=selected, key_block=c.key_block32, batch=selected.shape[0])


def decode_route_plan(plan, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, tensors: dict):
    """A forward-only decode step of a routed pattern (``decode_lists.applies``): ``plan`` is the template kept
    for every length (``plan.call_lists`` its ``DecodeLists``), ``bound`` the step's. The route's constants are
    made on the device from positions (``decode_constants``) and the candidates are the step's range's
    (``DecodeLists.sides``): no tile is classified and nothing is planned on the host, whatever the length."""
    c = decode_constants(plan, bound, q.device)
    selected, lists = _select_and_list(plan.pattern, bound, q, k, tensors, c)
    sched = decode_lists.step_schedule(bound, plan.schedule, lists)
    return call_plan.for_call(plan, sched, bound=bound, selection=selected, key_block=c.key_block32,
                              batch=selected.shape[0])


def decode_constants(plan, bound: E.Bound, device: torch.device) -> Constants:
    """``Constants`` of the decode step ``bound`` (a sequence's last ``n`` rows after ``nk - n`` cached keys) on
    ``device``, made there at every step: the block of every key and the KV tiles' runs of blocks from
    arithmetic, a block route's reach and keep by evaluating the mask and keep (which name no growing size) at the
    rows' and keys' positions, a token route's over every key (the runs' spans are not searched for), the
    candidates from the template's ``DecodeLists``."""
    pat = plan.pattern
    route = pat.route
    (size,), topk = route_sizes(pat, bound)
    n, nk = bound.n, bound.nk
    nblocks = -(-nk // size)
    keys = torch.arange(nk, device=device)
    key_block = keys // size
    mask, keep_expr, q_index, q_valid, in_order = plan.on_device(("decode route", device),
                                                                 lambda: _decode_template(plan, device))
    allowed = keep = exprs = None
    if route.tokens and route.scores_input is None:  # a token route: evaluated per run of queries, over every key
        exprs = {"mask": mask, "keep": keep_expr, "every_key": True}
    else:
        rows = torch.arange(n, device=device)
        reach = device_mask(mask, pat, bound, rows, keys)
        reach = reach.expand(1, reach.shape[1], n, nk)
        pad = reach.new_zeros(*reach.shape[:3], nblocks * size - nk)
        allowed = torch.cat([reach, pad], -1).view(*reach.shape[:3], nblocks, size).any(-1)
        if keep_expr is not None:  # at each block's first key
            keep = device_mask(keep_expr, pat, bound, rows, torch.arange(nblocks, device=device) * size)
    sched = plan.schedule
    sides = plan.call_lists.sides(bound, sched, device)
    kv_tile, nkv = sched.kv_tile[0], -(-nk // sched.kv_tile[0])
    first = torch.arange(sides["q"].index.shape[-1], device=device) * kv_tile  # the range's KV tiles
    beyond = first >= nk  # a tile past this step's keys reaches no block (an empty run at the end)
    lo = torch.where(beyond, nblocks, first // size)
    hi = torch.where(beyond, nblocks - 1, ((first + kv_tile).clamp(max=nk) - 1) // size)
    k_side = sides["k"]
    sides = {"q": sides["q"], "k": Side(k_side.index[:, :nkv], k_side.flag[:, :nkv])}
    return Constants(key_block, key_block.to(torch.int32), nblocks, topk, None, allowed, keep, q_index, q_valid,
                     in_order, sides, lo, hi, None, None, exprs)


def _decode_template(plan, device: torch.device) -> tuple:
    """What ``decode_constants`` reads of the template at every length, made once per device: the mask and keep
    with the sizes bound (they name none that grows), the Q tiles' rows and whether they are in order."""
    pat, bound = plan.pattern, plan.bound
    tok = plan.q_tokens
    keep = None if pat.route.keep is None else E.substitute(pat.route.keep, bound)
    return (plan.call_lists.mask, keep, tok.index.to(device), tok.valid.to(device),
            tok.index.numel() == bound.n and bool(tok.valid.all()))


def _select_and_list(pat, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, tensors: dict, c: Constants
                     ) -> tuple[torch.Tensor, dict]:
    """The call's selection (its form's, on the device) and its lists per (batch, head) among ``c``'s
    candidates: ``(selected, lists)``."""
    device = q.device
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        selected = given.record(forms.form_of(pat.route).select_on_device(pat, bound, q, k, tensors, c))
        if selected.shape[0] != q.shape[0]:  # scores given without a batch: the same choice for every entry (the
            # kernels read the lists and the selection at each entry's own place)
            selected = selected.expand(q.shape[0], *selected.shape[1:])
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
    return selected, lists
