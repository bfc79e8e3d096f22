"""The decode-step model: what one step of autoregressive decoding must read, and how fast it can be.

A decode step runs ``n`` new queries (1 by default; more for speculative or chunked decoding) after a
KV cache of ``nk`` keys: the pattern is bound with ``bind_sizes(n=n, nk=nk, offset_ok=True)``, so
query row i is token ``nk - n + i``. Decoding is memory bound: each step reads K and V of every key
its queries reach, and the time cannot be below

- the bandwidth bound: bytes / HBM bandwidth, the bytes being K and V of the visited keys for every
  K/V head (with grouped-query attention each K/V head is read once for the query heads sharing it),
  the queries, the outputs and the split-KV partials (below);
- the compute bound: the FLOPs the kernel executes (``4 D`` per query and visited key: scores and
  the weighted sum) at the data sheet's dense tensor-core rate.

What is visited: the keys are cut into KV tiles of ``kv_tile`` tokens and the queries into Q tiles
of up to ``DECODE_Q_TILE`` rows; a Q tile reads every KV tile holding a key one of its queries
attends (``tiles.classify_tiles``, which honours ``Bound.q_offset``; a grid is tiled on its flat
token order, as the runtime tiles queries after a KV cache). A routed pattern's selection depends on
the data: it is modelled as the prefill simulator models it (``route_selection``): each query keeps
``topk`` of the key blocks (or keys) its mask reaches, those ``keep`` forces always, then the nearest
to it; a Q tile reads every KV tile holding a key one of its queries attends, so the keys read are at
least the keys attended, whatever ``kv_tile``.

The split-KV choice (flash decoding): with few queries, ``batch x kv_heads x q_tiles`` programs
cannot fill the SMs, so each program's KV tiles are split over ``splits`` programs whose fp32
partial outputs (and log-sum-exps) are combined afterwards. ``split_kv`` takes the smallest split
count whose modelled makespan is within ``SPLIT_SLACK`` of the best split count's, where a split
holds ``ceil(T / splits)`` of its row's ``T`` KV tiles (at least one: ``splits <= T``), the programs
are placed on the SMs longest first (``cost.makespan``) and every KV tile costs the same. With a
long cache and few programs this fills the SMs: the next larger split count would start a second,
mostly idle, wave; with ``batch x kv_heads`` programs already filling them it keeps one split.

The dense comparison is the same step over all ``nk`` keys, what FlashAttention's or SDPA's decode
reads, modelled the same way (its own split count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ...core import ir
from ...core.errors import SpecError
from ..analysis import evaluate as E
from ..analysis import tiles as T
from .hardware import Hardware
from .model import checked_kv_heads, dtype_bytes, makespan
from .search import check_simulation_size, flat_view, route_schedule
from .simulator import ReportView

#: Query rows per Q tile of a decode step: all of them up to this many (one tile for n = 1).
DECODE_Q_TILE = 64
#: Keys per KV tile of the decode kernel (FlashAttention-2's split-KV kernel takes 64-256 by head dim).
DECODE_KV_TILE = 64
#: Split counts tried at most (each split at least one KV tile as well).
MAX_SPLITS = 256
#: The most rows of one packed tile: the Q tile's rows of every query head sharing a K/V head (``packed_rows``).
#: 64, a Q tile the forward's registers hold at head dims up to 128 (FlashDecoding's and FlashInfer's grouped decode
#: pack a group's heads into 16 to 64 rows).
PACKED_ROWS = 64
#: A larger split count is taken only when its makespan is more than this fraction shorter than the
#: smaller one's: each split writes fp32 partials that a second kernel combines.
SPLIT_SLACK = 0.10
#: Bytes of a partial output element and of a log-sum-exp (fp32).
PARTIAL_BYTES = 4
#: FLOPs per (query, key) pair of a decode step per head dimension: q.k and p.v, a multiply-add each.
FLOPS_PER_PAIR_DIM = 4


# ----------------------------------------------------------------- binding
def decode_bound(
    pat: ir.PatternIR, *, n: int, nk: int | None, heads: int, sizes: dict | None, head_dim: int
) -> E.Bound:
    """The pattern bound for a decode step: ``n`` queries after a KV cache of ``nk`` keys
    (``q_offset = nk - n``). A clean ``SpecError`` for a pattern or sizes no decode step has."""
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(
            f"'{pat.name}' is not one softmax pattern",
            where="argument pattern",
            hint="a recurrence decodes from its state (recurrence_state_bytes); a combined "
            "pattern's branches decode one by one",
        )
    if not pat.self_attention:
        raise SpecError(
            f"'{pat.name}' is a cross attention: its keys do not grow as tokens are decoded",
            where="argument pattern",
            hint="a decode step extends a self-attention's KV cache",
        )
    if nk is None:
        raise SpecError(
            "a decode step needs the KV cache's length",
            where="argument nk",
            hint="pass nk (the keys cached, the new queries' included)",
        )
    n, nk = E.positive_int("n", n), E.positive_int("nk", nk)
    if nk < n:
        raise SpecError(
            f"{nk} keys but {n} queries: the queries are the last n of the nk tokens, so nk >= n",
            where="argument nk",
        )
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes, dk=head_dim, offset_ok=True)
    check_simulation_size(pat, bound)
    return bound


def recurrence_state_bytes(batch: int, heads: int, head_dim: int, state_rows: int = 1) -> int:
    """Bytes a recurrence's decode step reads and writes: its fp32 ``state_rows head_dim x head_dim`` state per
    (batch, head) (Titans: 2, the memory and its momentum), once each way, whatever the length decoded so far."""
    return 2 * batch * heads * state_rows * head_dim * head_dim * PARTIAL_BYTES


# ----------------------------------------------------------------- what the queries reach
@dataclass(frozen=True)
class DecodeVisit:
    """The KV tiles a decode step's Q tiles read, per K/V head class (the union over the query heads
    sharing a K/V head). ``classes`` is 1 when the mask does not depend on the head (one class serves
    every K/V head), else ``kv_heads``."""

    q_tile: int
    kv_tile: int
    #: query rows per Q tile, ``[q_tiles]``
    q_rows: torch.Tensor
    #: KV tiles and keys in them read by each (class, Q tile), ``[classes, q_tiles]``
    tiles: torch.Tensor
    keys: torch.Tensor
    #: distinct keys read per class over its Q tiles, ``[classes]``
    distinct: torch.Tensor
    classes: int
    kv_heads: int

    @property
    def repeat(self) -> int:
        """K/V heads each class stands for."""
        return self.kv_heads // self.classes

    def key_reads(self) -> int:
        """K (and V) rows read per batch element, over every K/V head and Q tile."""
        return int(self.keys.sum()) * self.repeat

    def keys_visited(self) -> float:
        """Distinct keys read per K/V head (mean over K/V heads)."""
        return float(self.distinct.to(torch.float64).mean())

    def pairs(self) -> int:
        """(query row, key) pairs computed per batch element and query head of each K/V head's group
        (every row of a Q tile against every key of its KV tiles), over the K/V heads."""
        return int((self.keys * self.q_rows[None, :]).sum()) * self.repeat


def dense_visit(
    n: int, nk: int, kv_heads: int, kv_tile: int = DECODE_KV_TILE, q_tile: int = DECODE_Q_TILE
) -> DecodeVisit:
    """Every Q tile reading all ``nk`` keys: what a dense decode step reads."""
    rows = _rows(n, q_tile)
    tiles = torch.full((1, len(rows)), -(-nk // kv_tile), dtype=torch.int64)
    return DecodeVisit(
        q_tile, kv_tile, rows, tiles, torch.full_like(tiles, nk), torch.tensor([nk]), 1, kv_heads
    )


def _rows(n: int, q_tile: int) -> torch.Tensor:
    q_tiles = -(-n // q_tile)
    rows = torch.full((q_tiles,), q_tile, dtype=torch.int64)
    rows[-1] = n - q_tile * (q_tiles - 1)
    return rows


def visited_tiles(
    pat: ir.PatternIR,
    bound: E.Bound,
    *,
    kv_heads: int | None = None,
    kv_tile: int = DECODE_KV_TILE,
    q_tile: int = DECODE_Q_TILE,
    inputs: dict | None = None,
) -> DecodeVisit:
    """The KV tiles each Q tile of the step reads, per K/V head class (see the module docstring)."""
    kv_heads = checked_kv_heads(bound.heads, kv_heads)
    kv_tile = E.positive_int("kv_tile", kv_tile)
    q_tile = min(E.positive_int("q_tile", q_tile), bound.n)
    view, vbound = (
        (pat, bound)
        if pat.queries.kind == "seq" and pat.keys.kind == "seq"
        else flat_view(pat, bound)
    )
    sched = T.classify_tiles(view, vbound, (q_tile,), (min(kv_tile, bound.nk),), inputs=inputs)
    if pat.route is not None:  # the tiles holding a key the step attends, at any kv_tile
        sched = route_schedule(pat, bound, sched, inputs)
    h, qi, ki, _ = sched.pairs()
    shared = sched.heads_stored == 1  # one head class: the lists serve every head
    classes = 1 if shared else kv_heads
    g = h if shared else h // (bound.heads // kv_heads)  # query head -> its K/V head
    nq, nkv = sched.num_q_tiles, sched.num_kv_tiles
    # the union over a group's query heads: one read of each KV tile per (K/V head, Q tile)
    owner_tile = torch.unique((g * nq + qi) * nkv + ki)
    owner, tile = owner_tile // nkv, owner_tile % nkv
    tokens = sched.kv_tile_tokens()[tile]
    tiles = torch.bincount(owner, minlength=classes * nq).view(classes, nq)
    keys = torch.bincount(owner, weights=tokens.to(torch.float64), minlength=classes * nq).view(
        classes, nq
    )
    class_tile = torch.unique((owner // nq) * nkv + tile)
    distinct = torch.bincount(
        class_tile // nkv,
        weights=sched.kv_tile_tokens()[class_tile % nkv].to(torch.float64),
        minlength=classes,
    )
    return DecodeVisit(
        q_tile,
        sched.kv_tile[0],
        sched.q_tile_tokens(),
        tiles,
        keys.round().to(torch.int64),
        distinct.round().to(torch.int64),
        classes,
        kv_heads,
    )


# ----------------------------------------------------------------- split-KV
@dataclass(frozen=True)
class SplitChoice:
    """The split-KV choice on one GPU: ``splits`` programs per (batch, K/V head, Q tile), ``programs``
    in all, ``waves`` of the SMs, the makespan in KV tiles of the busiest SM, and ``fill``: the
    KV tiles read over (SMs x makespan), the share of SM time the launch keeps busy."""

    splits: int
    programs: int
    waves: int
    makespan_tiles: float
    fill: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def packed_rows(group: int, q_tile: int) -> int | None:
    """The BLOCK_M of a forward whose program takes one K/V head and packs the Q tile's ``q_tile`` rows of each of
    its ``group`` query heads into one tile (``attnc_fwd_grouped``: each K/V tile read once per group, as this
    model counts the bytes), or None where it does not apply: no group (one query head per K/V head), or more rows
    than ``PACKED_ROWS`` (a prefill's Q tiles fill their tile with one head's rows already)."""
    rows = group * q_tile
    if group < 2 or rows > PACKED_ROWS:
        return None
    return max(16, 1 << (rows - 1).bit_length())


def split_makespan(row_tiles: list[int], repeat: int, splits: int, sms: int) -> float:
    """Makespan, in KV tiles, of every row's ``T`` tiles split over ``splits`` programs of
    ``ceil(T / splits)`` tiles each (rows with fewer tiles than ``splits`` take one program a tile),
    each row launched ``repeat`` times, longest first on ``sms`` SMs."""
    work = []
    for t in row_tiles:
        parts = min(splits, t)
        work += [float(-(-t // parts))] * parts
    return makespan(torch.tensor(work, dtype=torch.float64), sms, repeat)


def split_kv(row_tiles: list[int], repeat: int, sms: int) -> SplitChoice:
    """The split-KV rule (module docstring): the smallest split count, at most the fewest KV tiles of a
    row and ``MAX_SPLITS``, whose makespan is within ``SPLIT_SLACK`` of the best one's. ``row_tiles``:
    the KV tiles of each (K/V head class, Q tile) row; ``repeat``: the programs each row stands for
    (batch x the K/V heads of its class)."""
    rows = [int(t) for t in row_tiles if t > 0]
    if not rows:
        return SplitChoice(1, 0, 0, 0.0, 0.0)
    limit = min(min(rows), MAX_SPLITS)
    spans = [split_makespan(rows, repeat, s, sms) for s in range(1, limit + 1)]
    best = min(spans)
    splits = next(s for s, span in enumerate(spans, 1) if span <= best * (1 + SPLIT_SLACK))
    programs = sum(min(splits, t) for t in rows) * repeat
    span = spans[splits - 1]
    return SplitChoice(
        splits, programs, -(-programs // sms), span, sum(rows) * repeat / (sms * span)
    )


# ----------------------------------------------------------------- bytes, FLOPs and bounds
@dataclass(frozen=True)
class StepCost:
    """One decode step on one GPU model: bytes, FLOPs, the split-KV choice and the bounds."""

    kv_bytes: int
    q_bytes: int
    out_bytes: int
    partial_bytes: int
    flops: int
    split: SplitChoice
    bandwidth_s: float
    compute_s: float
    tokens: int

    @property
    def bytes(self) -> int:
        return self.kv_bytes + self.q_bytes + self.out_bytes + self.partial_bytes

    @property
    def bound_s(self) -> float:
        return max(self.bandwidth_s, self.compute_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.bound_s if self.bound_s > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "kv_bytes": self.kv_bytes,
            "q_bytes": self.q_bytes,
            "out_bytes": self.out_bytes,
            "partial_bytes": self.partial_bytes,
            "flops": self.flops,
            "split": self.split.to_dict(),
            "bandwidth_bound_s": self.bandwidth_s,
            "compute_bound_s": self.compute_s,
            "bound_s": self.bound_s,
            "tokens_per_s": self.tokens_per_s,
        }


def step_cost(
    visit: DecodeVisit, hw: Hardware, *, heads: int, head_dim: int, batch: int, nbytes: int
) -> StepCost:
    """Bytes, FLOPs and bounds of a decode step that reads ``visit`` on ``hw``."""
    rows = int(visit.q_rows.sum())
    row_tiles = visit.tiles.reshape(-1).tolist()
    split = split_kv(row_tiles, batch * visit.repeat, hw.sms)
    kv_bytes = 2 * batch * visit.key_reads() * head_dim * nbytes  # K and V
    io_bytes = batch * heads * rows * head_dim * nbytes  # Q in, O out (each)
    # with splits, every split writes fp32 partial outputs and a log-sum-exp per row; the combine reads them
    partial = (
        2 * batch * heads * rows * split.splits * (head_dim + 1) * PARTIAL_BYTES
        if split.splits > 1
        else 0
    )
    flops = FLOPS_PER_PAIR_DIM * head_dim * batch * (heads // visit.kv_heads) * visit.pairs()
    total = kv_bytes + 2 * io_bytes + partial
    return StepCost(
        kv_bytes,
        io_bytes,
        io_bytes,
        partial,
        flops,
        split,
        total / hw.bytes_per_s,
        flops / (hw.tensor_tflops * 1e12),
        batch * rows,
    )


# ----------------------------------------------------------------- the report
@dataclass
class DecodeReport(ReportView):
    """What ``runtime.api.simulate_decode`` returns: the step's visited keys and, per GPU model, the
    bounds of the step and of a dense step (``to_dict()``, ``report[key]``, ``str(report)``)."""

    pattern: str
    n: int
    nk: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: str
    visit: DecodeVisit
    dense: DecodeVisit
    hardware: list[Hardware]
    costs: list[StepCost]
    dense_costs: list[StepCost]
    assumptions: list[str] = field(default_factory=list)

    @property
    def speedups(self) -> list[float]:
        """Dense bound over this pattern's bound, per GPU model."""
        return [
            d.bound_s / c.bound_s if c.bound_s > 0 else math.inf
            for c, d in zip(self.costs, self.dense_costs, strict=True)
        ]

    def to_dict(self) -> dict:
        v = self.visit
        return {
            "kind": "decode",
            "pattern": self.pattern,
            "n": self.n,
            "nk": self.nk,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "batch": self.batch,
            "dtype": self.dtype,
            "q_tile": v.q_tile,
            "kv_tile": v.kv_tile,
            "q_tiles": len(v.q_rows),
            "keys_visited": v.keys_visited(),
            "keys_visited_per_kv_head": self._per_kv_head(v.distinct),
            "kv_tiles_read": int(v.tiles.sum()) * v.repeat,
            "key_reads": v.key_reads(),
            "dense_key_reads": self.dense.key_reads(),
            "gpus": [
                {"hardware": hw.name, **c.to_dict(), "dense": d.to_dict(), "speedup": s}
                for hw, c, d, s in zip(
                    self.hardware, self.costs, self.dense_costs, self.speedups, strict=True
                )
            ],
            "assumptions": list(self.assumptions),
        }

    def _per_kv_head(self, per_class: torch.Tensor) -> list[int]:
        return per_class.repeat_interleave(self.visit.repeat).tolist()

    def format_table(self) -> str:
        return format_decode(self)


def simulate_decode_pattern(
    pat: ir.PatternIR,
    bound: E.Bound,
    hardware: list[Hardware],
    *,
    head_dim: int,
    batch: int,
    dtype: str,
    kv_heads: int | None = None,
    inputs: dict | None = None,
    kv_tile: int = DECODE_KV_TILE,
) -> DecodeReport:
    """The decode report of a bound pattern (``decode_bound``) on each hardware model."""
    nbytes = dtype_bytes(dtype)
    visit = visited_tiles(pat, bound, kv_heads=kv_heads, kv_tile=kv_tile, inputs=inputs)
    dense = dense_visit(bound.n, bound.nk, visit.kv_heads, visit.kv_tile)
    shape = {"heads": bound.heads, "head_dim": head_dim, "batch": batch, "nbytes": nbytes}
    costs = [step_cost(visit, hw, **shape) for hw in hardware]
    dense_costs = [step_cost(dense, hw, **shape) for hw in hardware]
    assumptions = [
        "bounds, not predictions of a kernel: bytes / the data sheet's HBM bandwidth, FLOPs / its dense "
        "tensor-core rate (a step's few query rows fill few MMA rows: the compute bound is optimistic)",
        f"one attention layer's step: tokens/s is the step's {batch * bound.n} new token"
        + ("s" if batch * bound.n > 1 else "")
        + " over its bound; a model's step runs every layer, and reads "
        "the weights besides",
        "reads counted: K and V of every KV tile a Q tile reaches (once per K/V head), Q, the output and "
        "the split-KV partials; a mask's own inputs (e.g. document ids) are not counted",
        "the bandwidth bound takes every SM streaming; SM fill is the share of SM time the split-KV "
        "launch keeps busy (a step too small to fill the SMs draws less than the whole bandwidth)",
    ]
    if pat.route is not None:
        assumptions.append(
            "routing is data-dependent: each query is modelled keeping topk of the key blocks (or keys) its mask "
            "reaches, those keep forces always, then the nearest to it (given scores where passed), as the prefill "
            "simulator models it; a Q tile reads every KV tile holding a key one of its queries attends"
            + (
                "; the query heads sharing a K/V head are modelled keeping the same blocks (heads that "
                "keep different ones read their union)"
                if visit.kv_heads < bound.heads
                else ""
            )
        )
    return DecodeReport(
        pat.name,
        bound.n,
        bound.nk,
        bound.heads,
        visit.kv_heads,
        head_dim,
        batch,
        str(dtype).lower(),
        visit,
        dense,
        list(hardware),
        costs,
        dense_costs,
        assumptions,
    )


def _bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:,.2f} {unit}"
    return f"{int(b)} B"


def _us(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:,.2f} ms"
    return f"{s * 1e6:.2f} us" if s < 1e-5 else f"{s * 1e6:,.1f} us"


def format_decode(rep: DecodeReport) -> str:
    """The decode report as a readable table."""
    d = rep.to_dict()
    v = rep.visit
    per_head = d["keys_visited_per_kv_head"]
    visited = f"{per_head[0]:,}" if len(set(per_head)) == 1 else f"{d['keys_visited']:,.1f} (mean)"
    kv = (
        ""
        if rep.kv_heads == rep.heads
        else f" sharing {rep.kv_heads} K/V head" + ("s" if rep.kv_heads > 1 else "")
    )
    lines = [
        f"{rep.pattern} decode step: the last {rep.n} of {rep.nk:,} tokens as quer{'y' if rep.n == 1 else 'ies'} "
        f"over the KV cache "
        f"(bounds from bytes and FLOPs, not measurements), heads {rep.heads}{kv}, head_dim {rep.head_dim}, "
        f"batch {rep.batch}, {rep.dtype}",
        "",
        f"  keys visited     {visited} of {rep.nk:,} per K/V head (KV tiles of {v.kv_tile} keys, "
        + (
            f"{d['q_tiles']} Q tiles of up to {v.q_tile} queries)"
            if d["q_tiles"] > 1
            else "one Q tile)"
        ),
        f"  K/V read         {_bytes(rep.costs[0].kv_bytes)} per step (dense: {_bytes(rep.dense_costs[0].kv_bytes)}, "
        f"{rep.dense.key_reads() / max(v.key_reads(), 1):.2f}x more)",
        f"  FLOPs            {rep.costs[0].flops:,} per step (dense: {rep.dense_costs[0].flops:,})",
        "",
        f"  {'GPU':<6} {'bytes/step':>11} {'bandwidth':>10} {'compute':>10} {'split-KV':>8} {'programs':>8} "
        f"{'SM fill':>7} {'tokens/s':>12} {'dense bound':>11} {'vs dense':>8}",
    ]
    for hw, c, dn, s in zip(rep.hardware, rep.costs, rep.dense_costs, rep.speedups, strict=True):
        lines.append(
            f"  {hw.name:<6} {_bytes(c.bytes):>11} {_us(c.bandwidth_s):>10} {_us(c.compute_s):>10} "
            f"{c.split.splits:>8} {c.split.programs:>8} {c.split.fill:>7.2f} {c.tokens_per_s:>12,.0f} "
            f"{_us(dn.bound_s):>11} {s:>7.2f}x"
        )
    lines += ["", *(f"  note: {a}" for a in rep.assumptions)]
    return "\n".join(lines)


__all__ = [
    "DECODE_KV_TILE",
    "DECODE_Q_TILE",
    "MAX_SPLITS",
    "SPLIT_SLACK",
    "DecodeReport",
    "DecodeVisit",
    "SplitChoice",
    "StepCost",
    "decode_bound",
    "dense_visit",
    "format_decode",
    "recurrence_state_bytes",
    "simulate_decode_pattern",
    "split_kv",
    "split_makespan",
    "step_cost",
    "visited_tiles",
]
