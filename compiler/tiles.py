"""Tile classification: which (Q tile, KV tile) pairs of a pattern are EMPTY
(no allowed pair), FULL (no masked pair) or PARTIAL.

``classify_tiles`` never looks at every (query, key) pair for the stdlib's
static patterns:

1. Separable masks (a conjunction of terms each on one grid axis, e.g. a
   NATTEN window per axis) are classified per axis exactly and combined:
   a pair is FULL when FULL on every axis, EMPTY when EMPTY on one, and its
   allowed-pair count is the product of the per-axis counts.
2. Everything else goes through sound interval reasoning over tile boxes
   (``compiler.intervals``), hierarchically: a box pair proven FULL or EMPTY
   decides every tile pair inside it; only undecided boxes are split. Affine
   terms (bands, causal) and NATTEN windows have exact interval rules, so the
   KV range of a Q tile comes out in closed form.
3. PARTIAL pairs left by (2) are refined exactly, token by token, where the
   budget allows; beyond it they stay PARTIAL (sound: never a wrong FULL or
   EMPTY) and the density is estimated from sampled queries.

``classify_tiles_dense`` is the brute-force definition used by the tests.
"""

from __future__ import annotations

import math

import sympy
import torch

from ..spec.errors import SpecError
from . import evaluate as E
from . import ir
from . import symbols as S
from .schedule import TileSchedule, tile_grid, tile_tokens

#: Token pairs evaluated at most when refining PARTIAL tiles exactly.
REFINE_BUDGET = 1 << 26
#: Per-axis exact classification is used up to this axis length (L^2 work).
AXIS_EXACT_MAX = 4096
#: Token pairs evaluated per chunk (memory bound of every exact evaluation).
CHUNK = 1 << 22


def layout_extents(layout: ir.Layout, bound: E.Bound, length: int) -> tuple[int, ...]:
    if layout.kind == "seq":
        return (length,)
    return tuple(int(size.subs(bound.subs)) for _, size in layout.axes)


def check_tile(what: str, tile, extents: tuple[int, ...]) -> tuple[int, ...]:
    """A tile shape: one positive int per axis of the layout."""
    if isinstance(tile, int) and not isinstance(tile, bool):
        tile = (tile,)
    if not isinstance(tile, tuple | list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tile):
        raise SpecError(f"expected a tuple of ints, got {tile!r}", where=f"argument {what}")
    if len(tile) != len(extents):
        raise SpecError(f"needs one extent per axis ({len(extents)}), got {len(tile)}", where=f"argument {what}")
    if any(t < 1 for t in tile):
        raise SpecError(f"tile extents must be positive, got {tuple(tile)}", where=f"argument {what}")
    return tuple(min(t, L) for t, L in zip(tile, extents, strict=True))


def head_dependent(pat: ir.PatternIR) -> bool:
    return S.H in pat.mask.free_symbols


def _pair_evaluator(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None, q_flat: torch.Tensor,
                    k_flat: torch.Tensor, head: int) -> E.Evaluator:
    """An evaluator whose q/k symbols are the given flat token tensors (any broadcastable shape)."""
    tensors, batch = E.bind_inputs(pat, bound, inputs)
    if batch is not None:
        raise SpecError("tile classification takes inputs without a batch dimension (classify per batch element)",
                        where="argument inputs")
    env: dict = {sym: int(v) for sym, v in bound.subs.items()}
    env[S.H] = head
    for role, layout, flat in (("q", pat.queries, q_flat), ("k", pat.keys, k_flat)):
        if layout.kind == "seq":
            env[S.Q if role == "q" else S.K] = flat
            continue
        rest = flat
        for axis, size in reversed(layout.axes):
            extent = int(size.subs(bound.subs))
            env[S.coord(role, axis)] = rest % extent
            rest = rest // extent
    return E.Evaluator(env, tensors, set(), None)


def count_allowed(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None, q_extents, kv_extents,
                  q_tile, kv_tile, head: int, q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> torch.Tensor:
    """Exact number of allowed token pairs of each given (Q tile, KV tile) pair, int64 ``[P]``."""
    out = torch.zeros(len(q_tiles), dtype=torch.int64)
    per_pair = math.prod(q_tile) * math.prod(kv_tile)
    step = max(1, CHUNK // per_pair)
    mask = E.substitute(pat.mask, bound)
    for start in range(0, len(q_tiles), step):
        qi, ki = q_tiles[start:start + step], kv_tiles[start:start + step]
        q_flat, q_ok = tile_tokens(q_extents, q_tile, qi)
        k_flat, k_ok = tile_tokens(kv_extents, kv_tile, ki)
        # padded positions are clamped in range; their result is discarded by `valid`
        q_flat = torch.minimum(q_flat, torch.tensor(math.prod(q_extents) - 1))
        k_flat = torch.minimum(k_flat, torch.tensor(math.prod(kv_extents) - 1))
        ev = _pair_evaluator(pat, bound, inputs, q_flat[:, :, None], k_flat[:, None, :], head)
        allowed = E.as_tensor(ev(mask), torch.bool)
        valid = q_ok[:, :, None] & k_ok[:, None, :]
        allowed = torch.broadcast_to(allowed, valid.shape) & valid
        out[start:start + step] = allowed.sum(dim=(1, 2))
    return out


def classify_tiles_dense(pat: ir.PatternIR, bound: E.Bound, q_tile, kv_tile, inputs: dict | None = None) -> TileSchedule:
    """Brute force over every tile pair and token pair: the definition the tests check against."""
    q_ext = layout_extents(pat.queries, bound, bound.n)
    kv_ext = layout_extents(pat.keys, bound, bound.nk)
    q_tile, kv_tile = check_tile("q_tile", q_tile, q_ext), check_tile("kv_tile", kv_tile, kv_ext)
    nq, nk = math.prod(tile_grid(q_ext, q_tile)), math.prod(tile_grid(kv_ext, kv_tile))
    stored = bound.heads if head_dependent(pat) else 1
    qi = torch.arange(nq).repeat_interleave(nk)
    ki = torch.arange(nk).repeat(nq)
    q_tokens = torch.tensor(0)
    heads, qs, ks, fulls, allowed = [], [], [], [], []
    from .schedule import tile_token_counts

    area = tile_token_counts(q_ext, q_tile)[qi] * tile_token_counts(kv_ext, kv_tile)[ki]
    for h in range(stored):
        counts = count_allowed(pat, bound, inputs, q_ext, kv_ext, q_tile, kv_tile, h, qi, ki)
        keep = counts > 0
        heads.append(torch.full((int(keep.sum()),), h, dtype=torch.int64))
        qs.append(qi[keep])
        ks.append(ki[keep])
        fulls.append((counts == area)[keep])
        allowed.append(counts.sum())
    del q_tokens
    return TileSchedule.from_pairs(q_ext, kv_ext, q_tile, kv_tile, bound.heads, stored, torch.cat(heads),
                                   torch.cat(qs), torch.cat(ks), torch.cat(fulls), torch.stack(allowed).to(torch.float64),
                                   exact=True, density_exact=True)


__all__ = ["classify_tiles_dense", "count_allowed", "check_tile", "layout_extents", "head_dependent", "sympy"]
