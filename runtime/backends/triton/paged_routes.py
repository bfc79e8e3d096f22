"""A routed pattern's paged batch in one launch (MoBA's ``q @ mean(k)``, Quest's ``q @ bound(k)``): each row's
selection made on the device from its own cached keys, then ``attnc_fwd_paged`` over the tiles it reaches.

At every call, with nothing read on the host: the block summaries of every row's keys through its block table
(``attnc_paged_summary``: each cached key read once, no copy of the cache; a row's last block holds only its cached
keys), each query's scores against its row's summaries (the query heads of a K/V head in one product), the blocks
its mask reaches among its row's keys (evaluated at its position, as ``device_routes.decode_constants`` does for a
contiguous cache), the blocks its route keeps, its K at its row's length (Quest's grows with the cache), and the
choice (``device_choice.choose``: the host rule, bit for bit, in fixed shapes). The selection goes to the kernel as
bits (``SEL``: ``[batch entry, query heads, queries, words]``), and each (row, K/V head) gets its own list of the KV
tiles some query of the row, for some query head of the group, selected a block of: every tile PARTIAL (the kernel
evaluates the mask and the selection per key), none FULL. So a row's step reads the keys of its selected blocks
only, plus one pass over its keys for the summaries: the pass that does not shrink with the route (with a
``KeySummary`` open, only each row's blocks after its kept, complete ones: ``kept_summary``).

The lists are sized by the table's capacity (every KV tile), so a call's shapes do not depend on any length and one
captured graph replays at every step.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....compiler.codegen.triton.paged_lines import serves_route
from ....compiler.codegen.triton.source import ROW_LENGTHS, but_row_lengths
from ...plan import decode_lists, kept_summary
from ...plan.device_choice import choose
from ...plan.device_tiles import compact
from ...plan.forms.top_k_tokens import device_mask
from ...tritonenv import interpreting
from .paged_queries import PagedQueries, pow2, row_matmul

#: Keys a summary program reads at once.
SUMMARY_CHUNK = 64
#: Bits of one word of ``SEL``.
WORD = 32


def applies(pat) -> bool:
    """Whether a paged call of the routed ``pat`` is served in one launch: top-k blocks of one size on the
    sequence, scored from the keys' means (MoBA) or bounds (Quest) per query head or given (SeerAttention's gate),
    or top-k tokens (``paged_tokens``); a mask and block size that name no growing size, a keep that may name the
    row's length (each query's row's), neither reading an input, and a K that may grow with the length but is at
    least 1 at every length."""
    route = pat.route
    if not route.is_top_k() or not serves_route(route) or not decode_lists.applies(dataclasses.replace(pat, route=dataclasses.replace(
            route, params=dataclasses.replace(route.params, keep=None)))):
        return False
    if isinstance(route.keep, sympy.Basic) and (
            E.input_names(route.keep) or not route.keep.free_symbols <= decode_lists.LENGTH_FREE | ROW_LENGTHS):
        return False
    if {decl.name for decl in pat.inputs} - route_inputs(pat) - _read_by_terms(pat):
        return False  # inputs the route reads (a token route's indexer, given scores), or the kernel's terms (DMA's bias)
    topk = sympy.sympify(route.params.topk)
    return topk.free_symbols <= decode_lists.LENGTH_FREE | ROW_LENGTHS and bool((topk - 1).is_nonnegative)


def route_inputs(pat) -> set:
    """The inputs a route reads before the launch: a token route's indexer, a block route's given scores."""
    return set(pat.route.inputs)


def _read_by_terms(pat) -> set:
    """The inputs the kernel's terms read (mask, bias: ``paged.applies`` checks where)."""
    return {name for e in (pat.mask, pat.bias) if isinstance(e, sympy.Basic) for name in E.input_names(e)}


def select(t, q, qs: PagedQueries, k_cache, block_table, seqlens, inputs: dict | None = None
           ) -> tuple[torch.Tensor, dict, tuple]:
    """``(SEL, lists, kept)`` of a paged call of template ``t`` (module docstring): ``SEL`` the selection's bits,
    int32 ``[B | 1, Hq, rows, words]`` as q's rows are laid out (``qs``: its queries); ``lists`` the rows' (row x K/V
    head) lists of
    PARTIAL tiles, none FULL, with their searches' steps; ``kept``: what ``keep`` commits to an open
    ``KeySummary`` after the launch (None where none is open)."""
    pat, bound = t.launch.pattern, t.launch.bound
    size, cap = t.route_block, t.capacity
    nblocks = -(-cap // size)
    rows, heads, kv_heads, device = block_table.shape[0], q.shape[1], k_cache.shape[2], q.device
    row, pos, valid, lengths, packed = qs.row, qs.pos, qs.valid, qs.lengths, qs.packed
    given = pat.route.scores_input is not None
    summary, kept = (None, None) if given else _summaries(t, k_cache, block_table, seqlens, lengths, size, nblocks)
    with torch.no_grad():
        key_rows = lengths[row]
        if given:  # the caller's block scores of each query, at its position over the capacity
            score = _given_scores(pat, inputs, row, pos, nblocks, q.shape, packed)
        elif packed:  # q [1, Hq, total, D]: each query scored against its own row's summaries
            score = _scores(pat, qs.flat.unsqueeze(2), summary, row)
        else:  # q [B, Hq, n, D]: row b's n queries, its last n positions
            score = _scores(pat, q, summary)
        X, n = score.shape[0], score.shape[2]  # [X, Hq, n, nblocks]
        # the template's bound is a block of its last rows: positions relative to its first (token_env adds it)
        flat = pos - bound.q_offset
        keys = torch.arange(cap, device=device)
        reach = (device_mask(t.mask, pat, bound, flat, keys, key_rows) & (keys < key_rows.view(-1, 1))
                 & valid.view(-1, 1))
        pad = reach.new_zeros(*reach.shape[:3], nblocks * size - cap)
        allowed = torch.cat([reach, pad], -1).view(*reach.shape[:3], nblocks, size).any(-1)  # [1, H|1, X*n, nb]
        keep = None
        if pat.route.keep is not None:  # naming the length: each query's row's
            keep = device_mask(but_row_lengths(pat.route.keep, bound), pat, bound, flat,
                               torch.arange(nblocks, device=device) * size, key_rows)
        topk = row_topk(pat, bound, key_rows)
        row_of = row if packed else None
        ranked = score.permute(1, 0, 2, 3).reshape(1, heads, X * n, nblocks)
        chosen = choose(ranked, allowed, keep, topk).view(heads, X, n, nblocks).permute(1, 0, 2, 3)
        words = pack_words(chosen)
        if packed:  # [1, Hq, total, words]: indexed as q's packed rows
            words = words.permute(2, 1, 0, 3).contiguous()
        lists = tile_lists(t, chosen, row_of, rows, kv_heads, size, nblocks)
    return words, lists, kept


def _given_scores(pat, inputs: dict, row, pos, nblocks: int, shape, packed: bool) -> torch.Tensor:
    """The route's given block scores of each query, ``[X, Hq, n, nblocks]`` as q of ``shape`` lays them out. Declared
    over the sequence (``[heads, n, blocks]``, SeerAttention's gate): ``[B | 1, heads, capacity, blocks]``, read at
    each query's row and position. Declared over the queries (``[heads, nq, blocks]``, a combined pattern's route
    by another branch's probabilities, made per call: ``combined_paged``): laid out as q's rows, ``[B | 1, heads,
    n | total, blocks]``."""
    given = inputs[pat.route.scores_input]
    X, n = (shape[2], 1) if packed else (shape[0], shape[2])
    if "nq" in pat.input(pat.route.scores_input).dim_names:
        given = given if given.dim() == 4 else given[None]
        if packed:  # [1, Hq, total, blocks]: each query a row of its own
            return given[0, :, :, :nblocks].transpose(0, 1).unsqueeze(2)
        return given[..., :nblocks].expand(X, -1, -1, -1)
    given = given[row, :, pos] if given.dim() == 4 else given[:, pos].transpose(0, 1)  # [X * n, heads, blocks]
    return given[..., :nblocks].reshape(X, n, shape[1], nblocks).transpose(1, 2)


def keep(kept: tuple | None, flags: torch.Tensor) -> None:
    """Commit a call's complete blocks to its open ``KeySummary``: each row's, where the kernel's check of its values
    held (``flags``: 1 where it did), else none (a refused row's summaries, made from bad values, are made again)."""
    if kept is not None:
        blocks, complete, made_from, table = kept
        blocks.copy_(torch.where(flags != 0, complete, 0))
        made_from.copy_(table)  # the pages the kept blocks were made from


def _summaries(t, k_cache, block_table, seqlens, lengths, size: int, nblocks: int
               ) -> tuple[torch.Tensor, tuple | None]:
    """``attnc_paged_summary``'s ``[1 | 2, B, Hkv, nblocks, D]`` fp32 (means; or maxima, minima): made whole, or,
    where a ``KeySummary`` is open (``kept_summary.keeping``), its kept blocks read and the rest made; with
    ``(kept blocks, complete blocks)`` of every row, which ``keep`` commits once the rows' values are checked."""
    rows, kv_heads, head_dim = block_table.shape[0], k_cache.shape[2], k_cache.shape[3]
    pat = t.launch.pattern
    bound = pat.route.params.score == "bound"
    shape = (2 if bound else 1, rows, kv_heads, nblocks, head_dim)
    kept = kept_summary.open_for(pat)
    if kept is not None:
        out, blocks, made_from = kept.paged(pat.route.params.score, size, shape, k_cache.device, block_table.shape)
        blocks.masked_fill_(lengths < blocks * size, 0)  # a row shorter than its kept blocks: a new sequence
        kept_summary.stale(blocks, made_from, block_table, k_cache.shape[1], size)  # blocks on other pages now
    else:
        out, blocks = torch.empty(shape, dtype=torch.float32, device=k_cache.device), seqlens
    launch_summaries(t.launch.module.attnc_paged_summary, t.launch.interpret, k_cache, block_table, seqlens, blocks,
                     out, size, t.capacity, bound=bound, keeps=kept is not None)
    return out, ((blocks, lengths // size, made_from, block_table) if kept is not None else None)


def launch_summaries(kernel, interpret: bool, cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
                     kept: torch.Tensor, out: torch.Tensor, size: int, capacity: int, *, bound: bool = False,
                     keeps: bool = False) -> None:
    """``attnc_paged_summary`` into ``out`` (``[1 | 2, B, Hkv, nblocks, D]`` fp32): each row's blocks of ``size``
    keys of ``cache`` through its block table (the blocks before ``kept[row]`` left as they are where ``keeps``)."""
    rows, kv_heads, head_dim = block_table.shape[0], cache.shape[2], cache.shape[3]
    table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    with interpreting(interpret):
        kernel[(out.shape[3] * rows * kv_heads,)](
            cache, cache.stride(0), cache.stride(2), cache.stride(1), table, table.stride(0), seqlens, kept, out,
            out.stride(0), out.stride(1), out.stride(2), out.stride(3), cache.shape[0], capacity, kv_heads,
            out.shape[3], head_dim,
            PAGE=cache.shape[1], BLOCK=size, CHUNK=min(SUMMARY_CHUNK, pow2(size)), BLOCK_D=pow2(head_dim),
            BOUND=bound, KEEPS=keeps)


def pool_means(kernel, interpret: bool, cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor,
               size: int) -> torch.Tensor:
    """The means of runs of ``size`` keys (or values) of each row of a paged pool, ``[B, Hkv, ceil(capacity /
    size), D]`` fp32 (a combined pattern's ``keys pooled(mean, SIZE)``): a row's last run the mean of its own
    cached keys, as ``combined.pool_mean``; a run past them zeros. Each cached key read once, no copy of the cache."""
    rows, kv_heads, head_dim = block_table.shape[0], cache.shape[2], cache.shape[3]
    capacity = block_table.shape[1] * cache.shape[1]
    out = torch.empty(1, rows, kv_heads, -(-capacity // size), head_dim, dtype=torch.float32, device=cache.device)
    launch_summaries(kernel, interpret, cache, block_table, seqlens, seqlens, out, size, capacity)
    return out[0]


def _scores(pat, q: torch.Tensor, summary: torch.Tensor, row_of=None) -> torch.Tensor:
    """``route_scores.block_scores``'s (``q . mean(k)``, or ``q+ . max(k) + q- . min(k)``) of q ``[X, Hq, n, D]``
    against its row's summaries (``summary`` ``[S, B, Hkv, nblocks, D]``; row ``x`` of q, or ``row_of[x]``), the
    query heads of a K/V head in one product (``row_matmul``): ``[X, Hq, n, nblocks]`` fp32."""
    if pat.route.params.score == "bound":
        return (row_matmul(q.float().clamp(min=0), summary[0].transpose(-1, -2), row_of)
                + row_matmul(q.float().clamp(max=0), summary[1].transpose(-1, -2), row_of))
    return row_matmul(q, summary[0].transpose(-1, -2), row_of)


def row_topk(pat, bound: E.Bound, keys: torch.Tensor) -> int | torch.Tensor:
    """The route's K: an int, or each query's at its row's key count (``[1, 1, queries, 1]`` int64)."""
    expr = but_row_lengths(sympy.sympify(pat.route.params.topk), bound)
    if isinstance(expr, sympy.Integer):
        return int(expr)
    value = E.as_tensor(E.Evaluator(dict.fromkeys(ROW_LENGTHS, keys), {}, set(), None)(expr), torch.int64)
    return value.reshape(1, 1, -1, 1)


def pack_words(chosen: torch.Tensor) -> torch.Tensor:
    """The selection ``[..., nblocks]`` as int32 words of ``WORD`` blocks, bit ``b`` of word ``w`` block
    ``w * WORD + b``."""
    nblocks = chosen.shape[-1]
    words = -(-nblocks // WORD)
    bits = torch.nn.functional.pad(chosen, (0, words * WORD - nblocks)).view(*chosen.shape[:-1], words, WORD)
    weights = torch.bitwise_left_shift(torch.ones(WORD, dtype=torch.int64, device=chosen.device),
                                       torch.arange(WORD, device=chosen.device))
    packed = (bits.to(torch.int64) * weights).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()


def tile_lists(t, chosen: torch.Tensor, row_of, rows: int, kv_heads: int, size: int, nblocks: int) -> dict:
    """Per (row, K/V head): the KV tiles holding a key of a block some query of the row selected for some query
    head of the group, ascending, all PARTIAL; no FULL tile."""
    X, heads = chosen.shape[:2]
    device = chosen.device
    reached = chosen.reshape(X, kv_heads, heads // kv_heads * chosen.shape[2], nblocks).any(2)  # [X, Hkv, nb]
    if row_of is not None:  # each query's row: the row's queries together
        reached = torch.zeros(rows, kv_heads, nblocks, dtype=torch.int32, device=device).index_add_(
            0, row_of, reached.to(torch.int32)) > 0
    first = torch.arange(t.kv_tiles, device=device) * t.kv_tile
    lo, hi = first // size, ((first + t.kv_tile).clamp(max=t.capacity) - 1) // size
    running = torch.nn.functional.pad(reached.to(torch.int32).cumsum(-1), (1, 0))  # blocks selected before each
    return visit_lists(t, (running[..., hi + 1] - running[..., lo]) > 0)


def visit_lists(t, visit: torch.Tensor) -> dict:
    """The lists ``attnc_fwd_paged`` reads of the KV tiles each (row, K/V head) visits (``visit`` bool ``[rows,
    Hkv, kv_tiles]``), ascending, all PARTIAL; no FULL tile."""
    rows, kv_heads = visit.shape[:2]
    device = visit.device
    index = torch.arange(t.kv_tiles, device=device).expand(rows * kv_heads, -1)
    count, entries = compact(index, visit.reshape(rows * kv_heads, -1))
    empty = torch.zeros(rows * kv_heads, dtype=count.dtype, device=device)
    return {"FULL_N": empty, "FULL_I": torch.zeros(rows * kv_heads, 1, dtype=entries.dtype, device=device),
            "PART_N": count.contiguous(), "PART_I": entries.contiguous(), "FULL_STEPS": 1,
            "PART_STEPS": t.kv_tiles.bit_length(), "cls": (kv_heads, 1)}


__all__ = ["applies", "keep", "launch_summaries", "pack_words", "pool_means", "route_inputs", "row_topk", "select", "tile_lists", "visit_lists"]
