"""A token route's paged batch in one launch (``route topk(K) tokens by ...``: top-k keys per query by ``q @ k``,
by indexer inputs ``QI @ KI``, by DeepSeek's indexer ``sum_j W relu(QI_j . KI)``, or by a score per key): each
query's keys chosen on the device among its own row's cached keys, then ``attnc_fwd_paged`` over the tiles they
fall in.

At every call, with nothing read on the host, a chunk of queries at a time (``SCORE_CHUNK`` scores):

- the queries' scores against every key of their rows: ``q @ k`` by ``attnc_paged_token_scores``, which reads each
  row's keys through its block table (the cache is not copied); the indexer inputs, given over the table's capacity
  as every paged call's inputs are (``frontends.paged_inputs``), read at each query's and key's position and the
  query's row;
- the keys its mask allows among its row's keys (evaluated at its position), those its route keeps, its K at its
  row's length, and the choice (``device_choice.choose``: the host rule, bit for bit, in fixed shapes);
- its selection as bits (``SEL``, a word per 32 keys) and, per (row, K/V head), the KV tiles holding a key some
  query of the row chose for some query head of the group: every tile PARTIAL, none FULL.

A row's step reads its chosen keys' tiles, plus one pass over its keys for the scores (the pass that does not shrink
with the route, as in the reference systems: HiP's and DeepSeek's indexers score every key). The lists and bits
are sized by the table's capacity, so a call's shapes do not depend on any length.
"""

from __future__ import annotations

import torch

from ....compiler.codegen.triton.source import but_row_lengths
from ...kernel_fit import MAX_GRID_YZ
from ...plan.device_choice import choose
from ...plan.forms.top_k_tokens import device_mask
from ...tritonenv import interpreting
from .paged_queries import SCORE_CHUNK, PagedQueries, pow2
from .paged_routes import WORD, pack_words, row_topk, visit_lists

#: Keys a score program reads at once.
TOKEN_CHUNK = 64
#: The most queries one score launch takes (CUDA's limit on a grid's second dimension: ``pool_scores``).
MAX_GRID_Y = MAX_GRID_YZ


def select(t, q, qs: PagedQueries, k_cache, block_table, seqlens, inputs: dict | None
           ) -> tuple[torch.Tensor, dict, None]:
    """``(SEL, lists, None)`` of a paged call of template ``t`` whose pattern routes by tokens (module docstring):
    ``SEL`` int32 ``[B | 1, Hq, rows, words]`` as q's rows are laid out (a view: word stride 1; ``qs``: its queries),
    ``lists`` every (row x K/V head)'s PARTIAL tiles (``paged_routes.visit_lists``)."""
    pat, bound, cap = t.launch.pattern, t.launch.bound, t.capacity
    rows, heads, kv_heads, device = block_table.shape[0], q.shape[1], k_cache.shape[2], q.device
    row, pos, valid, qf = qs.row, qs.pos, qs.valid, qs.flat
    with torch.no_grad():
        count = qf.shape[0]
        keys = torch.arange(cap, device=device)
        at = pos - bound.q_offset  # the template's bound is a block of its last rows (token_env adds it)
        key_rows = qs.lengths[row]
        topk = row_topk(pat, bound, key_rows)
        keep = None if pat.route.keep is None else but_row_lengths(pat.route.keep, bound)  # a length: the row's
        words = torch.zeros(count, heads, -(-cap // WORD), dtype=torch.int32, device=device)
        reached = torch.zeros(rows, kv_heads, t.kv_tiles, dtype=torch.int32, device=device)
        step = min(MAX_GRID_Y, max(1, SCORE_CHUNK // _score_width(pat, heads, cap, inputs)))
        for start in range(0, count, step):
            part = slice(start, min(count, start + step))
            score = _scores(t, qf[part], row[part], pos[part], k_cache, block_table, seqlens, inputs)
            allowed = (device_mask(t.mask, pat, bound, at[part], keys, key_rows[part])
                       & (keys < key_rows[part].view(-1, 1)) & valid[part].view(-1, 1))
            kept = None if keep is None else device_mask(keep, pat, bound, at[part], keys, key_rows[part])
            k_part = topk if isinstance(topk, int) else topk[:, :, part]
            chosen = choose(score.transpose(0, 1)[None], allowed, kept, k_part)[0].transpose(0, 1)  # [P, Hq | 1, cap]
            words[part] = pack_words(chosen)
            reached.index_add_(0, row[part], _tiles(t, chosen, kv_heads).to(torch.int32))
    return qs.as_q(words), visit_lists(t, reached > 0), None


def _score_width(pat, heads: int, cap: int, inputs: dict | None) -> int:
    """The elements one query's scoring holds (its scores against every key, an indexer's per index head)."""
    route = pat.route.params
    if route.score == "indexer":  # [P, J, cap] scores, and a batched KI gathered per query [P, cap, DI]
        qi, ki = inputs[route.indexer[0]], inputs[route.indexer[1]]
        return cap * (qi.shape[-2] + (ki.shape[-1] if ki.dim() == 3 else 0))
    if route.indexer is not None and route.score == "token":  # QI @ KI: a batched KI gathered per query
        return heads * cap * max(1, inputs[route.indexer[1]].shape[-1])
    return heads * cap


def _scores(t, qp, row, pos, k_cache, block_table, seqlens, inputs: dict | None) -> torch.Tensor:
    """The routing scores of queries ``qp`` ``[P, Hq, D]`` (of rows ``row``, at positions ``pos``) against every
    key of their rows' tables: ``[P, Hq | 1, capacity]`` (``route_scores.block_scores``'s for single keys; keys
    past a row's hold anything: its mask drops them)."""
    route, cap = t.launch.pattern.route.params, t.capacity
    if route.indexer is None:
        return pool_scores(t, qp, row, k_cache, block_table, seqlens)
    given = [inputs[name] for name in route.indexer]
    if route.score == "key":  # S [B | 1, heads, nk]: the key's own score for every query of a head
        (s,) = given
        s = s[..., :cap]
        return s[row] if s.dim() == 3 else s[None].expand(len(row), -1, -1)
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in given) else torch.float32
    if route.score == "indexer":  # QI [B | 1?, n, J, DI], KI [nk, DI], W [n, J]: sum_j W relu(QI_j . KI)
        qi, ki, w = given
        qi = (qi[row, pos] if qi.dim() == 4 else qi[pos]).to(dtype)  # [P, J, DI]
        w = (w[row, pos] if w.dim() == 3 else w[pos]).to(dtype)  # [P, J]
        ki = (ki[row, :cap] if ki.dim() == 3 else ki[:cap]).to(dtype)  # [P, cap, DI], or one [cap, DI] for all
        return (torch.relu(qi @ ki.transpose(-1, -2)) * w[..., None]).sum(1, keepdim=True)
    qi, ki = given  # QI [B | 1?, heads, n, R] at the query's position, KI [B | 1?, heads, nk, R]
    qi = (qi[row, :, pos] if qi.dim() == 4 else qi[:, pos].transpose(0, 1)).to(dtype)  # [P, heads, R]
    if ki.dim() == 4:
        return (ki[row, :, :cap].to(dtype) @ qi[..., None])[..., 0]
    return torch.einsum("phr,hkr->phk", qi, ki[:, :cap].to(dtype))


def pool_scores(t, qp, row, k_cache, block_table, seqlens) -> torch.Tensor:
    """``q @ k`` of queries ``qp`` ``[P, Hq, D]`` with every cached key of their rows (``attnc_paged_token_scores``):
    ``[P, Hq, capacity]`` fp32; a launch per ``MAX_GRID_Y`` queries (the grid's second axis)."""
    count, heads, head_dim = qp.shape
    kv_heads = k_cache.shape[2]
    qp = qp if qp.stride(-1) == 1 else qp.contiguous()
    out = torch.empty(count, heads, t.capacity, dtype=torch.float32, device=qp.device)
    table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    group = heads // kv_heads
    kernel = t.launch.module.attnc_paged_token_scores
    row = row.to(torch.int32)
    for start in range(0, count, MAX_GRID_Y):
        part = slice(start, min(count, start + MAX_GRID_Y))
        with interpreting(t.launch.interpret):
            kernel[(-(-t.capacity // TOKEN_CHUNK), part.stop - start, kv_heads)](
                qp[part], qp.stride(0), qp.stride(1), k_cache, k_cache.stride(0), k_cache.stride(2),
                k_cache.stride(1), table, table.stride(0), seqlens, row[part], out[part], out.stride(0),
                out.stride(1), k_cache.shape[0], t.capacity, group, head_dim, PAGE=k_cache.shape[1],
                CHUNK=TOKEN_CHUNK, BLOCK_D=pow2(head_dim), BLOCK_G=pow2(group))
    return out


def _tiles(t, chosen: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The KV tiles ``[P, Hkv, kv_tiles]`` holding a key each query chose for some query head of the K/V group."""
    count, heads, cap = chosen.shape
    pad = torch.nn.functional.pad(chosen, (0, t.kv_tiles * t.kv_tile - cap))
    tiles = pad.view(count, heads, t.kv_tiles, t.kv_tile).any(-1)
    if heads == 1:  # one selection for every head (an indexer's)
        return tiles.expand(count, kv_heads, t.kv_tiles)
    return tiles.view(count, kv_heads, heads // kv_heads, t.kv_tiles).any(2)


__all__ = ["TOKEN_CHUNK", "pool_scores", "select"]
