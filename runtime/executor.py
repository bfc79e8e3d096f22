"""The CPU executor: runs a ``TileSchedule`` with batched torch operations.

Tokens are permuted so that every tile is contiguous (multi-dimensional tiles
become runs of the permuted order; edge tiles are padded with invalid slots).
For a chunk of Q tiles it gathers the KV tiles of their FULL lists and of
their PARTIAL lists, computes the scores, evaluates the mask on PARTIAL tiles
only, adds the score terms, and takes the softmax over every visited key of
the query at once. Memory is bounded by the chunk (``CHUNK_ELEMENTS`` score
entries), never by N x N.

The backward pass recomputes the probabilities: dQ (and the gradients of
score inputs) over the Q tiles' lists, dK and dV over the transposed lists
(per KV tile, the Q tiles that visit it), so no gradient is accumulated by
scattering across tiles except the key side of FoX gates and bias inputs.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import sympy
import torch

from ..compiler import evaluate as E
from ..compiler import ir
from ..compiler.schedule import TileSchedule, tile_grid, tile_tokens
from ..compiler.tables import tabulate
from ..compiler.tiles import head_dependent, whole_mask
from . import decode
from .reference import fox_pairs, fox_prefix

#: Score entries (batch x heads x chunk queries x visited keys) held at once.
CHUNK_ELEMENTS = 1 << 23
#: Elements of the gathered K and V and the float mask of one chunk through the fused kernel
#: (``fusable``: it holds no scores; 128 MiB in fp32).
FUSED_CHUNK_ELEMENTS = 1 << 25
#: Bytes of evaluated PARTIAL-tile masks a plan keeps for later calls.
MASK_CACHE_BYTES = 256 << 20
#: The same for a whole-tile plan's cache, shared by the plans of its mask and sizes and one of at
#: most ``WHOLE_CACHES_KEPT`` in the process (8,192 x 8,192 tokens hold 384 MiB: the float mask,
#: allowed pairs and valid pairs).
WHOLE_CACHE_BYTES = 512 << 20


@dataclass
class TiledTokens:
    """Tokens in tile order: ``index[t, s]`` is the flat token of slot s of tile t."""

    index: torch.Tensor  # [tiles, slots] int64 (padded slots point at token 0)
    valid: torch.Tensor  # [tiles, slots] bool

    @classmethod
    def of(cls, extents: tuple[int, ...], tile: tuple[int, ...]) -> TiledTokens:
        n = math.prod(tile_grid(extents, tile))
        index, valid = tile_tokens(extents, tile, torch.arange(n))
        return cls(torch.where(valid, index, torch.zeros_like(index)), valid)

    @functools.cached_property
    def identity(self) -> bool:
        """Whether tile order is token order (1-D tiles that divide the sequence): then
        ``[..., tiles, slots]`` reshapes to ``[..., N]`` with no gather."""
        return bool(self.valid.all()) and torch.equal(self.index.flatten(), torch.arange(self.index.numel()))

    @functools.cached_property
    def _slot_of_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        tiles, slots = torch.nonzero(self.valid, as_tuple=True)
        order = torch.argsort(self.index[tiles, slots])
        return tiles[order], slots[order]

    def scatter(self, x_tiled: torch.Tensor, n: int, features: bool) -> torch.Tensor:
        """``[..., tiles, slots, D]`` (``features``) or ``[..., tiles, slots]`` -> token order
        ``[..., N, D]`` / ``[..., N]`` (padded slots dropped): one gather (a reshape when
        tile order is token order); ``x_tiled`` may be any strided view."""
        if self.identity:
            lead = x_tiled.shape[:-3] if features else x_tiled.shape[:-2]
            return x_tiled.reshape(*lead, n, *x_tiled.shape[len(lead) + 2:])
        tiles, slots = self._slot_of_token
        if features:
            return x_tiled[..., tiles, slots, :]
        return x_tiled[..., tiles, slots]


@dataclass
class Plan:
    """Everything the executor needs besides the tensors."""

    pattern: ir.PatternIR
    bound: E.Bound
    schedule: TileSchedule
    q_tokens: TiledTokens
    k_tokens: TiledTokens
    mask: sympy.Basic
    bias: sympy.Basic | None
    softcap: torch.Tensor | None  # [H] caps
    # Routing (per call): the schedule then has one list class per (batch, head),
    # and ``selection[b, h, q, block]`` is applied on PARTIAL tiles.
    selection: torch.Tensor | None = None
    key_block: torch.Tensor | None = None
    batch: int | None = None
    # The mask of PARTIAL tiles, evaluated once per chunk and reused by later calls
    # (static masks only; bounded by MASK_CACHE_BYTES).
    mask_cache: dict = field(default_factory=dict)
    #: The mask's call-time inputs are fixed for this plan's life (``cpu_backend`` builds a new
    #: plan when they change): their masks are then cached like a static mask's.
    inputs_fixed: bool = False
    #: ``mask`` with its terms of grid coordinates alone read from exact tables (``compiler.tables``;
    #: None: the mask as is), and those tables, read as inputs
    pair_mask: sympy.Basic | None = None
    tables: dict = field(default_factory=dict)

    def remember(self, key, value) -> None:
        """Keep a mask-derived tensor (or tuple of them) for later calls, within ``MASK_CACHE_BYTES``
        (``WHOLE_CACHE_BYTES`` for a whole-tile plan)."""
        def size(v):
            if isinstance(v, tuple):
                return sum(size(x) for x in v)
            return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0

        limit = WHOLE_CACHE_BYTES if self.whole else MASK_CACHE_BYTES
        if sum(size(v) for v in self.mask_cache.values()) + size(value) <= limit:
            self.mask_cache[key] = value

    @functools.cached_property
    def whole(self) -> bool:
        """One tile of the whole sequence per side, in token order, with a mask of no input and no
        routing (``cpu_backend.whole_tile_fits``): its mask is evaluated per grid axis."""
        s = self.schedule
        return (s.num_q_tiles == 1 and s.num_kv_tiles == 1 and self.q_tokens.identity and self.k_tokens.identity
                and self.selection is None and not E.input_names(self.mask) and not self.bound.q_offset)

    @property
    def static_mask(self) -> bool:
        """Whether the mask is the same at every call of this plan (evaluated masks are cached)."""
        return self.selection is None and (self.inputs_fixed or not E.input_names(self.mask))

    @classmethod
    def build(cls, pattern: ir.PatternIR, bound: E.Bound, schedule: TileSchedule) -> Plan:
        softcap = None
        if pattern.softcap is not None:
            softcap = E.head_values(pattern.softcap, bound.subs, bound.heads)
        mask = E.substitute(pattern.mask, bound)
        pair_mask, tables = tabulate(mask, pattern, bound)
        return cls(
            pattern, bound, schedule,
            TiledTokens.of(schedule.q_extents, schedule.q_tile),
            TiledTokens.of(schedule.kv_extents, schedule.kv_tile),
            mask,
            E.substitute(pattern.bias, bound) if pattern.bias is not None else None,
            softcap,
            pair_mask=pair_mask if tables else None, tables=tables,
        )

    def groups(self) -> list[tuple[int, slice, list[int]]]:
        """(list class, batch rows, query heads) served by each class of lists."""
        H = self.bound.heads
        if self.selection is not None:
            return [(b * H + h, slice(b, b + 1), [h]) for b in range(self.batch) for h in range(H)]
        if self.schedule.heads_stored == 1:
            return [(0, slice(None), list(range(H)))]
        return [(h, slice(None), [h]) for h in range(H)]


def _env(plan: Plan, heads: list[int], q_tok: torch.Tensor, k_tok: torch.Tensor) -> dict:
    """Symbol values for token blocks: q_tok/k_tok broadcast as ``[1, 1, C, Q, K]``
    (batch, heads, tiles, rows, columns)."""
    return E.token_env(plan.pattern, plan.bound, q_tok, k_tok, torch.tensor(heads).view(1, -1, 1, 1, 1))


def _geometry(plan: Plan, own: torch.Tensor, lists, transposed: bool):
    """(row tokens ``[C, R]``, column tokens ``[C, K]``, valid pairs ``[C, R, K]``, first PARTIAL
    column) of a chunk of tiles ``own`` and its visited tiles ``lists`` (FULL lists first)."""
    own_tok = plan.k_tokens if transposed else plan.q_tokens
    other_tok = plan.q_tokens if transposed else plan.k_tokens
    cols, col_valid = [], []
    partial_start = 0
    for idx, full in lists:
        missing = idx < 0
        safe = idx.clamp(min=0)
        cols.append(other_tok.index[safe].flatten(1))  # [C, W*T]
        col_valid.append((other_tok.valid[safe] & ~missing[..., None]).flatten(1))
        if full:
            partial_start += cols[-1].shape[1]
    valid = own_tok.valid[own][:, :, None] & torch.cat(col_valid, 1)[:, None, :]
    return own_tok.index[own], torch.cat(cols, 1), valid, partial_start


class _Block:
    """Scores of a block of (query, key) token pairs: a chunk of tiles with their visited tiles.

    Rows are the chunk's own tiles' tokens, columns the visited tiles' tokens:
    FULL tiles first, then PARTIAL ones (from ``partial_start``).
    ``transposed`` means the rows are keys (the dK/dV pass)."""

    def __init__(self, plan: Plan, heads: list[int], own: torch.Tensor, lists: list[tuple[torch.Tensor, bool]],
                 transposed: bool, inputs: dict, batched: set[str], bsel: slice = slice(None), key=None):
        self.plan, self.heads, self.inputs, self.batched, self.bsel = plan, heads, inputs, batched, bsel
        geometry = plan.mask_cache.get(("geometry", key)) if key is not None else None
        if geometry is None:
            geometry = _geometry(plan, own, lists, transposed)
            if key is not None:
                plan.remember(("geometry", key), geometry)
        self.row_index, self.col_index, self.valid, self.partial_start = geometry
        rows, columns = self.row_index[:, :, None], self.col_index[:, None, :]
        self.q_tok = (columns if transposed else rows)[None, None]  # [1, 1, C, R|1, K|1]
        self.k_tok = (rows if transposed else columns)[None, None]
        self.transposed = transposed
        self.guard: torch.Tensor | None = None  # the allowed pairs, once ``allowed()`` ran

    def _evaluate(self, expr, inputs: dict, cols: slice | None = None, guard: torch.Tensor | None = None):
        q_tok, k_tok = self.q_tok, self.k_tok
        if cols is not None:
            if self.transposed:
                q_tok = q_tok[..., cols]
            else:
                k_tok = k_tok[..., cols]
        return E.Evaluator(_env(self.plan, self.heads, q_tok, k_tok), inputs, self.batched, None, guard)(expr)

    def allowed(self, cache_key=None) -> torch.Tensor:
        """Valid and allowed ``[B | 1, Hs, C, R, K]``: the mask is evaluated on PARTIAL columns only
        (once per chunk for a static mask: ``cache_key`` names the chunk)."""
        cache = self.plan.mask_cache
        if cache_key is not None and cache_key in cache:
            self.guard = cache[cache_key]
            return self.guard
        allowed = self.valid.expand(1, 1, *self.valid.shape).clone()
        ps = self.partial_start
        if ps == 0 and not self.transposed and self.plan.whole:
            # one tile of the whole sequence: the mask per grid axis, once per head class
            plan = self.plan
            heads = self.heads if head_dependent(plan.pattern) else self.heads[:1]
            per_head = [whole_mask(plan.pattern, plan.bound, plan.mask, h) for h in heads]
            m = per_head[0][None] if len(per_head) == 1 else torch.stack(per_head)
            allowed = allowed & m[None, :, None]
        elif ps < self.valid.shape[-1]:
            plan = self.plan
            mask, inputs = (plan.mask, self.inputs) if plan.pair_mask is None else (plan.pair_mask, {**self.inputs, **plan.tables})
            m = E.as_tensor(self._evaluate(mask, inputs, slice(ps, None)), torch.bool)
            if self.plan.selection is not None:  # routing: the query's selected blocks only
                q_tok, k_tok = self.q_tok[0, 0], self.k_tok[0, 0]
                if self.transposed:
                    q_tok = q_tok[..., ps:]
                else:
                    k_tok = k_tok[..., ps:]
                sel = self.plan.selection[self.bsel][:, self.heads]
                m = m & sel[:, :, q_tok, self.plan.key_block[k_tok]]
            m = m if m.dim() == 5 else m.reshape((1,) * (5 - m.dim()) + tuple(m.shape))
            if m.shape[0] > 1 or m.shape[1] > 1:  # batched inputs, head-dependent masks
                allowed = allowed.expand(m.shape[0], m.shape[1], *allowed.shape[2:]).clone()
            allowed[..., ps:] &= m
        if cache_key is not None and self.plan.static_mask:
            self.plan.remember(cache_key, allowed)
        self.guard = allowed  # the score terms read their inputs (and check indices) on these pairs only
        return allowed

    def mask_scores(self, s: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """-inf where not allowed, touching FULL columns only where they hold padding."""
        ps = self.partial_start
        if s.shape != torch.broadcast_shapes(s.shape, allowed.shape):  # batched mask inputs
            return s.masked_fill(~allowed, -math.inf)
        if ps and not bool(self.valid[..., :ps].all()):
            s[..., :ps].masked_fill_(~allowed[..., :ps], -math.inf)
        if ps < s.shape[-1]:
            s[..., ps:].masked_fill_(~allowed[..., ps:], -math.inf)
        return s

    def terms(self, scores: torch.Tensor, extra: dict) -> torch.Tensor:
        """Softcap, bias and FoX decay applied to the scaled scores ``[B, Hs, C, R, K]``."""
        plan = self.plan
        if plan.softcap is not None:
            cap = plan.softcap[self.heads].to(scores.dtype).view(1, -1, 1, 1, 1)
            scores = cap * torch.tanh(scores / cap)
        if plan.bias is not None:
            bias = self._evaluate(plan.bias, extra, guard=self.guard)  # after allowed(): see Evaluator
            scores = scores + E.as_tensor(bias, scores.dtype).to(scores.dtype)
        if plan.pattern.decay is not None:
            hi, lo, reset = (extra[f"__fox_{part}_{plan.pattern.decay}"][:, self.heads]  # [B | 1, Hs, N]
                             for part in ("hi", "lo", "reset"))
            # gates are indexed by absolute position: query rows start at q_offset (a KV cache)
            scores = scores + fox_pairs(hi, lo, reset, self.q_tok[0, 0] + plan.bound.q_offset, self.k_tok[0, 0])
        return scores


#: Mask caches of whole-tile plans kept in the process (least recently used dropped first): plans of
#: the same mask and sizes share one (every layer of a model calling its own module, the forward and
#: the backward), so at most this many whole-sequence masks (``WHOLE_CACHE_BYTES`` each) are held.
WHOLE_CACHES_KEPT = 2
_WHOLE_CACHES: OrderedDict = OrderedDict()


def share_whole_cache(plan: Plan) -> Plan:
    """``plan`` (a whole-tile plan) reading and filling the process's mask cache of its mask and sizes."""
    b = plan.bound
    key = (str(plan.mask), b.n, b.nk, b.heads, tuple(sorted(b.axis_sizes.items())))
    cache = _WHOLE_CACHES.pop(key, None)
    if cache is None:
        cache = {}
    _WHOLE_CACHES[key] = cache
    while len(_WHOLE_CACHES) > WHOLE_CACHES_KEPT:
        _WHOLE_CACHES.popitem(last=False)[1].clear()  # plans still holding it recompute their masks
    plan.mask_cache = cache
    return plan


def _heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``x[:, heads]`` without a copy when the heads are a contiguous run."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0]:heads[0] + len(heads)]
    return x[:, heads]


def _flash_op():
    """torch's fused CPU attention kernel (online softmax, returns the log-sum-exp), if present
    with the signature used here (a float ``attn_mask`` and ``scale``)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    names = {a.name for a in op.default._schema.arguments}
    return op if {"attn_mask", "scale"} <= names else None


def fused_shapes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's fused CPU attention kernel takes these tensors: on CPU, Dv == D."""
    return _flash_op() is not None and not q.is_cuda and q.shape[-1] == v.shape[-1]


def fusable(plan: Plan, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the blocks run through torch's fused CPU attention kernel: ``fused_shapes`` and no
    softcap (the kernel takes the mask and the additive terms as one float mask, not a tanh).
    The decision depends on the shapes only, never on an earlier failure: an error from the
    kernel is a bug and is raised."""
    return plan.softcap is None and fused_shapes(q, v)


def _tile_major(x: torch.Tensor, index: torch.Tensor, tokens: TiledTokens | None = None,
                own: torch.Tensor | None = None) -> torch.Tensor:
    """The rows ``index [C, T]`` of ``x [B, H, N, D]`` in the kernel's layout ``[B * C, H, T, D]``
    (a strided view of one gather; a view of ``x`` itself for one batch row when ``tokens`` is
    in token order and ``own`` a run of tiles)."""
    B, H, N, D = x.shape
    C, T = index.shape
    if C == 1 and T == N and torch.equal(index[0], torch.arange(N)):  # every token in order (a whole tile)
        return _unit_stride(x)
    if B == 1 and tokens is not None and tokens.identity and int(own[-1]) - int(own[0]) + 1 == len(own):
        start = int(own[0]) * T
        return _unit_stride(x[:, :, start:start + C * T].unflatten(2, (C, T)).permute(0, 2, 1, 3, 4).reshape(C, H, T, D))
    return x.transpose(1, 2)[:, index].permute(0, 1, 3, 2, 4).reshape(B * C, H, T, D)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its features (the fused kernel's rows are read as such)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_mask(plan: Plan, blk: _Block, own: torch.Tensor, allowed: torch.Tensor, extra: dict, dtype, cache_key):
    """(float mask ``[Bm * C, Hm, R, K]`` in the kernel's layout, rows with an allowed key
    ``[Bm, C, Hm, R]`` or None when every valid row has one): the mask and the additive terms
    (bias, decay) as -inf / values; built once per plan for a static mask without terms."""
    additive = plan.bias is not None or plan.pattern.decay is not None
    key = ("kernel mask", cache_key, dtype)
    if not additive and key in plan.mask_cache:
        return plan.mask_cache[key]
    if additive:
        add = blk.terms(torch.zeros((), dtype=dtype), extra)
        shape = torch.broadcast_shapes(allowed.shape, add.shape)
        add = add.expand(shape).masked_fill(~allowed.expand(shape), -math.inf)
        keep = add != -math.inf  # a FoX reset (-inf decay) can empty a row too
    else:
        add = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, -math.inf)
        keep = allowed
    Bm, Hm, C, R, K = add.shape
    rows_ok = keep.any(-1)  # [Bm, Hm, C, R]
    row_valid = (plan.k_tokens if blk.transposed else plan.q_tokens).valid[own]  # padding rows are dropped
    empty_rows = None if bool((rows_ok | ~row_valid).all()) else rows_ok.permute(0, 2, 1, 3)
    entry = (add.permute(0, 2, 1, 3, 4).reshape(Bm * C, Hm, R, K), empty_rows)
    if not additive and cache_key is not None and plan.static_mask:
        plan.remember(key, entry)
    return entry


def _batch_mask(mask: torch.Tensor, B: int, C: int) -> torch.Tensor:
    """The kernel mask ``[Bm * C, Hm, R, K]`` for ``B`` batch rows (a copy where one is shared by all)."""
    if mask.shape[0] == B * C:
        return mask
    return mask.unflatten(0, (1, C)).expand(B, C, *mask.shape[1:]).reshape(B * C, *mask.shape[1:])


def _assemble(blocks: list, B: int, H: int, nQ: int, fill: float, dt) -> torch.Tensor:
    """``[B, H, nQ, ...]`` from per-chunk results ``(batch rows, heads, tiles, [rows, Hs, C, ...])``:
    the one block itself when it holds every tile in order, else copied into place (``fill``
    where no chunk wrote: tiles without visited keys)."""
    if len(blocks) == 1 and blocks[0][0] == slice(None) and blocks[0][1] == list(range(H)) \
            and len(blocks[0][2]) == nQ:
        return blocks[0][3]
    x = blocks[0][3]
    out = torch.full((B, H, nQ, *x.shape[3:]), fill, dtype=dt)
    for bsel, heads, own, part in blocks:
        out[bsel, torch.tensor(heads)[:, None], own[None, :]] = part
    return out


def _fused_block(plan: Plan, blk: _Block, own: torch.Tensor, qh, kh, vh, allowed, extra, scale: float,
                 cache_key=None):
    """The forward of one block through torch's fused CPU attention kernel (see ``fusable``):
    (out ``[B, Hs, C, R, Dv]``, lse ``[B, Hs, C, R]``), strided views of the kernel's outputs."""
    mask, rows_ok = _kernel_mask(plan, blk, own, allowed, extra, qh.dtype, cache_key)
    B, Hs = qh.shape[:2]
    C, R = blk.row_index.shape
    qc = _tile_major(qh, blk.row_index, plan.q_tokens, own)
    kc, vc = _tile_major(kh, blk.col_index), _tile_major(vh, blk.col_index)
    out, lse = _flash_op()(qc, kc, vc, 0.0, False, attn_mask=_batch_mask(mask, B, C), scale=scale)
    out, lse = out.unflatten(0, (B, C)), lse.to(qh.dtype).unflatten(0, (B, C))  # [B, C, Hs, R, (Dv)]
    if rows_ok is not None:  # a row with no allowed key: output 0, lse -inf
        out = torch.where(rows_ok[..., None], out, torch.zeros((), dtype=out.dtype))
        lse = torch.where(rows_ok, lse, torch.full((), -math.inf, dtype=lse.dtype))
    return out.permute(0, 2, 1, 3, 4), lse.permute(0, 2, 1, 3)


def _exp_rows(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(s - rowmax), safe row sums, log-sum-exp) of masked scores (-inf where
    masked); a row with no allowed key has zeros, sum 1 and lse -inf. Overwrites ``s``:
    the caller divides ``p @ v`` by the sums (N x Dv work instead of N x K)."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = s.sub_(m).exp_()
    total = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(total)).squeeze(-1)
    return p, torch.where(total == 0, torch.ones_like(total), total), lse


def _chunks(n: int, per_item: int, budget: int = CHUNK_ELEMENTS) -> list[torch.Tensor]:
    step = max(1, budget // max(1, per_item))
    return [torch.arange(s, min(n, s + step)) for s in range(0, n, step)]


#: A chunk of tiles (``_width_chunks``) pads every tile's list to the longest one's: at most this
#: many times the pairs its tiles visit.
PADDING_LIMIT = 1.3


def _chunk_cost(plan: Plan, fused: bool, rows: int, heads: int, d: int, dv: int) -> tuple[int, int]:
    """(elements per visited tile pair, elements per chunk) of the forward's chunks: the scores
    and their work unfused; the gathered K/V rows and the float mask through the fused kernel."""
    tq, tk = plan.q_tokens.index.shape[1], plan.k_tokens.index.shape[1]
    if fused:
        return rows * heads * tk * (d + dv) + tq * tk, FUSED_CHUNK_ELEMENTS
    return rows * heads * tq * tk, CHUNK_ELEMENTS


def _width_chunks(plan: Plan, cls: int, transposed: bool, per_pair: int, budget: int) -> list[torch.Tensor]:
    """The tiles of list class ``cls`` in chunks of similar list widths (sorted by width, cut
    where padding to the longest list would exceed ``PADDING_LIMIT`` or the chunk ``budget``
    score entries, ``per_pair`` per visited tile pair); each chunk's tiles in ascending order
    (a run of tiles for uniform lists). Cached in the plan."""
    key = ("chunks", cls, transposed, per_pair, budget)
    if key in plan.mask_cache:
        return plan.mask_cache[key]
    s = plan.schedule
    full, part = (s.t_full_index, s.t_partial_index) if transposed else (s.full_index, s.partial_index)
    widths = (full[cls] >= 0).sum(-1) + (part[cls] >= 0).sum(-1)
    order = torch.argsort(widths, stable=True)
    chunks, start, total = [], 0, 0
    for i, w in enumerate(widths[order].tolist()):
        count = i - start + 1
        if count > 1 and (count * w * per_pair > budget or count * w > PADDING_LIMIT * (total + w)):
            chunks.append(order[start:i].sort().values)
            start, total = i, 0
        total += w
    chunks.append(order[start:].sort().values)
    plan.remember(key, tuple(chunks))
    return chunks


def _chunk_key(plan: Plan, cls: int, per: int, budget: int, i: int) -> tuple:
    """The cache key of the forward's chunk ``i`` (the fused backward reads the same masks): a whole
    tile is one chunk whatever the batch (``per`` grows with it), so its masks are kept once."""
    return ("whole", cls) if plan.whole else ("q by width", cls, per, budget, i)


def _lists(schedule: TileSchedule, cls: int, own: torch.Tensor, transposed: bool):
    if transposed:
        return [(schedule.t_full_index[cls, own], True), (schedule.t_partial_index[cls, own], False)]
    return [(schedule.full_index[cls, own], True), (schedule.partial_index[cls, own], False)]


def _packed_lists(schedule: TileSchedule, cls: int, own: torch.Tensor, transposed: bool):
    """The visited tiles of the chunk ``own`` as one list per tile (its FULL tiles, then its PARTIAL
    ones, then padding), so that a chunk is as wide as its longest list, not as its most FULL plus
    its most PARTIAL tiles; split where the first tile's list may be PARTIAL (``_Block`` evaluates
    the mask from there)."""
    (full, _), (partial, _) = _lists(schedule, cls, own, transposed)
    both = torch.cat([full, partial], 1)
    missing = both < 0
    order = torch.sort(missing.to(torch.int8), dim=1, stable=True).indices
    packed = both.gather(1, order)
    width = int((~missing).sum(1).max()) if both.numel() else 0
    split = int((full >= 0).sum(1).min()) if full.numel() else 0
    return [(packed[:, :split], True), (packed[:, split:width], False)]


def _trim(lists):
    """Drop all-missing trailing columns of the padded lists of one chunk."""
    out = []
    for idx, full in lists:
        width = int((idx >= 0).sum(1).max()) if idx.numel() else 0
        out.append((idx[:, :width], full))
    return out


def _prepare_extra(plan: Plan, inputs: dict[str, torch.Tensor], dtype) -> dict:
    extra = dict(inputs)
    if plan.pattern.decay is not None:
        g = inputs[plan.pattern.decay].to(dtype)
        for part, t in zip(("hi", "lo", "reset"), fox_prefix(g if g.dim() == 3 else g.unsqueeze(0)), strict=True):
            extra[f"__fox_{part}_{plan.pattern.decay}"] = t
    return extra


def _batch_rows(extra: dict, batched: set[str], bsel: slice, B: int) -> dict:
    """The call-time inputs (and derived tensors) seen by the batch rows ``bsel``."""
    if bsel == slice(None):
        return extra
    out = {}
    for name, t in extra.items():
        sliced = name in batched or (name.startswith("__") and t.shape[0] == B)
        out[name] = t[bsel] if sliced else t
    return out


def _no_autocast(fn):
    """Run ``fn`` with autocast off: the executor chooses its compute dtype (fp32, fp64 for
    fp64 inputs) itself; autocast would turn its matmuls to bf16/fp16 and mix dtypes
    (callers under autocast cast q, k, v first, as torch does for its attention)."""
    @functools.wraps(fn)
    def wrapper(plan, q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(plan, q, *args, **kwargs)

    return wrapper


@_no_autocast
def forward(plan: Plan, q, k, v, inputs: dict, batched: set[str], scale: float):
    """(out ``[B, Hq, Nq, Dv]`` in q's dtype, lse ``[B, Hq, Nq]`` fp32/fp64)."""
    if isinstance(plan, decode.RowPlan):  # a few queries after a KV cache (runtime.decode)
        return decode.forward(plan, q, k, v, inputs, batched, scale)
    B, Hq, Nq, _ = q.shape
    group = Hq // k.shape[1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    fused = fusable(plan, q, v)
    # the scale folded into q (N x D work, not N x K) unless the kernel takes it
    qd, kd, vd = q.to(dt) if fused else q.to(dt) * scale, k.to(dt), v.to(dt)
    extra = _prepare_extra(plan, inputs, dt)
    nQ, Tq = plan.q_tokens.index.shape
    Dv = v.shape[-1]
    blocks, lse_blocks = [], []  # (batch rows, heads, tiles, out [rows, Hs, C, R, Dv] | lse [rows, Hs, C, R])
    for cls, bsel, heads in plan.groups():
        kv_heads = [h // group for h in heads]
        qh, kh, vh = _heads(qd[bsel], heads), _heads(kd[bsel], kv_heads), _heads(vd[bsel], kv_heads)
        ex = _batch_rows(extra, batched, bsel, B)
        rows = qh.shape[0]
        per, budget = _chunk_cost(plan, fused, rows, len(heads), q.shape[-1], Dv)
        for i, own in enumerate(_width_chunks(plan, cls, False, per, budget)):
            lists = _packed_lists(plan.schedule, cls, own, False)
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            chunk_key = _chunk_key(plan, cls, per, budget, i)
            blk = _Block(plan, heads, own, lists, False, ex, batched, bsel, key=chunk_key)
            allowed = blk.allowed(chunk_key)
            if fused:
                o, lse = _fused_block(plan, blk, own, qh, kh, vh, allowed, ex, scale, chunk_key)
            else:
                qc, kc, vc = qh[:, :, blk.row_index], kh[:, :, blk.col_index], vh[:, :, blk.col_index]
                s = blk.terms(qc @ kc.transpose(-1, -2), ex)
                p, total, lse = _exp_rows(blk.mask_scores(s, allowed))
                o = (p @ vc).div_(total)
            blocks.append((bsel, heads, own, o.expand(rows, len(heads), *o.shape[-3:])))
            lse_blocks.append((bsel, heads, own, lse.expand(rows, len(heads), *lse.shape[-2:])))
    if not blocks:  # no query visits any key
        out_t, lse_t = torch.zeros(B, Hq, nQ, Tq, Dv, dtype=dt), torch.full((B, Hq, nQ, Tq), -math.inf, dtype=dt)
    else:
        out_t, lse_t = _assemble(blocks, B, Hq, nQ, 0.0, dt), _assemble(lse_blocks, B, Hq, nQ, -math.inf, dt)
    out = plan.q_tokens.scatter(out_t, Nq, features=True)
    lse = plan.q_tokens.scatter(lse_t, Nq, features=False)
    return out.to(q.dtype), lse


def _terms_grad(blk: _Block, s_raw: torch.Tensor, ds: torch.Tensor, plan: Plan, inputs: dict, batched, wrt: list[str],
                dt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Push the gradient of the scores after the terms back to the raw scores and to score inputs."""
    if plan.softcap is None and plan.bias is None and plan.pattern.decay is None:
        return ds, {}
    with torch.enable_grad():
        leaves = {name: inputs[name].detach().to(dt).requires_grad_() for name in wrt}
        extra = _prepare_extra(plan, {**inputs, **leaves}, dt)
        raw = s_raw.detach().requires_grad_()
        s = blk.terms(raw, extra)
        targets = [raw, *leaves.values()]
        grads = torch.autograd.grad(s, targets, grad_outputs=ds.expand_as(s), allow_unused=True)
    out = {name: g for name, g in zip(leaves, grads[1:], strict=True) if g is not None}
    return grads[0], out


def _lse_feature(q, k, v, out, dout, dlse):
    """q, k, v, out, dout with one feature more that carries the lse's gradient through the fused
    backward kernel: it computes ``delta = rowsum(dout * out)`` and ``dS = P (dout v^T - delta)``,
    and the lse adds ``dlse P`` to dS. Zero features leave the scores (and dout v^T) unchanged, and
    the feature pair (dout 1, out -dlse) turns delta into ``delta - dlse``; dQ, dK and dV are the
    first D / Dv columns of the kernel's."""
    zero = torch.zeros((), dtype=q.dtype)
    pad = [torch.cat([x, zero.expand(*x.shape[:-1], 1)], -1) for x in (q, k, v)]
    out = torch.cat([out, -dlse.to(out.dtype)[..., None]], -1)
    dout = torch.cat([dout, torch.ones((), dtype=dout.dtype).expand(*dout.shape[:-1], 1)], -1)
    return (*pad, out, dout)


def _fused_backward(plan: Plan, q, k, v, out, lse, dout, dlse, inputs: dict, batched: set[str], scale: float):
    """(dq, dk, dv) through torch's fused CPU attention backward (``fusable``; no gradient of score
    inputs; the lse's gradient ``dlse`` through one extra feature, ``_lse_feature``): per chunk of
    Q tiles (the forward's chunks, masks and geometry), the kernel recomputes P from the saved lse
    over the gathered K/V and returns dQ and the gathered dK/dV, which are added to their tokens."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qd, kd, vd, dod, od = (x.to(dt) for x in (q, k, v, dout, out))
    if dlse is not None and bool(dlse.any()):
        qd, kd, vd, od, dod = _lse_feature(qd, kd, vd, od, dod, dlse)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros((), dtype=lse.dtype), lse).to(dt)  # empty rows: P = 0
    extra = _prepare_extra(plan, inputs, dt)
    nQ, Tq = plan.q_tokens.index.shape
    dk_acc = torch.zeros(B, Nk, Hkv, kd.shape[-1], dtype=dt)  # token-major: chunks add [C * K] key rows at once
    dv_acc = torch.zeros(B, Nk, Hkv, vd.shape[-1], dtype=dt)
    dq_blocks = []
    backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    for cls, bsel, heads in plan.groups():
        kv_heads = [h // group for h in heads]
        qh, dh, oh = (_heads(x[bsel], heads) for x in (qd, dod, od))
        kh, vh = _heads(kd[bsel], kv_heads), _heads(vd[bsel], kv_heads)
        lh = _heads(safe_lse[bsel], heads)[..., None]
        ex = _batch_rows(extra, batched, bsel, B)
        rows = qh.shape[0]
        per, budget = _chunk_cost(plan, True, rows, len(heads), D, Dv)
        for i, own in enumerate(_width_chunks(plan, cls, False, per, budget)):
            lists = _packed_lists(plan.schedule, cls, own, False)
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            chunk_key = _chunk_key(plan, cls, per, budget, i)  # the forward's
            blk = _Block(plan, heads, own, lists, False, ex, batched, bsel, key=chunk_key)
            mask, _ = _kernel_mask(plan, blk, own, blk.allowed(chunk_key), ex, dt, chunk_key)
            C, K = blk.col_index.shape
            qc, doc, oc, lc = (_tile_major(x, blk.row_index, plan.q_tokens, own) for x in (qh, dh, oh, lh))
            kc, vc = _tile_major(kh, blk.col_index), _tile_major(vh, blk.col_index)
            dq_c, dk_c, dv_c = backward_op(doc, qc, kc, vc, oc, lc[..., 0].contiguous(), 0.0, False,
                                           attn_mask=_batch_mask(mask, rows, C), scale=scale)
            dq_blocks.append((bsel, heads, own, dq_c.unflatten(0, (rows, C)).permute(0, 2, 1, 3, 4)))
            cols = blk.col_index.flatten()  # padded columns are masked: their gradients are 0
            for acc, g in ((dk_acc, dk_c), (dv_acc, dv_c)):
                g = g.unflatten(0, (rows, C)).transpose(2, 3).reshape(rows, C * K, len(heads), g.shape[-1])
                if heads == list(range(Hq)):  # every head: grouped query heads summed onto their key head
                    acc[bsel].index_add_(1, cols, g.unflatten(2, (Hkv, group)).sum(3) if group > 1 else g)
                else:
                    for j, kv in enumerate(kv_heads):
                        acc[bsel, :, kv].index_add_(1, cols, g[:, :, j])
    dq_t = _assemble(dq_blocks, B, Hq, nQ, 0.0, dt) if dq_blocks else torch.zeros(B, Hq, nQ, Tq, qd.shape[-1], dtype=dt)
    dq = plan.q_tokens.scatter(dq_t, Nq, features=True)[..., :D].to(q.dtype)
    return dq, dk_acc.transpose(1, 2)[..., :D].to(k.dtype), dv_acc.transpose(1, 2)[..., :Dv].to(v.dtype)


@_no_autocast
def backward(plan: Plan, q, k, v, out, lse, dout, dlse, inputs: dict, batched: set[str], scale: float,
             wrt: list[str]):
    """Gradients (dq, dk, dv, {input: grad}) by recomputation over the tile lists."""
    if isinstance(plan, decode.RowPlan):
        return decode.backward(plan, q, k, v, out, lse, dout, dlse, inputs, batched, scale, wrt)
    if fusable(plan, q, v) and not wrt:
        return (*_fused_backward(plan, q, k, v, out, lse, dout, dlse, inputs, batched, scale), {})
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qd, kd, vd, dod = q.to(dt), k.to(dt), v.to(dt), dout.to(dt)
    delta = (dod * out.to(dt)).sum(-1)  # [B, H, Nq]
    if dlse is not None:
        delta = delta - dlse.to(dt)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(dt)
    extra = _prepare_extra(plan, inputs, dt)
    nQ, Tq = plan.q_tokens.index.shape
    nK, Tk = plan.k_tokens.index.shape
    dq_t = torch.zeros(B, Hq, nQ, Tq, D, dtype=dt)
    dk_t = torch.zeros(B, Hkv, nK, Tk, D, dtype=dt)
    dv_t = torch.zeros(B, Hkv, nK, Tk, v.shape[-1], dtype=dt)
    d_inputs: dict[str, torch.Tensor] = {}
    sched = plan.schedule
    for cls, bsel, heads in plan.groups():
        kv_heads = [h // group for h in heads]
        kvh = torch.tensor(kv_heads)
        qh, dh = _heads(qd[bsel], heads), _heads(dod[bsel], heads)
        kh, vh = _heads(kd[bsel], kv_heads), _heads(vd[bsel], kv_heads)
        lse_h, delta_h = _heads(safe_lse[bsel], heads), _heads(delta[bsel], heads)
        ex, inp = _batch_rows(extra, batched, bsel, B), _batch_rows(inputs, batched, bsel, B)
        nrows = qh.shape[0]
        # dQ and score inputs: rows are Q tiles, over their KV lists
        width = sched.full_index.shape[-1] + sched.partial_index.shape[-1]
        for own in _chunks(nQ, nrows * len(heads) * Tq * max(1, width) * Tk):
            lists = _trim(_lists(sched, cls, own, False))
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            blk = _Block(plan, heads, own, lists, False, ex, batched, bsel)
            rows, cols = blk.row_index, blk.col_index
            qc, kc, vc = qh[:, :, rows], kh[:, :, cols], vh[:, :, cols]
            s_raw = scale * (qc @ kc.transpose(-1, -2))
            allowed = blk.allowed(("q", cls, int(own[0]), len(own)))
            s = blk.terms(s_raw, ex)
            p = torch.where(allowed, torch.exp(s - lse_h[:, :, rows][..., None]), torch.zeros((), dtype=dt))
            dp = dh[:, :, rows] @ vc.transpose(-1, -2)
            ds = p * (dp - delta_h[:, :, rows][..., None])
            ds_raw, d_in = _terms_grad(blk, s_raw, ds, plan, inp, batched, wrt, dt)
            for name, g in d_in.items():
                if name in batched and bsel != slice(None):
                    whole = torch.zeros(inputs[name].shape, dtype=g.dtype)
                    whole[bsel] = g
                    g = whole
                d_inputs[name] = d_inputs[name] + g if name in d_inputs else g
            dq_t[bsel, heads, own[0]:own[-1] + 1] = scale * (ds_raw @ kc)
        # dK and dV: rows are KV tiles, over the transposed lists
        width = sched.t_full_index.shape[-1] + sched.t_partial_index.shape[-1]
        for own in _chunks(nK, nrows * len(heads) * Tk * max(1, width) * Tq):
            lists = _trim(_lists(sched, cls, own, True))
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            blk = _Block(plan, heads, own, lists, True, ex, batched, bsel)
            rows, cols = blk.row_index, blk.col_index
            kc, vc = kh[:, :, rows], vh[:, :, rows]
            qc, doc = qh[:, :, cols], dh[:, :, cols]
            s_raw = scale * (kc @ qc.transpose(-1, -2))  # [B, Hs, C, Tk, Kq]
            allowed = blk.allowed(("kv", cls, int(own[0]), len(own)))
            s = blk.terms(s_raw, ex)
            p = torch.where(allowed, torch.exp(s - lse_h[:, :, cols][..., None, :]), torch.zeros((), dtype=dt))
            dv = p @ doc
            dp = vc @ doc.transpose(-1, -2)
            ds = p * (dp - delta_h[:, :, cols][..., None, :])
            ds_raw, _ = _terms_grad(blk, s_raw, ds, plan, inp, batched, [], dt)
            dk = scale * (ds_raw @ qc)
            dk_t[bsel, :, own[0]:own[-1] + 1].index_add_(1, kvh, dk.expand(nrows, *dk.shape[1:]))
            dv_t[bsel, :, own[0]:own[-1] + 1].index_add_(1, kvh, dv.expand(nrows, *dv.shape[1:]))
    dq = plan.q_tokens.scatter(dq_t, Nq, features=True).to(q.dtype)
    dk = plan.k_tokens.scatter(dk_t, Nk, features=True).to(k.dtype)
    dv = plan.k_tokens.scatter(dv_t, Nk, features=True).to(v.dtype)
    return dq, dk, dv, {name: g.to(inputs[name].dtype) for name, g in d_inputs.items()}


class TiledAttention(torch.autograd.Function):
    """The executor as a differentiable function of q, k, v and the float score inputs."""

    @staticmethod
    def forward(ctx, plan: Plan, scale: float, batched: frozenset, names: tuple, q, k, v, *input_tensors):
        inputs = dict(zip(names, input_tensors, strict=True))
        out, lse = forward(plan, q, k, v, inputs, set(batched), scale)
        ctx.plan, ctx.scale, ctx.batched, ctx.names = plan, scale, batched, names
        ctx.save_for_backward(q, k, v, out, lse, *input_tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *input_tensors = ctx.saved_tensors
        inputs = dict(zip(ctx.names, input_tensors, strict=True))
        wrt = [n for n, t, need in zip(ctx.names, input_tensors, ctx.needs_input_grad[7:], strict=True)
               if need and t.dtype.is_floating_point]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, d_in = backward(ctx.plan, q, k, v, out, lse, dout, dlse, inputs, set(ctx.batched), ctx.scale, wrt)
        return (None, None, None, None, dq, dk, dv, *(d_in.get(n) for n in ctx.names))
