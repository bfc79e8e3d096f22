"""The tile plan every tiled backend reads: tokens in tile order, the classified schedule with its
head classes, mask and score terms, and the evaluation of the mask on a block of visited tiles
(``TileBlock``). Built once per shapes (``Plan.build``) and cached by the runners."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import sympy
import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.schedule import TileSchedule, tile_grid, tile_tokens
from ...compiler.analysis.tiles import head_dependent, whole_mask
from ...compiler.analysis.weights import log_weights
from ...compiler.codegen.tables import tabulate
from ...core import ir
from ..numerics import fox_pairs, soft_capped

#: Score entries (batch x heads x chunk queries x visited keys) held at once.
CHUNK_ELEMENTS = 1 << 23


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
    #: ``mask`` with its terms of grid coordinates alone read from exact tables (``compiler.codegen.tables``;
    #: None: the mask as is), and those tables, read as inputs
    pair_mask: sympy.Basic | None = None
    tables: dict = field(default_factory=dict)
    #: What a backend keeps on a device for this plan's life (``on_device``): its loaded kernels,
    #: tile lists and constants, made once instead of at every call.
    device_state: dict = field(default_factory=dict)
    #: Makes each call's lists on the device from the call's inputs (``device_tiles.InputLists``: its
    #: ``call_plan``); None where the schedule's lists serve every call
    call_lists: object = None

    def on_device(self, key, make):
        """``make()`` the first time ``key`` is asked for, the same object after: per-plan state that
        later calls reuse (a host-to-device copy per call waits for the device's queued work)."""
        if key not in self.device_state:
            self.device_state[key] = make()
        return self.device_state[key]

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
                and self.selection is None and not E.input_names(self.mask) and not self.bound.q_offset
                and not self.bound.is_block)

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


def selected_pairs(selection: torch.Tensor, q_tok: torch.Tensor, k_block: torch.Tensor, transposed: bool
                   ) -> torch.Tensor:
    """``selection[:, :, q_tok, k_block]`` (``[B, H, Nq, blocks]`` read at a chunk's pairs, ``[B, H, C, R,
    K]``) for ``q_tok`` and ``k_block`` ``[C, R, 1]`` and ``[C, 1, K]``, or, ``transposed`` (rows are keys),
    ``[C, 1, K]`` and ``[C, R, 1]``, one tile at a time: two ``index_select`` of whole rows and columns
    instead of a gather at every pair (a token route's selection is n x nk)."""
    C, R, K = q_tok.shape[0], max(q_tok.shape[1], k_block.shape[1]), max(q_tok.shape[2], k_block.shape[2])
    q_tok, k_block = q_tok.to(selection.device), k_block.to(selection.device)
    out = torch.empty(*selection.shape[:2], C, R, K, dtype=torch.bool, device=selection.device)
    for c in range(C):
        part = selection.index_select(-2, q_tok[c].flatten()).index_select(-1, k_block[c].flatten())
        out[:, :, c] = part.transpose(-1, -2) if transposed else part
    return out


class TileBlock:
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
            routed = plan.selection is not None
            if routed:  # routing: the query's selected blocks only
                q_tok, k_tok = self.q_tok[0, 0], self.k_tok[0, 0]
                if self.transposed:
                    q_tok = q_tok[..., ps:]
                else:
                    k_tok = k_tok[..., ps:]
                heads = self.heads  # a run of heads is a view (a list would copy the whole selection)
                sel = plan.selection[self.bsel]
                sel = (sel[:, heads[0]:heads[-1] + 1] if heads == list(range(heads[0], heads[-1] + 1))
                       else sel[:, heads])
                chosen = selected_pairs(sel, q_tok, plan.key_block[k_tok], self.transposed)
            if routed and plan.pattern.route.tokens:
                m = chosen  # a token route selects only keys its mask allows: the selection is the mask
            else:
                mask, inputs = ((plan.mask, self.inputs) if plan.pair_mask is None
                                else (plan.pair_mask, {**self.inputs, **plan.tables}))
                m = E.as_tensor(self._evaluate(mask, inputs, slice(ps, None)), torch.bool)
                if routed:
                    m = m & chosen
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
        """Softcap, bias, FoX decay and the weights' logarithm (``weights``) applied to the scaled scores
        ``[B, Hs, C, R, K]``."""
        plan = self.plan
        if plan.softcap is not None:
            scores = soft_capped(scores, plan.softcap[self.heads].view(1, -1, 1, 1, 1))
        if plan.bias is not None:
            bias = self._evaluate(plan.bias, extra, guard=self.guard)  # after allowed(): see Evaluator
            scores = scores + E.as_tensor(bias, scores.dtype).to(scores.dtype)
        if plan.pattern.decay is not None:
            hi, lo, reset = (extra[f"__fox_{part}_{plan.pattern.decay}"][:, self.heads]  # [B | 1, Hs, N]
                             for part in ("hi", "lo", "reset"))
            # gates are indexed by absolute position: query rows start at q_offset (a KV cache, a
            # block), key rows at k_offset (a block)
            scores = scores + fox_pairs(hi, lo, reset, self.q_tok[0, 0] + plan.bound.q_offset,
                                        self.k_tok[0, 0] + plan.bound.k_offset)
        if plan.pattern.weights is not None:  # weights F(s) ** P: the softmax of their logarithms
            scores = log_weights(plan.pattern.weights, scores)
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


def chunks(n: int, per_item: int, budget: int = CHUNK_ELEMENTS) -> list[torch.Tensor]:
    step = max(1, budget // max(1, per_item))
    return [torch.arange(s, min(n, s + step)) for s in range(0, n, step)]


def visited_lists(schedule: TileSchedule, cls: int, own: torch.Tensor, transposed: bool):
    if transposed:
        return [(schedule.t_full_index[cls, own], True), (schedule.t_partial_index[cls, own], False)]
    return [(schedule.full_index[cls, own], True), (schedule.partial_index[cls, own], False)]


def packed_lists(schedule: TileSchedule, cls: int, own: torch.Tensor, transposed: bool):
    """The visited tiles of the chunk ``own`` as one list per tile (its FULL tiles, then its PARTIAL
    ones, then padding), so that a chunk is as wide as its longest list, not as its most FULL plus
    its most PARTIAL tiles; split where the first tile's list may be PARTIAL (``TileBlock`` evaluates
    the mask from there)."""
    (full, _), (partial, _) = visited_lists(schedule, cls, own, transposed)
    both = torch.cat([full, partial], 1)
    missing = both < 0
    order = torch.sort(missing.to(torch.int8), dim=1, stable=True).indices
    packed = both.gather(1, order)
    width = int((~missing).sum(1).max()) if both.numel() else 0
    split = int((full >= 0).sum(1).min()) if full.numel() else 0
    return [(packed[:, :split], True), (packed[:, split:width], False)]


def trim_lists(lists):
    """Drop all-missing trailing columns of the padded lists of one chunk."""
    out = []
    for idx, full in lists:
        width = int((idx >= 0).sum(1).max()) if idx.numel() else 0
        out.append((idx[:, :width], full))
    return out
