"""Summaries of tile schedules too large to list (the seam: sampled Q and KV tiles classified by interval reasoning
and extrapolated, where ``tiles`` lists every pair): ``summarize_tiles`` -> ``TileSummary``, what the cost model and
the simulator read of a huge schedule."""

from __future__ import annotations

import dataclasses

import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from . import evaluate as E
from .interval_numbers import Num
from .intervals import IntervalEvaluator
from .schedule import TileCounts
from .tiles import check_tile, count_allowed, head_classes, mask_inputs

#: Q tiles (and KV tiles) sampled by ``summarize_tiles``.
SUMMARY_ROWS = 256
#: Undecided boxes kept per refinement step of a summary (beyond, they count as PARTIAL).
SUMMARY_BOXES = 1 << 16
#: PARTIAL tile pairs drawn per refinement step (at random, seeded) and counted exactly to estimate a summary's
#: density (64 evenly spaced ones aliased with periodic masks: logsparse's density 10% off at 2^16 tokens).
SUMMARY_PARTIAL_SAMPLE = 256


@dataclasses.dataclass
class TileSummary(TileCounts):
    """What the cost model and the simulator read of a schedule, for tile grids too
    large to list: per-CTA FULL/PARTIAL counts of sampled Q tiles (forward) and KV
    tiles (backward), each standing for ``q_weight`` / ``kv_weight`` tiles, and
    extrapolated totals. Never exact (``exact``/``density_exact`` are False)."""

    q_extents: tuple[int, ...]
    kv_extents: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_heads: int
    num_q_tiles: int
    num_kv_tiles: int
    full_count: torch.Tensor
    partial_count: torch.Tensor
    t_full_count: torch.Tensor
    t_partial_count: torch.Tensor
    kv_weight: float
    allowed_total: float
    #: how many Q tiles each sampled one stands for (``_sampled``)
    q_row_weights: torch.Tensor
    exact: bool = False
    density_exact: bool = False

    @property
    def q_weight(self) -> float:
        """The Q tiles a sampled one stands for on average (the cost model repeats each sampled CTA by it)."""
        return self.num_q_tiles / len(self.q_row_weights)

    def _over_heads(self, sampled: torch.Tensor) -> int:
        total = round(float((sampled.to(torch.float64) * self.q_row_weights).sum()))
        return total * self.num_heads if self.heads_stored == 1 else total

    @property
    def density(self) -> float:
        return float(self.allowed_total) / float(self.total_pairs)

    def describe(self) -> str:
        return (f"TileSummary(q_tile={self.q_tile}, kv_tile={self.kv_tile}, tiles {self.num_q_tiles} x "
                f"{self.num_kv_tiles} x {self.num_heads} heads, estimated from {self.full_count.shape[1]} sampled "
                f"Q tiles: full {self.full}, partial {self.partial}, empty {self.empty})")


def _sampled(count: int, rows: int) -> tuple[list[int], torch.Tensor]:
    """``rows`` tile indices of ``range(count)`` and how many tiles each stands for: the first and last tiles as
    themselves (weight 1: where a pattern's rows most often differ from the rest, its global tokens and sinks),
    each other one at the middle of an equal share of the tiles between them, standing for that share. (Evenly
    spaced samples of equal weight made the first tile stand for count / rows tiles: Longformer's global
    tokens at a million tokens read 17x too dense.)"""
    if count <= rows:
        return list(range(count)), torch.ones(count, dtype=torch.float64)
    inner = count - 2
    edges = [1 + (j * inner) // (rows - 2) for j in range(rows - 1)]  # rows - 2 shares of [1, count - 1)
    mids = [(a + b - 1) // 2 for a, b in zip(edges, edges[1:], strict=False)]
    sizes = [b - a for a, b in zip(edges, edges[1:], strict=False)]
    return [0, *mids, count - 1], torch.tensor([1, *sizes, 1], dtype=torch.float64)


def _line_classes(pat, mask, bound, tensors, head: int, own: list[int], own_tile: int, own_len: int,
                  other_tile: int, other_len: int, role: str):
    """For each of the tiles ``own`` of one side (role "q": Q tiles), how many tiles of the
    other side are FULL and PARTIAL, by interval reasoning over halved ranges of the other
    side (never a list of tile pairs); plus a few PARTIAL pairs (own index, other tile, how many of the step's
    PARTIAL pairs it stands for), drawn from every step's."""
    grid = -(-other_len // other_tile)
    full = torch.zeros(len(own), dtype=torch.int64)
    partial = torch.zeros(len(own), dtype=torch.int64)
    full_tokens = torch.zeros(len(own), dtype=torch.float64)
    witnesses: list[tuple[int, int, float]] = []
    draw = torch.Generator().manual_seed(0)  # the same witnesses at every call
    # boxes: (index into own, first tile, last tile) of the other side
    owner = torch.arange(len(own))
    first = torch.zeros(len(own), dtype=torch.int64)
    last = torch.full((len(own),), grid - 1, dtype=torch.int64)
    own_t = torch.tensor(own, dtype=torch.int64)
    while len(owner):
        env: dict = {sym: int(v) for sym, v in bound.subs.items()}
        env[S.H] = head
        o_lo = (own_t[owner] * own_tile).to(torch.float64)
        o_hi = (torch.clamp((own_t[owner] + 1) * own_tile, max=own_len) - 1).to(torch.float64)
        x_lo = (first * other_tile).to(torch.float64)
        x_hi = (torch.clamp((last + 1) * other_tile, max=other_len) - 1).to(torch.float64)
        mine, other = (S.Q, S.K) if role == "q" else (S.K, S.Q)
        # rows -> absolute positions (a KV cache's queries, a block's queries and keys)
        q_shift, k_shift = bound.q_offset, bound.k_offset
        o_shift, x_shift = (q_shift, k_shift) if role == "q" else (k_shift, q_shift)
        o_lo, o_hi, x_lo, x_hi = o_lo + o_shift, o_hi + o_shift, x_lo + x_shift, x_hi + x_shift
        env[mine], env[other] = Num(o_lo, o_hi), Num(x_lo, x_hi)
        result = IntervalEvaluator(env, tensors).boolean(mask)
        may_t = torch.broadcast_to(result.t, owner.shape)
        may_f = torch.broadcast_to(result.f, owner.shape)
        is_full = may_t & ~may_f
        full.index_add_(0, owner[is_full], (last - first + 1)[is_full])
        full_tokens.index_add_(0, owner[is_full], (x_hi - x_lo + 1)[is_full])
        undecided = may_t & may_f
        single = undecided & (first == last)
        partial.index_add_(0, owner[single], torch.ones(int(single.sum()), dtype=torch.int64))
        found = torch.nonzero(single).flatten()
        if len(found):  # a few of this step's PARTIAL pairs, drawn at random, each standing for its share of them
            picked = found[torch.randperm(len(found), generator=draw)[:SUMMARY_PARTIAL_SAMPLE]]
            share = len(found) / len(picked)
            witnesses += [(int(owner[i]), int(first[i]), share) for i in picked.tolist()]
        split = undecided & (first < last)
        owner, first, last = owner[split], first[split], last[split]
        if len(owner) > SUMMARY_BOXES:  # too fragmented to follow: whole boxes count as PARTIAL
            partial.index_add_(0, owner, last - first + 1)
            break
        mid = (first + last) // 2
        owner = torch.cat([owner, owner])
        first, last = torch.cat([first, mid + 1]), torch.cat([mid, last])
    return full, partial, full_tokens, witnesses


def summarize_tiles(pat: ir.PatternIR, bound: E.Bound, q_tile, kv_tile, inputs: dict | None = None,
                    rows: int = SUMMARY_ROWS) -> TileSummary:
    """A ``TileSummary`` of a ``tokens seq`` pattern whose tile grid is too large to list:
    ``rows`` sampled Q tiles (and KV tiles) classified by interval reasoning, PARTIAL
    pairs' density from a sample counted exactly. Work and memory depend on ``rows``,
    not on the sequence length."""
    if pat.queries.kind != "seq" or pat.keys.kind != "seq":
        raise SpecError("only `tokens seq` patterns are summarised at this size", where="argument sizes")
    q_ext, kv_ext = (bound.n,), (bound.nk,)
    q_tile, kv_tile = check_tile("q_tile", q_tile, q_ext), check_tile("kv_tile", kv_tile, kv_ext)
    mask = E.substitute(pat.mask, bound)
    pat, tensors = mask_inputs(pat, bound, inputs)
    stored = head_classes(pat, bound)
    tq, tk = q_tile[0], kv_tile[0]
    gq, gk = -(-bound.n // tq), -(-bound.nk // tk)
    (q_rows, q_weights), (k_cols, _) = _sampled(gq, rows), _sampled(gk, rows)
    fwd_f, fwd_p, bwd_f, bwd_p = [], [], [], []
    allowed = 0.0
    for h in range(stored):
        full, partial, full_tokens, witnesses = _line_classes(pat, mask, bound, tensors, h, q_rows, tq, bound.n, tk,
                                                              bound.nk, "q")
        tf, tp, _, _ = _line_classes(pat, mask, bound, tensors, h, k_cols, tk, bound.nk, tq, bound.n, "k")
        fwd_f.append(full)
        fwd_p.append(partial)
        bwd_f.append(tf)
        bwd_p.append(tp)
        # allowed pairs of the sampled Q tiles: FULL areas exact, PARTIAL ones at the sampled fraction
        q_tokens = torch.tensor([min(tq, bound.n - r * tq) for r in q_rows], dtype=torch.float64)
        fraction = 0.0
        if witnesses:  # the allowed share of the PARTIAL pairs, each weighed by what it stands for
            qi = torch.tensor([q_rows[w[0]] for w in witnesses])
            ki = torch.tensor([w[1] for w in witnesses])
            weight = torch.tensor([w[2] for w in witnesses], dtype=torch.float64) * q_weights[[w[0] for w in witnesses]]
            counts = count_allowed(pat, bound, tensors, q_ext, kv_ext, q_tile, kv_tile, h, qi, ki)
            area = (tile_token_counts_at(q_ext, q_tile, qi) * tile_token_counts_at(kv_ext, kv_tile, ki)).to(torch.float64)
            fraction = float((weight * counts.to(torch.float64)).sum()) / float((weight * area).sum())
        allowed += float((q_weights * q_tokens * (full_tokens + fraction * partial * tk)).sum())
    factor = bound.heads if stored == 1 else 1
    return TileSummary(q_ext, kv_ext, q_tile, kv_tile, bound.heads, gq, gk, torch.stack(fwd_f), torch.stack(fwd_p),
                       torch.stack(bwd_f), torch.stack(bwd_p), gk / len(k_cols), allowed * factor, q_weights)


def tile_token_counts_at(extents: tuple[int, ...], tile: tuple[int, ...], tiles: torch.Tensor) -> torch.Tensor:
    """Tokens in the given tiles of a 1-D layout (edge tiles smaller)."""
    (L,), (t,) = extents, tile
    return torch.clamp(L - tiles * t, max=t)
