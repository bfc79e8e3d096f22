"""A paged call's queries as the device-side work before its launch sees them (the seam: where each query stands),
made once per call and shared by the route's selection (``paged_routes``, ``paged_tokens``) and the inputs made from
q and k (``paged_clusters``, ``paged_tables``, ``paged_flags``): each query's row, position, validity and its row's
query count, q flattened to ``[queries, Hq, D]``, and the way back to q's layout of rows."""

from __future__ import annotations

import dataclasses

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....core import symbols as S
from ... import scale_clause
from ...checks import PREFILL_ROWS_FAILED, SCORE_SCALE_FAILED


@dataclasses.dataclass(frozen=True)
class PagedQueries:
    """The queries of one paged call: ``[X]`` tensors in q's order of rows (``X`` = B x n, or a packed call's
    total). A query that is not valid (a packed call's past its rows' queries, a serving loop's padding; one before
    its row's first key) stands at position 0, so that whatever is indexed by it stays in range (``valid`` drops
    what it selects)."""

    row: torch.Tensor  # int64: its row of the block table
    pos: torch.Tensor  # int64: its absolute position among its row's keys
    valid: torch.Tensor  # bool
    count: torch.Tensor  # int64: its row's query count
    flat: torch.Tensor  # [X, Hq, D]: q's rows
    lengths: torch.Tensor  # int64 [rows]: each row's keys, clamped to the table's capacity
    q_shape: tuple  # q's shape
    packed: bool

    def as_q(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[X, Hq, ...]`` as q lays its rows out (a view): ``[1, Hq, total, ...]`` packed, else ``[B, Hq, n,
        ...]``."""
        if self.packed:
            return x.transpose(0, 1)[None]
        return x.view(self.q_shape[0], self.q_shape[2], *x.shape[1:]).transpose(1, 2)


def queries_of(q: torch.Tensor, seqlens: torch.Tensor, q_start, q_count, packed: bool, capacity: int
               ) -> PagedQueries:
    """The queries of a paged call of q ``[B, Hq, n, D]`` (each row's n queries, its last n positions) or, packed,
    ``[1, Hq, total, D]`` (row b's ``q_count[b]`` queries from row ``q_start[b]``)."""
    device, rows = q.device, seqlens.shape[0]
    lengths = seqlens.to(torch.int64).clamp(0, capacity)
    if packed:
        at = torch.arange(q.shape[2], device=device)
        row = (torch.searchsorted(q_start.to(torch.int64), at, right=True) - 1).clamp(0, rows - 1)
        count, first = q_count.to(torch.int64)[row], q_start.to(torch.int64)[row]
        pos = lengths[row] - count + at - first
        valid = (at - first < count) & (at >= first) & (pos >= 0)
        flat = q[0].transpose(0, 1)
    else:
        n = q.shape[2]
        row = torch.arange(rows, device=device).repeat_interleave(n)
        pos = lengths[row] - n + torch.arange(n, device=device).repeat(rows)
        valid = pos >= 0
        count = torch.full_like(row, n)
        flat = q.transpose(1, 2).reshape(-1, q.shape[1], q.shape[-1])
    return PagedQueries(row, torch.where(valid, pos, 0), valid, count, flat, lengths, tuple(q.shape), packed)


#: The most elements a chunk of queries scores or gathers at once (a product of queries of their own rows: their
#: rows' matrices).
SCORE_CHUNK = 1 << 24


def row_matmul(a: torch.Tensor, m: torch.Tensor, row_of: torch.Tensor | None = None) -> torch.Tensor:
    """``a[x, h] @ m[row, h // group]`` in fp32: ``a`` ``[X, Hq, n, E]`` (queries by q's rows), ``m`` ``[B, Hkv, E,
    F]`` per row of the block table, ``row`` x itself or ``row_of[x]`` (each query of a packed call its own row's):
    ``[X, Hq, n, F]``, the query heads of a K/V head in one product. Queries of their own rows take their rows'
    matrices ``SCORE_CHUNK`` elements at a time (never a copy per query of the whole)."""
    X, heads, n, width = a.shape
    kv_heads = m.shape[1]
    group = heads // kv_heads
    ag = a.float().reshape(X, kv_heads, group * n, width)
    step = X if row_of is None else max(1, SCORE_CHUNK // max(1, m[0].numel()))
    parts = []
    for start in range(0, X, step):
        part = slice(start, min(X, start + step))
        parts.append(ag[part] @ (m[part] if row_of is None else m[row_of[part]]).float())
    return torch.cat(parts).view(X, heads, n, -1)


#: The sizes a paged row holds of its own (each query's row's), not the template's: its keys, and its queries.
_ROW_SIZES = (S.N, S.NK, S.NQ)


def score_scaled(q: torch.Tensor, qs: PagedQueries, score_scale: sympy.Expr, bound: E.Bound
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, flat)``: q with each query times the pattern's ``scale E`` at its own position, head and row (``n``, ``nk``: its row's
    keys; ``nq``: its row's queries; the other sizes ``bound``'s), as the contiguous call folds it into q
    (``Attention._score_scale``: the product in fp32, fp64 for fp64 q, rounded once to q's dtype): laid out as q, and
    as ``qs.flat`` (what a route scores: the ordinary call's routes read the scaled q).
    A query that is not valid (``PagedQueries``) is left as it is. Made on the device from the call's tensors, so a
    CUDA graph replays it; a scale that is not finite at a valid query fails the device assert that follows
    (``SCORE_SCALE_FAILED``)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[1]
    row_len = qs.lengths[qs.row].view(-1, 1)
    env = {sym: int(v) for sym, v in bound.subs.items() if sym not in _ROW_SIZES}
    env.update({S.Q: qs.pos.view(-1, 1), S.H: torch.arange(heads, device=q.device).view(1, -1),
                S.N: row_len, S.NK: row_len, S.NQ: qs.count.view(-1, 1)})
    value = scale_clause.evaluate(score_scale, env, (qs.row.shape[0], heads), q.device)
    value = torch.where(qs.valid.view(-1, 1), value, 1.0)
    torch._assert_async(torch.isfinite(value).all(), SCORE_SCALE_FAILED)
    scaled = (qs.flat.to(dtype) * value.to(dtype)[..., None]).to(q.dtype)
    return qs.as_q(scaled), scaled


def refuse_cached_rows(qs: PagedQueries, rows: int) -> None:
    """A device assert that every row with queries holds the queries of all its keys (a prefill row): a prefill
    method's selection across a block's queries needs every one of them (``PREFILL_ROWS_FAILED``)."""
    count = torch.zeros(rows, dtype=torch.int64, device=qs.row.device).index_add_(0, qs.row, qs.valid.to(torch.int64))
    first = torch.full((rows,), 2**62, dtype=torch.int64, device=qs.row.device).scatter_reduce(
        0, qs.row, torch.where(qs.valid, qs.pos, 2**62), reduce="amin")
    torch._assert_async(((count == 0) | ((count == qs.lengths) & (first == 0))).all(), PREFILL_ROWS_FAILED)


def row_queries(qs: PagedQueries, rows: int, span: int, dtype: torch.dtype) -> torch.Tensor:
    """Each row's queries at their positions, zero elsewhere: ``[rows, Hq, span, D]`` in ``dtype`` (a prefill
    batch's rows as the contiguous call of each holds them, padded)."""
    heads, d = qs.flat.shape[1:]
    slots = torch.where(qs.valid, qs.row * span + qs.pos, rows * span)  # an invalid query: a slot dropped after
    out = torch.zeros(rows * span + 1, heads, d, dtype=dtype, device=qs.flat.device)
    out.index_copy_(0, slots, qs.flat.to(dtype))
    return out[:-1].view(rows, span, heads, d).permute(0, 2, 1, 3)


def row_keys(k_cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, capacity: int, span: int,
             dtype: torch.dtype) -> torch.Tensor:
    """Each row's keys read through its block table, zero past its length: ``[rows, Hkv, span, D]`` in ``dtype``, a
    transient copy (``-1`` padding reads a page whose keys are dropped here)."""
    rows, kv_heads, d = block_table.shape[0], k_cache.shape[2], k_cache.shape[3]
    keys = k_cache[block_table.clamp(min=0).long()].reshape(rows, -1, kv_heads, d)[:, :capacity].to(dtype)
    held = torch.arange(capacity, device=keys.device) < lengths.view(-1, 1)
    keys = torch.nn.functional.pad(torch.where(held[..., None, None], keys, 0.0), (0, 0, 0, 0, 0, span - capacity))
    return keys.permute(0, 2, 1, 3)


def pow2(x: int) -> int:
    """The least power of two at least ``x`` (1 for 0): a kernel's block of ``x`` elements."""
    return 1 << max(0, x - 1).bit_length()


__all__ = ["PagedQueries", "pow2", "queries_of", "refuse_cached_rows", "row_keys", "row_matmul", "row_queries",
           "score_scaled"]
