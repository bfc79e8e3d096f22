"""Top-p block selection by antidiagonal scoring (XAttention): the rule of
``route topp(P) blocks(SIZE) by antidiagonal(STRIDE) [keep EXPR]``.

As mit-han-lab/x-attention's ``xattn_estimate`` and ``find_blocks_chunked`` (torch path, commit
e37988770b9d1bebd489eba011d615f35587ba08) compute it, per batch, query head and query block:

- q and k (zero-padded to a multiple of S = STRIDE tokens) are cut into runs of S tokens; run i of
  the queries becomes the vector ``concat_s q[i S + S - 1 - s]`` (offsets reversed), run j of the
  keys ``concat_s k[j S + s]``, so their dot product sums one antidiagonal of the S x S tile of
  ``q k^T``. With GQA a query head reads its KV head's keys.
- Those dot products, times ``1 / sqrt(d) / S`` (d the head dimension), are softmaxed over the
  key runs j of each query run i, among the runs the mask reaches: tile (i, j) takes part where the
  pattern's mask allows some (query, key) pair of it (for ``causal`` that is ``j <= i``, the code's
  mask at this level). A run with no such tile contributes nothing.
- The mass of (query block, key block) is the sum of those probabilities over the query runs of
  the one and the key runs of the other (SIZE / S runs a block; the last block may hold fewer).
- Threshold: ``required = P * total`` (the row's total mass over every key block). The blocks
  ``keep`` forces (with q at some query of the block and k the block's first key; the code's causal
  path forces block 0 and the diagonal block) are taken first and their mass counted; then the
  others the mask reaches, by mass, descending (ties to the lower block index), each taken while
  the mass taken before it is below ``required``: the fewest blocks reaching P of the total, the
  block that crosses it included.

The scores are fp32 (fp64 for fp64 inputs), the threshold's sums fp64 (as the code's), and nothing
here is differentiated. Every query of a block shares its block's selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.route_blocks import block_ids, route_sizes, route_stride
from ...core import ir
from ...core.errors import SpecError

#: Elements of one chunk of the estimate (query runs x key runs x batch x heads): bounds its memory.
CHUNK_ELEMENTS = 1 << 24


def stride_tiles(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None, batch: int, stride: int,
                 rows: range) -> torch.Tensor:
    """Whether the mask allows some pair of each stride tile (query run i in ``rows``, every key
    run j): bool ``[B | 1, Hq, len(rows), ceil(N / stride)]``."""
    n = bound.n
    runs = -(-n // stride)
    q_index = torch.arange(rows.start * stride, min(rows.stop * stride, n))
    mask = E.mask_tensor(pat, bound, inputs, batch=batch, q_index=q_index)  # [b, H, len, N]
    heads = mask.shape[1]
    if mask.stride(1) == 0:  # the same for every head (a broadcast view): pooled once
        mask = mask[:, :1]
    pad_q = len(rows) * stride - len(q_index)
    pad_k = runs * stride - n
    mask = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q), value=False)
    b, h = mask.shape[:2]
    pooled = mask.view(b, h, len(rows), stride, runs, stride).any(-1).any(3)
    return pooled.expand(b, heads, len(rows), runs)


def classified_stride_tiles(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None, stride: int
                            ) -> torch.Tensor | None:
    """``stride_tiles`` of every query run at once from the tile classifier (tiles of ``stride`` tokens):
    bool ``[1, Hq, runs, runs]``, or None where the classifier cannot say it exactly (batched inputs,
    or PARTIAL pairs it did not prove to hold an allowed pair). The classifier bounds the mask per
    tile pair and evaluates only the pairs its bounds leave open: no n x n mask."""
    from ...compiler.analysis.tiles import classify_tiles

    if any(t.dim() > len(pat.input(name).dims) for name, t in (inputs or {}).items()):
        return None
    sched = classify_tiles(pat, bound, (stride,), (stride,), inputs=inputs or None)
    if not sched.exact:
        return None
    runs = -(-bound.n // stride)
    h, qi, ki, _ = sched.pairs()
    out = torch.zeros(sched.heads_stored, runs, runs, dtype=torch.bool)
    out[h, qi, ki] = True
    return out[None].expand(1, bound.heads, runs, runs)


def block_mass(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None,
               block: int, stride: int, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """The antidiagonal estimate's attention mass per (query block, key block):
    ``[B, Hq, blocks, blocks]`` in fp32 (fp64 for fp64 inputs), on q's device. ``tiles``: the stride tiles
    the mask reaches (``classified_stride_tiles``' ``[1, Hq, runs, runs]``) where the caller keeps them on
    q's device (a mask of no input: the same at every call), else found here."""
    B, Hq, n, d = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    runs = -(-n // stride)
    per_block = block // stride
    nblocks = -(-n // block)
    pad = runs * stride - n
    qr = torch.nn.functional.pad(q.to(dtype), (0, 0, 0, pad)).view(B, Hq, runs, stride, d)
    qr = qr.flip(3).reshape(B, Hq, runs, stride * d)  # offsets reversed: the antidiagonal
    kr = torch.nn.functional.pad(k.to(dtype), (0, 0, 0, pad)).reshape(B, k.shape[1], runs, stride * d)
    kr = kr.repeat_interleave(Hq // k.shape[1], dim=1)
    col_block = torch.arange(runs, device=q.device) // per_block
    mass = torch.zeros(B, Hq, nblocks, nblocks, dtype=dtype, device=q.device)
    # query blocks a chunk: its logits (runs x runs a block) and its mask (block x n tokens a block)
    classified = tiles if tiles is not None else classified_stride_tiles(pat, bound, inputs, stride)
    # (the dense pooling holds block x n mask entries a block; the classified tiles nothing more)
    step = max(1, CHUNK_ELEMENTS // (B * Hq * max(runs * per_block, block * n if classified is None else 0)))
    scale = 1.0 / math.sqrt(d) / stride
    for first in range(0, nblocks, step):
        rows = range(first * per_block, min((first + step) * per_block, runs))
        logits = (qr[:, :, rows.start:rows.stop] @ kr.transpose(-1, -2)) * scale  # [B, Hq, r, runs]
        reached = (stride_tiles(pat, bound, inputs, B, stride, rows) if classified is None
                   else classified[:, :, rows.start:rows.stop])
        logits = logits.masked_fill(~(reached if reached.device == logits.device else reached.to(logits.device)),
                                    -torch.inf)
        prob = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a run the mask never reaches: nothing
        summed = torch.zeros(B, Hq, len(rows), nblocks, dtype=dtype, device=prob.device)
        summed.index_add_(-1, col_block, prob)
        row_block = torch.arange(rows.start, rows.stop, device=prob.device) // per_block
        mass.index_add_(2, row_block, summed)
    return mass


def threshold(mass: torch.Tensor, candidates: torch.Tensor, forced: torch.Tensor | None, p: float) -> torch.Tensor:
    """The top-p rule on ``mass [..., blocks]`` (fp64 sums, as the code's), literally as the code applies it.

    Every block is ranked: the ``forced`` ones (None: no ``keep``) first, then the rest by mass,
    descending, ties to the lower index. The masses counted before each ranked place are listed:
    without ``keep`` (the code's non-causal path) the ranked blocks' masses; with ``keep`` (its causal
    path) ``0``, the forced blocks' total, then the others' masses: two places for the forced blocks,
    whatever their number. The block at ranked place m is taken while the sum of the first m entries
    is below ``p`` times the row's total; forced blocks always are; and block 0 always is (the code
    writes index 0 for every place it does not take). Of those, the ``candidates`` (blocks the mask
    lets the query block reach) are selected."""
    mass = mass.to(torch.float64)
    required = mass.sum(-1, keepdim=True) * p
    if forced is None:
        forced = torch.zeros_like(candidates)
        lead = []
    else:
        lead = [torch.zeros_like(required), torch.where(forced, mass, 0.0).sum(-1, keepdim=True)]
    rank_key = torch.where(forced, torch.inf, mass)  # forced first (their order among them does not matter)
    order = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices
    ranked = torch.where(forced, 0.0, mass).gather(-1, order)  # the others' masses, in ranked order
    nforced = forced.sum(-1, keepdim=True)
    place = nforced + torch.arange(ranked.shape[-1], device=mass.device)  # the others follow the forced places
    others = torch.where(place < ranked.shape[-1], ranked.gather(-1, place.clamp(max=ranked.shape[-1] - 1)), 0.0)
    entries = torch.cat([*lead, others], dim=-1)[..., : ranked.shape[-1]]
    before = torch.cat([torch.zeros_like(required), entries[..., :-1]], dim=-1).cumsum(-1)
    take = torch.zeros_like(candidates).scatter(-1, order, before < required)
    take[..., 0] = True
    return (take | forced) & candidates


def per_block(x: torch.Tensor, block: int, nblocks: int) -> torch.Tensor:
    """``x [b, H, N, nblocks]`` reduced with ``any`` over the queries of each query block."""
    pad = nblocks * block - x.shape[2]
    x = torch.nn.functional.pad(x, (0, 0, 0, pad), value=False)
    return x.view(*x.shape[:2], nblocks, block, x.shape[-1]).any(3)


def select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None,
           allowed: Callable, keep: Callable) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The selection of this call: ``(selected [B, Hq, Nq, nblocks], key_block, nblocks)``.

    ``allowed(key_block, nblocks, dtype)`` says per query whether the mask allows some key of each block
    (``runtime.plan.routing``); ``keep(key_block, nblocks)`` is the route's ``keep`` per query and block
    (or None). A query selects its block's blocks that the mask lets it reach."""
    refuse_query_offset(pat, bound)
    (block,), _ = route_sizes(pat, bound)
    stride = route_stride(pat, bound)
    key_block, nblocks = block_ids(pat.keys, (block,), bound, k.shape[2])
    with torch.no_grad():
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        reachable = allowed(key_block, nblocks, dtype).cpu()  # [B, Hq, Nq, nb]
        candidates = per_block(reachable, block, nblocks)
        forced = keep(key_block, nblocks)
        if forced is not None:
            forced = per_block(torch.broadcast_to(forced.cpu(), reachable.shape), block, nblocks)
        mass = block_mass(pat, bound, q.detach(), k.detach(), inputs, block, stride).cpu()
        chosen = threshold(mass, candidates, forced, float(pat.route.params.topp))  # [B, Hq, nb, nb]
        return chosen[:, :, key_block[: q.shape[2]]] & reachable, key_block, nblocks


def refuse_query_offset(pat: ir.PatternIR, bound: E.Bound) -> None:
    """A query block's estimate reads every query of the block: queries after a KV cache are refused."""
    if bound.q_offset:
        raise SpecError(f"'{pat.name}' selects blocks by antidiagonal scoring over every query of a block: "
                        "queries after a KV cache (nk > n) are not supported", where="argument k",
                        hint="call with all the queries (nk == n)")
