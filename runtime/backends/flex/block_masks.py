"""A Flex plan's ``BlockMask`` from attnc's tile schedule (the seam: the schedule classified by attnc becomes what
Flex reads): ``FlexPlan`` (one per pattern and shapes), the tile-major token order of grids (``Order``), the
mask_mod / score_mod bound to their captured tensors, and ``block_mask_of`` (``BlockMask.from_kv_blocks`` from the
FULL and PARTIAL lists; padded KV tiles never FULL: ``demote_padded``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.schedule import TileSchedule, tile_grid, tile_tokens
from ....compiler.codegen.flex import FlexSource, TokenMap
from ....compiler.cost.search import contiguous
from ....core.errors import SpecError

#: Cost of one visited block pair beyond its token pairs (block loop, index loads), in token pairs.
PAIR_OVERHEAD_TOKENS = 4096
#: Extra cost of a PARTIAL token pair (mask_mod evaluated) relative to a FULL one.
PARTIAL_EXTRA = 0.5

@dataclass
class Order:
    """Flex positions of one role: ``token[p]`` is the token at position p (0 on padded
    slots), ``position[t]`` the position of token t; None for the identity."""

    token: torch.Tensor | None = None
    position: torch.Tensor | None = None

    @classmethod
    def of(cls, tmap: TokenMap) -> Order:
        if tmap.tile is None:
            return cls()
        n = math.prod(tile_grid(tmap.extents, tmap.tile))
        flat, valid = tile_tokens(tmap.extents, tmap.tile, torch.arange(n))
        token = torch.where(valid, flat, torch.zeros_like(flat)).reshape(-1)
        position = torch.empty(math.prod(tmap.extents), dtype=torch.int64)
        position[flat[valid]] = torch.arange(token.numel()).view(flat.shape)[valid]
        return cls(token, position)

    def to(self, device) -> Order:
        if self.token is None:
            return self
        return Order(self.token.to(device), self.position.to(device))


@dataclass
class FlexPlan:
    """Everything one call needs besides the tensors: schedule, token orders, generated mods."""

    bound: E.Bound
    schedule: TileSchedule
    q_map: TokenMap
    k_map: TokenMap
    source: FlexSource
    namespace: dict
    q_order: Order
    k_order: Order
    flat: bool  # 1-D tiles on a grid (classified on the flat view)
    block_masks: dict = field(default_factory=dict)  # device -> BlockMask (static masks)
    tables: dict = field(default_factory=dict)  # (name, device) -> the mask's table there (source.tables)
    exec_plan: object = None  # routing, index checks: the executor's plan over the static schedule (tile_plan)
    #: bias indices not proven in range (``indices.index_checks``): of positions only, checked at the
    #: plan's first call (then emptied), and those that read an input, checked at every call
    checks_once: tuple = ()
    checks_each: tuple = ()
    index_error: SpecError | None = None  # what the check at the first call found (raised at every call)

    @property
    def block_size(self) -> tuple[int, int]:
        """Flex's BLOCK_SIZE: the tiles' token counts; a 1-D tile that covers its whole side (clamped
        to a short sequence) becomes the next power of two, one block beyond the sequence as Flex's
        own 128 (the same lists; the fused CPU kernel needs power-of-two blocks, see fused_ok)."""
        def block(tile, length):
            b = math.prod(tile)
            return 1 << (b - 1).bit_length() if len(tile) == 1 and b == length else b

        return block(self.schedule.q_tile, self.q_map.length), block(self.schedule.kv_tile, self.k_map.length)


def row_major_blocks(tile: tuple[int, ...], extents: tuple[int, ...]) -> bool:
    """Box tiles that are already Flex blocks in the row-major order: each tile a run of
    exactly prod(tile) tokens (only the last one may be shorter). Otherwise: tile-major order."""
    if not contiguous(tile, extents):
        return False
    tm = TokenMap(extents, tile)
    order = Order.of(tm).token
    return not tm.padded and torch.equal(order, torch.arange(order.numel()))


def bind_mask_mod(fn, buffers: tuple):
    """A mask_mod with its captured tensors (one code object for every plan: no recompiles)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx, kv_idx, *buffers)
    return mask_mod


def bind_score_mod(fn, buffers: tuple):
    """A score_mod with its captured tensors (as bind_mask_mod)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return fn(score, b, h, q_idx, kv_idx, *buffers)
    return score_mod


def schedule_cost(sched: TileSchedule) -> float:
    h, qi, ki, full = sched.pairs()
    area = (sched.q_tile_tokens()[qi] * sched.kv_tile_tokens()[ki]).to(torch.float64)
    return float((area * torch.where(full, 1.0, 1.0 + PARTIAL_EXTRA)).sum()) + PAIR_OVERHEAD_TOKENS * len(h)


def demote_padded(sched: TileSchedule, k_map: TokenMap) -> TileSchedule:
    """FULL pairs whose KV tile holds padded slots become PARTIAL: Flex skips the
    mask_mod on FULL blocks, and only the mask_mod masks padding."""
    if not k_map.padded:
        return sched
    h, qi, ki, full = sched.pairs()
    padded = sched.kv_tile_tokens()[ki] < math.prod(sched.kv_tile)
    return TileSchedule.from_pairs(sched.q_extents, sched.kv_extents, sched.q_tile, sched.kv_tile, sched.num_heads,
                                   sched.heads_stored, h, qi, ki, full & ~padded, sched.allowed_pairs, sched.exact,
                                   sched.density_exact)


def block_mask_of(sched: TileSchedule, mask_mod, q_len: int, k_len: int, device, batch: int = 1,
                  block_size: tuple[int, int] | None = None):
    """Flex's BlockMask from attnc's tile lists: PARTIAL lists as ``kv_indices``,
    FULL lists as ``full_kv_indices``; broadcast over the batch (``batch`` 1) and
    over heads when the mask does not depend on the head. Routed schedules hold
    one list class per (batch element, head): ``batch`` > 1 splits them."""
    from torch.nn.attention.flex_attention import BlockMask

    nk = sched.num_kv_tiles
    classes = sched.heads_stored

    def dense_width(count, index):
        # Flex reads the last dimension of the indices as the number of KV blocks
        out = torch.zeros(*index.shape[:2], nk, dtype=torch.int32)
        w = index.shape[-1]
        out[..., :w] = index.clamp(min=0)
        shape = (batch, classes // batch)
        return count.to(torch.int32).view(*shape, -1).to(device), out.view(*shape, *out.shape[1:]).to(device)

    kv_num, kv_idx = dense_width(sched.partial_count, sched.partial_index)
    full_num, full_idx = dense_width(sched.full_count, sched.full_index)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                    BLOCK_SIZE=block_size or (math.prod(sched.q_tile), math.prod(sched.kv_tile)),
                                    mask_mod=mask_mod, seq_lengths=(q_len, k_len))
