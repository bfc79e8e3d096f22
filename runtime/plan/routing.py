"""Content-dependent block selection (the ``route`` clause), as spec/REFERENCE.md states it: a call's selection
by its route's form (``plan/forms/``), the reference's dense mask of it (``select_blocks``), the executor's tile
lists of it (``route_plan``, ``selected_plan``) and the kernels' words (``selection_words``). The scores and the
top-k rule every form shares are ``plan/route_scores.py``'s (re-exported here)."""

from __future__ import annotations

import math

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.route_blocks import WORD_BITS, block_ids, route_sizes  # noqa: F401 (re-exported)
from ...core import ir
from . import forms, given
from .route_scores import (  # noqa: F401 (re-exported: the scores and the choice every form shares)
    SELECT_ELEMENTS,
    TOKEN_ROWS,
    allowed_span,
    block_scores,
    choose,
    keep_blocks,
    key_summary,
    query_rows,
    score_sides,
    score_vectors,
)


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


def _select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, allowed
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The selection of this call (not differentiated), by the route's form (``forms.form_of``): ``(selected
    [B | 1, Hq, Nq, nblocks], key_block, nblocks)``; ``allowed(key_block, nblocks, score dtype)`` says, per query,
    whether the mask allows some key of each block (densely for the reference, over the schedule's tiles for the
    executor). On q's device; ``key_block`` on the CPU. Noted for a call's ``return_selection``
    (``given.record``)."""
    selected, key_block, nblocks = forms.form_of(pat.route).select(pat, bound, q, k, inputs, allowed)
    return given.record(selected), key_block, nblocks


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
    from ...compiler.analysis.schedule import TileSchedule

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
    can always read the two words its blocks fall in, see ``compiler.codegen.triton.source``). Packed a run of
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
