"""AnchorAttention's stripes (``route stripes(THETA) blocks(B) groups(G) keep REGION``) for a paged batch of prefill
rows, chosen on the device for every row at once, so the batch is one launch of ``attnc_fwd_paged`` whatever its
rows' lengths.

A prefill method: a row's queries are all its keys (``paged_queries.refuse_cached_rows``). Each row's selection is
``plan/stripes.py``'s at its length, on shapes fixed by the table's capacity, from each row's queries at their
positions and its keys read through its block table (``row_queries``, ``row_keys``: zero past its length):

1. each query's anchor, its largest ``q . k / sqrt(dk)`` over the keys its mask allows and ``keep`` holds, a chunk of
   queries at a time;
2. each block of B queries' mean query (zero past the row's length, divided by the queries it holds, as the
   contiguous rule pads its last block) scores every key column; a column passes where that score plus THETA is at
   least the block's mean anchor;
3. a group's columns are those any of its blocks passed; a query keeps the keys its mask allows where ``keep``
   holds or its group's column passed.

The selection goes to the kernel as bits over single keys (``SEL``), and each (row, K/V head) gets the KV tiles some
query of the row kept a key of. Nothing is read on the host.
"""

from __future__ import annotations

import sympy
import torch

from ....compiler.codegen.triton.source import but_row_lengths
from ....core import route_kinds
from ....core import symbols as S
from ...plan import stripes
from ...plan.forms.top_k_tokens import device_mask
from .paged_queries import SCORE_CHUNK, PagedQueries, refuse_cached_rows, row_keys, row_queries
from .paged_routes import pack_words, tile_lists


def applies(pat) -> bool:
    """Whether a paged batch of ``pat`` is served in one launch with its stripes chosen here: a constant margin,
    query block and group, a mask of positions and the head alone, a keep that may name the row's length, no input
    read."""
    route = pat.route
    if route is None or route.kind != route_kinds.STRIPES.name or pat.inputs:
        return False
    p = route.params
    if not (isinstance(p.theta, sympy.Number) and isinstance(p.query_block, sympy.Integer)
            and isinstance(p.group, sympy.Integer)):
        return False
    keep = p.keep
    keep_free = not isinstance(keep, sympy.Basic) or keep.free_symbols <= {S.Q, S.K, S.H, S.N, S.NK}
    return getattr(pat.mask, "free_symbols", set()) <= {S.Q, S.K, S.H} and keep_free


def select(t, q, qs: PagedQueries, k_cache, block_table, seqlens, inputs=None) -> tuple[torch.Tensor, dict, None]:
    """``(SEL, lists, None)`` of a paged call of template ``t`` (module docstring), as ``paged_routes.select``
    gives them, over single keys."""
    pat, bound, cap = t.launch.pattern, t.launch.bound, t.capacity
    p = pat.route.params
    theta, block, group = float(p.theta), int(p.query_block), int(p.group)
    rows, heads, kv_heads, device = block_table.shape[0], q.shape[1], k_cache.shape[2], q.device
    refuse_cached_rows(qs, rows)
    with torch.no_grad():
        dtype = stripes.score_dtype(qs.flat, k_cache)
        qrow = row_queries(qs, rows, cap, dtype)  # [rows, Hq, cap, D]
        krow = row_keys(k_cache, block_table, qs.lengths, cap, cap, dtype)  # [rows, Hkv, cap, D]
        keys = torch.arange(cap, device=device)
        keep = None if p.keep is None else but_row_lengths(p.keep, bound)  # a length: the row's
        at = qs.pos - bound.q_offset  # the template's bound is a block of its last rows (token_env adds it)
        key_rows = qs.lengths[qs.row]

        def mask_of(part):  # the mask and keep of queries ``part``: [P, Hq | 1, cap]
            allowed = (device_mask(t.mask, pat, bound, at[part], keys, key_rows[part])[0].transpose(0, 1)
                       & (keys < key_rows[part].view(-1, 1, 1)) & qs.valid[part].view(-1, 1, 1))
            kept = (torch.ones((), dtype=torch.bool, device=device) if keep is None
                    else device_mask(keep, pat, bound, at[part], keys, key_rows[part])[0].transpose(0, 1))
            return allowed, kept

        count = qs.row.shape[0]
        # a chunk's scores and its queries' copies of their rows' keys stay within SCORE_CHUNK elements
        step = max(1, SCORE_CHUNK // max(1, cap * max(heads, kv_heads * qs.flat.shape[-1])))
        anchor = torch.full((count, heads), float("-inf"), dtype=dtype, device=device)
        for start in range(0, count, step):  # 1. each query's anchor over its region
            part = slice(start, min(count, start + step))
            score = _query_scores(qs.flat[part], krow, qs.row[part], dtype)  # [P, Hq, cap]
            allowed, kept = mask_of(part)
            anchor[part] = score.masked_fill(~(allowed & kept), float("-inf")).amax(-1)
        stripe = _columns(qrow, krow, anchor, qs, theta, block, group, cap, dtype)  # [rows, Hq, groups, cap]
        chosen = torch.zeros(count, heads, cap, dtype=torch.bool, device=device)
        for start in range(0, count, step):  # 3. what each query keeps
            part = slice(start, min(count, start + step))
            allowed, kept = mask_of(part)
            own = stripe[qs.row[part], :, torch.div(qs.pos[part], group, rounding_mode="floor")]  # [P, Hq, cap]
            chosen[part] = allowed & (kept | own)
        X, n = (count, 1) if qs.packed else (q.shape[0], q.shape[2])
        per_query = chosen.view(X, n, heads, cap).transpose(1, 2)  # [X, Hq, n, cap]
        words = pack_words(per_query)
        if qs.packed:  # [1, Hq, total, words]: indexed as q's packed rows
            words = words.permute(2, 1, 0, 3).contiguous()
        lists = tile_lists(t, per_query, qs.row if qs.packed else None, rows, kv_heads, 1, cap)
    return words, lists, None


def _query_scores(qp: torch.Tensor, krow: torch.Tensor, row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q . k / sqrt(dk)`` of queries ``qp`` ``[P, Hq, D]`` against every key of their rows (``krow`` ``[rows, Hkv,
    cap, D]``): ``[P, Hq, cap]`` (``stripes.scores``, each query head against its K/V head)."""
    return stripes.scores(qp.unsqueeze(2), krow[row], dtype).squeeze(2)


def _columns(qrow, krow, anchor, qs: PagedQueries, theta: float, block: int, group: int, cap: int, dtype
             ) -> torch.Tensor:
    """Steps 2 and 3 of every row: the columns each group keeps, bool ``[rows, Hq, groups, cap]``."""
    rows, heads, _, d = qrow.shape
    nb, steps, ng = -(-cap // block), group // block, -(-cap // group)
    lengths = qs.lengths
    count = (lengths.view(-1, 1) - torch.arange(nb, device=qrow.device) * block).clamp(0, block).to(dtype)
    padded = torch.nn.functional.pad(qrow, (0, 0, 0, nb * block - cap))
    q_mean = padded.view(rows, heads, nb, block, d).sum(3) / count.clamp(min=1)[:, None, :, None]
    # each row's anchors at their positions (-inf elsewhere): mean over the finite ones of each block
    slots = torch.where(qs.valid, qs.row * cap + qs.pos, rows * cap)
    placed = torch.full((rows * cap + 1, heads), float("-inf"), dtype=dtype, device=qrow.device)
    placed = placed.index_copy_(0, slots, anchor)[:-1].view(rows, cap, heads).transpose(1, 2)
    placed = torch.nn.functional.pad(placed, (0, nb * block - cap), value=float("-inf")).view(rows, heads, nb, block)
    finite = placed.isfinite()
    present = finite.sum(-1)
    total = torch.where(finite, placed, 0).sum(-1)
    anchor_mean = torch.where(present > 0, total / present.clamp(min=1), float("inf"))  # [rows, Hq, nb]
    q_mean = torch.nn.functional.pad(q_mean, (0, 0, 0, ng * steps - nb))  # whole groups: a padded block passes
    anchor_mean = torch.nn.functional.pad(anchor_mean, (0, ng * steps - nb), value=float("inf"))  # no column
    out = torch.empty(rows, heads, ng, cap, dtype=torch.bool, device=qrow.device)
    # a chunk of groups at a time: its blocks' scores against every key stay within SCORE_CHUNK elements
    chunk = max(1, SCORE_CHUNK // max(1, rows * heads * steps * cap))
    for first in range(0, ng, chunk):
        part = slice(first * steps, min(ng, first + chunk) * steps)
        passed = stripes.scores(q_mean[:, :, part], krow, dtype) + theta >= anchor_mean[:, :, part, None]
        out[:, :, first:first + chunk] = passed.view(rows, heads, -1, steps, cap).any(3)
    return out


__all__ = ["applies", "select"]
