"""XAttention's selection (``route topp(P) blocks(B) by antidiagonal(S)``) for a paged batch of prefill rows, made on
the device for every row at once, so the batch is one launch of ``attnc_fwd_paged`` whatever its rows' lengths.

XAttention is a prefill method: a row's queries are all its keys (``refuse_cached_rows``: a row with cached keys
before its queries fails a device assert, which the caller turns into the contiguous call's error). Each row's
selection is ``plan/antidiagonal.py``'s at that row's length, on padded shapes fixed by the table's capacity:

- the queries at their rows' positions and the keys read through each row's block table, zero past the row's length
  (the code's zero padding of a row's last run), cut into runs of S as ``block_mass`` cuts them;
- the stride tiles the mask reaches at each row's length: the capacity's, found once per template and device, cut at
  the row's runs; a row's last run, where it is partial, evaluated again over its positions below the length (a pair
  past the length is no pair of the row);
- the run logits, softmaxed over the reached key runs of each query run and summed per (query block, key block), a
  chunk of query runs at a time; then ``antidiagonal.threshold`` per query block, the blocks ``keep`` forces first.

Each query selects its block's blocks that the mask lets it reach, as bits (``SEL``), and each (row, K/V head) gets
the KV tiles some query of the row selected (``paged_routes.visit_lists`` through its ``tile_lists``). The estimate
reads a gathered copy of each row's keys (the prefill's own), made and dropped per call; nothing is read on the
host.
"""

from __future__ import annotations

import math

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....compiler.codegen.triton.source import but_row_lengths
from ....core import route_kinds
from ....core import symbols as S
from ...plan import antidiagonal
from ...plan.forms.top_k_tokens import device_mask
from .paged_queries import PagedQueries, refuse_cached_rows, row_keys, row_queries
from .paged_routes import pack_words, tile_lists

#: Elements of one chunk of the estimate (rows x heads x query runs x key runs): bounds its memory.
CHUNK_ELEMENTS = 1 << 24


def applies(pat) -> bool:
    """Whether a paged batch of ``pat`` is served in one launch with its antidiagonal selection made here: block and
    stride constant numbers, a mask of positions and the head alone (the same at every row's length), a keep that
    may name the row's length, no input read."""
    route = pat.route
    if route is None or route.kind != route_kinds.TOPP_ANTIDIAGONAL.name or pat.inputs:
        return False
    p = route.params
    if not (isinstance(p.block[0], sympy.Integer) and isinstance(p.stride, sympy.Integer)
            and isinstance(p.topp, sympy.Number)) or int(p.block[0]) % int(p.stride):
        return False
    mask_free = getattr(pat.mask, "free_symbols", set()) <= {S.Q, S.K, S.H}
    keep = p.keep
    keep_free = not isinstance(keep, sympy.Basic) or keep.free_symbols <= {S.Q, S.K, S.H, S.N, S.NK}
    return mask_free and keep_free


def select(t, q, qs: PagedQueries, k_cache, block_table, seqlens, inputs=None) -> tuple[torch.Tensor, dict, None]:
    """``(SEL, lists, None)`` of a paged call of template ``t`` (module docstring), as ``paged_routes.select``
    gives them: ``SEL`` int32 ``[B | 1, Hq, rows, words]`` as q's rows are laid out, the rows' lists."""
    pat, bound = t.launch.pattern, t.launch.bound
    p = pat.route.params
    block, stride, cap = t.route_block, int(p.stride), t.capacity
    rows, heads, kv_heads, device = block_table.shape[0], q.shape[1], k_cache.shape[2], q.device
    nblocks = -(-cap // block)
    refuse_cached_rows(qs, rows)
    with torch.no_grad():
        qrow, krow = _row_vectors(qs, k_cache, block_table, cap, stride, rows, heads)
        reach = _stride_reach(t, qs.lengths, stride, heads, device)  # [rows, Hq | 1, runs, runs]
        mass = _block_mass(qrow, krow, reach, qs.lengths, block, stride, nblocks)  # [rows, Hq, nb, nb]
        # per query: the blocks its mask reaches among its row's keys, and those keep forces
        flat = qs.pos - bound.q_offset
        key_rows = qs.lengths[qs.row]
        keys = torch.arange(cap, device=device)
        allowed = _reached_blocks(t, flat, keys, key_rows, qs.valid, block, nblocks).expand(heads, -1, -1)
        forced = None
        if p.keep is not None:
            forced = device_mask(but_row_lengths(p.keep, bound), pat, bound, flat,
                                 torch.arange(nblocks, device=device) * block, key_rows)[0].expand(heads, -1, -1)
            # the row's own blocks only (keep may name a block past its length: no block of the row)
            own = torch.arange(nblocks, device=device) * block < key_rows.view(-1, 1)
            forced = forced & qs.valid.view(1, -1, 1) & own.unsqueeze(0)
        at = qs.row * nblocks + torch.div(qs.pos, block, rounding_mode="floor")  # each query's (row, query block)
        candidates = _per_query_block(allowed, at, rows * nblocks).view(heads, rows, nblocks, nblocks)
        forced = None if forced is None else _per_query_block(forced, at, rows * nblocks).view(
            heads, rows, nblocks, nblocks).permute(1, 0, 2, 3)
        chosen = antidiagonal.threshold(mass, candidates.permute(1, 0, 2, 3), forced, float(p.topp))
        mine = chosen.permute(1, 0, 2, 3).reshape(heads, rows * nblocks, nblocks)[:, at] & allowed  # [Hq, X, nb]
        X, n = (qs.row.shape[0], 1) if qs.packed else (q.shape[0], q.shape[2])
        per_query = mine.view(heads, X, n, nblocks).permute(1, 0, 2, 3)  # [X, Hq, n, nb]
        words = pack_words(per_query)
        if qs.packed:  # [1, Hq, total, words]: indexed as q's packed rows
            words = words.permute(2, 1, 0, 3).contiguous()
        lists = tile_lists(t, per_query, qs.row if qs.packed else None, rows, kv_heads, block, nblocks)
    return words, lists, None


def _reached_blocks(t, flat: torch.Tensor, keys: torch.Tensor, key_rows: torch.Tensor, valid: torch.Tensor,
                    block: int, nblocks: int) -> torch.Tensor:
    """The blocks each query's mask reaches among its row's keys: bool ``[H | 1, X, nblocks]``, a chunk of queries
    at a time (a query's pairs with every key of the capacity are ``CHUNK_ELEMENTS`` at most at once)."""
    pat, bound = t.launch.pattern, t.launch.bound
    cap, count = keys.shape[0], flat.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, nblocks * block * bound.heads))
    parts = []
    for first in range(0, count, step):
        part = slice(first, min(count, first + step))
        reached = (device_mask(t.mask, pat, bound, flat[part], keys, key_rows[part])[0]
                   & (keys < key_rows[part].view(-1, 1)) & valid[part].view(-1, 1))  # [H | 1, P, cap]
        reached = torch.nn.functional.pad(reached, (0, nblocks * block - cap))
        parts.append(reached.view(*reached.shape[:2], nblocks, block).any(-1))
    return torch.cat(parts, dim=1)


def _row_vectors(qs: PagedQueries, k_cache, block_table, cap: int, stride: int, rows: int, heads: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's query runs ``[rows, Hq, runs, S * D]`` (offsets reversed: the antidiagonal) and key runs ``[rows,
    Hkv, runs, S * D]``, zero past the row's length; fp32 (fp64 for fp64 queries)."""
    d, kv_heads = qs.flat.shape[-1], k_cache.shape[2]
    dtype = torch.float64 if qs.flat.dtype == torch.float64 else torch.float32
    runs = -(-cap // stride)
    span = runs * stride
    qrow = row_queries(qs, rows, span, dtype)
    qr = qrow.reshape(rows, heads, runs, stride, d).flip(3).reshape(rows, heads, runs, stride * d)
    kr = row_keys(k_cache, block_table, qs.lengths, cap, span, dtype).reshape(rows, kv_heads, runs, stride * d)
    return qr, kr


def _stride_reach(t, lengths: torch.Tensor, stride: int, heads: int, device) -> torch.Tensor:
    """Whether the mask allows some pair of each stride tile (query run i, key run j) among each row's positions
    below its length: bool ``[rows, Hq | 1, runs, runs]``."""
    cap = t.capacity
    runs = -(-cap // stride)
    key = ("antidiagonal stride tiles", stride, torch.device(device))
    whole = t.tables.get(key)
    if whole is None:  # the capacity's: the mask names no length, so a row's full runs reach as these do
        whole = t.tables[key] = _pooled(t, torch.arange(cap, device=device), stride, runs).squeeze(0)
    r = torch.arange(runs, device=device)
    row_runs = -torch.div(-lengths, stride, rounding_mode="floor")  # [rows]
    inside = (r.view(1, -1, 1) < row_runs.view(-1, 1, 1)) & (r.view(1, 1, -1) < row_runs.view(-1, 1, 1))
    reach = whole.unsqueeze(0) & inside.unsqueeze(1)  # [rows, H|1, runs, runs]
    # a row's last run, where it is partial: its pairs below the length only
    last = torch.div(lengths - 1, stride, rounding_mode="floor").clamp(min=0)  # [rows]
    partial = (lengths % stride != 0).view(-1, 1, 1)
    offsets = torch.arange(stride, device=device)
    last_q = last.view(-1, 1) * stride + offsets  # [rows, S]: the positions of the row's last run
    held = last_q < lengths.view(-1, 1)
    keys = torch.arange(runs * stride, device=device)
    every = keys.expand(len(lengths), -1)
    every_held = every < lengths.view(-1, 1)
    q_side = _pair_mask(t, last_q, every, held, every_held)  # [rows, H | 1, S, span]: the last run's queries
    row_of_last = q_side.any(2).view(*q_side.shape[:2], runs, stride).any(-1)  # [rows, H | 1, runs]: reach[last, j]
    k_side = _pair_mask(t, every, last_q, every_held, held)  # [rows, H | 1, span, S]: the last run's keys
    col_of_last = k_side.any(3).view(*k_side.shape[:2], runs, stride).any(-1)  # [rows, H | 1, runs]: reach[i, last]
    at_row = (r.view(1, 1, -1, 1) == last.view(-1, 1, 1, 1)) & partial.unsqueeze(1)  # [rows, 1, runs, 1]
    at_col = (r.view(1, 1, 1, -1) == last.view(-1, 1, 1, 1)) & partial.unsqueeze(1)  # [rows, 1, 1, runs]
    reach = torch.where(at_row, row_of_last.unsqueeze(2), reach)
    reach = torch.where(at_col, col_of_last.unsqueeze(3), reach)
    return reach & inside.unsqueeze(1)


def _pair_mask(t, q_pos: torch.Tensor, k_pos: torch.Tensor, q_held: torch.Tensor, k_held: torch.Tensor
               ) -> torch.Tensor:
    """The mask at each row's query positions ``q_pos`` ``[rows, Q]`` and key positions ``k_pos`` ``[rows, K]``, the
    pairs of positions held by both (``q_held``, ``k_held``): bool ``[rows, H | 1, Q, K]``."""
    pat, bound = t.launch.pattern, t.launch.bound
    rows = q_pos.shape[0]
    heads = torch.arange(bound.heads, device=q_pos.device).view(1, -1, 1, 1)
    env = E.token_env(pat, bound, (q_pos - bound.q_offset).view(rows, 1, -1, 1), k_pos.view(rows, 1, 1, -1), heads)
    value = E.as_tensor(E.Evaluator(env, {}, set(), None)(t.mask), torch.bool)
    value = torch.zeros((), dtype=torch.bool, device=q_pos.device) | value
    value = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
    return value & q_held.view(rows, 1, -1, 1) & k_held.view(rows, 1, 1, -1)


def _pooled(t, positions: torch.Tensor, stride: int, runs: int) -> torch.Tensor:
    """The capacity's stride tiles the mask reaches: bool ``[1, H | 1, runs, runs]``, a chunk of query runs at a
    time (made once per template and device)."""
    bound = t.launch.bound
    span = runs * stride
    keys = torch.nn.functional.pad(positions, (0, span - len(positions)), value=-1)
    held_k = keys >= 0
    step = max(1, CHUNK_ELEMENTS // max(1, stride * span * bound.heads))
    parts = []
    for first in range(0, runs, step):
        q_pos = torch.arange(first * stride, min(runs, first + step) * stride, device=positions.device)
        held_q = q_pos < len(positions)
        pairs = _pair_mask(t, q_pos.view(1, -1), keys.clamp(min=0).view(1, -1), held_q.view(1, -1), held_k.view(1, -1))
        parts.append(pairs.view(1, pairs.shape[1], -1, stride, runs, stride).any(-1).any(3))
    return torch.cat(parts, dim=2)


def _block_mass(qr: torch.Tensor, kr: torch.Tensor, reach: torch.Tensor, lengths, block: int, stride: int,
                nblocks: int) -> torch.Tensor:
    """``antidiagonal.block_mass`` of every row at once: ``[rows, Hq, nblocks, nblocks]``."""
    rows, heads, runs, width = qr.shape
    d = width // stride
    kr = kr.repeat_interleave(heads // kr.shape[1], dim=1)
    per_block = block // stride
    col_block = torch.arange(runs, device=qr.device) // per_block
    mass = torch.zeros(rows, heads, nblocks, nblocks, dtype=qr.dtype, device=qr.device)
    scale = 1.0 / math.sqrt(d) / stride
    step = max(1, CHUNK_ELEMENTS // max(1, rows * heads * runs))
    for first in range(0, runs, step):
        part = slice(first, min(runs, first + step))
        logits = (qr[:, :, part] @ kr.transpose(-1, -2)) * scale  # [rows, Hq, r, runs]
        logits = logits.masked_fill(~reach[:, :, part], -torch.inf)
        prob = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a run the mask never reaches: nothing
        summed = torch.zeros(rows, heads, prob.shape[2], nblocks, dtype=qr.dtype, device=qr.device)
        summed.index_add_(-1, col_block, prob)
        row_block = torch.arange(part.start, part.stop, device=qr.device) // per_block
        mass.index_add_(2, row_block, summed)
    return mass


def _per_query_block(x: torch.Tensor, at: torch.Tensor, slots: int) -> torch.Tensor:
    """``x`` ``[Hq, X, nb]`` reduced with ``any`` over the queries of each (row, query block) ``at``: ``[Hq, slots,
    nb]``."""
    out = torch.zeros(x.shape[0], slots, x.shape[-1], dtype=torch.int32, device=x.device)
    return out.index_add_(1, at, x.to(torch.int32)) > 0


__all__ = ["applies", "select"]
