"""``TileSchedule``: per Q tile, the KV tiles to visit, split into FULL (no
masking needed) and PARTIAL, plus the transposed lists for the backward pass.

The one small, explicit structure the simulator, the CPU executor and the
Triton kernels all read (the role of FlexAttention's BlockMask). Tiles are
boxes in the token grid: one extent per layout axis; a tile's flat index is
row-major over the tile grid; edge tiles may hold fewer tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def block_size(slots: int) -> int:
    """The power-of-two block holding a tile's slots (at least 16, what tl.dot needs): the BLOCK_M / BLOCK_N
    the Triton kernels run a tile of ``slots`` tokens at, and the cost model costs it at."""
    return max(16, 1 << (max(1, slots) - 1).bit_length())


def tile_grid(extents: tuple[int, ...], tile: tuple[int, ...]) -> tuple[int, ...]:
    """Number of tiles per axis."""
    return tuple(-(-L // t) for L, t in zip(extents, tile, strict=True))


def uniform_axes(extents: tuple[int, ...], tile: tuple[int, ...], layout_axes) -> frozenset[int]:
    """The grid axes (of ``layout_axes``, the pattern's grid) whose coordinate is one value over
    every valid token of each tile: box tiles of extent 1 along the axis, or flat tiles whose size
    divides the axis's stride (each tile inside one row, one frame). Kernels hold these coordinates
    as scalars, so a mask term of them alone (radial's frame distance, its bit_length and band) is
    computed once per tile pair, not per score; ``symbols.per_pair`` tells such terms apart."""
    if not len(layout_axes) or math.prod(tile) <= 1:
        return frozenset()
    if len(extents) > 1:
        return frozenset(a for a, t in enumerate(tile) if t == 1 and a < len(layout_axes))
    return frozenset(i for i in range(len(layout_axes)) if math.prod(layout_axes[i + 1:]) % tile[0] == 0)


def tile_token_counts(extents: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Tokens in each tile (row-major flat tile index), int64 ``[num_tiles]``."""
    counts = torch.ones(1, dtype=torch.int64)
    for L, t in zip(extents, tile, strict=True):
        g = -(-L // t)
        per_axis = torch.full((g,), t, dtype=torch.int64)
        per_axis[-1] = L - t * (g - 1)
        counts = (counts[:, None] * per_axis[None, :]).reshape(-1)
    return counts


def tile_axes(extents: tuple[int, ...], tile: tuple[int, ...], tiles: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per grid axis, the coordinates of the given tiles' slots along it, padded: (``[P, t]`` int64,
    valid ``[P, t]`` bool); a tile's slots are their product, row-major."""
    grid = tile_grid(extents, tile)
    rest = tiles.to(torch.int64)
    coords = []
    for g in reversed(grid):
        coords.append(rest % g)
        rest = rest // g
    coords.reverse()
    out = []
    for c, L, t in zip(coords, extents, tile, strict=True):
        pos = c[:, None] * t + torch.arange(t)[None, :]  # [P, t]
        out.append((pos, pos < L))
    return out


def tile_tokens(extents: tuple[int, ...], tile: tuple[int, ...], tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices of the given tiles, padded: (``[P, prod(tile)]`` int64,
    valid ``[P, prod(tile)]`` bool)."""
    flat = torch.zeros(len(tiles), 1, dtype=torch.int64)
    valid = torch.ones(len(tiles), 1, dtype=torch.bool)
    for (pos, ok), L in zip(tile_axes(extents, tile, tiles), extents, strict=True):
        flat = (flat[:, :, None] * L + pos[:, None, :]).reshape(len(tiles), -1)
        valid = (valid[:, :, None] & ok[:, None, :]).reshape(len(tiles), -1)
    return flat, valid


def _padded_lists(owner: torch.Tensor, member: torch.Tensor, heads: torch.Tensor, n_heads: int, n_owner: int):
    """CSR-like (count ``[H, n_owner]``, index ``[H, n_owner, max]`` padded with -1)."""
    count = torch.zeros(n_heads, n_owner, dtype=torch.int32)
    if len(owner) == 0:
        return count, torch.full((n_heads, n_owner, 0), -1, dtype=torch.int32)
    key = heads.to(torch.int64) * n_owner + owner.to(torch.int64)
    order = torch.argsort(key * (int(member.max()) + 1) + member.to(torch.int64), stable=True)
    key, member = key[order], member[order]
    per = torch.bincount(key, minlength=n_heads * n_owner)
    count = per.view(n_heads, n_owner).to(torch.int32)
    width = int(per.max())
    start = torch.cumsum(per, 0) - per
    slot = torch.arange(len(key)) - start[key]
    index = torch.full((n_heads * n_owner, width), -1, dtype=torch.int32)
    index[key, slot] = member.to(torch.int32)
    return count, index.view(n_heads, n_owner, width)


class TileCounts:
    """Tile-pair counts over heads x Q tiles x KV tiles, shared by the listed schedule and the
    sampled summary: each supplies ``full_count``/``partial_count`` per stored head class, its extents and
    ``_over_heads`` to total them."""

    @property
    def full(self) -> int:
        return self._over_heads(self.full_count)

    @property
    def partial(self) -> int:
        return self._over_heads(self.partial_count)

    @property
    def empty(self) -> int:
        return self.num_heads * self.num_q_tiles * self.num_kv_tiles - self.full - self.partial

    @property
    def visited(self) -> int:
        return self.full + self.partial

    @property
    def heads_stored(self) -> int:
        return self.full_count.shape[0]

    @property
    def num_queries(self) -> int:
        return math.prod(self.q_extents)

    @property
    def num_keys(self) -> int:
        return math.prod(self.kv_extents)

    @property
    def total_pairs(self) -> int:
        """All (head, query, key) token pairs, exactly."""
        return self.num_heads * self.num_queries * self.num_keys


@dataclass
class TileSchedule(TileCounts):
    """Which (Q tile, KV tile) pairs to visit, per head.

    ``full_*``/``partial_*``: per head class (``[heads_stored, num_q_tiles]``
    counts, ``[..., max]`` indices padded with -1), sorted by KV tile.
    ``t_full_*``/``t_partial_*``: the same pairs per KV tile (backward).
    ``heads_stored`` is 1 when the mask does not depend on the head
    (the lists then serve every head) and ``num_heads`` otherwise.
    ``allowed_pairs[h]``: allowed (query, key) token pairs of head class h
    (exact when ``density_exact``). ``exact``: every PARTIAL pair has both an
    allowed and a masked token pair (not merely not proven FULL or EMPTY).
    """

    q_extents: tuple[int, ...]
    kv_extents: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    num_heads: int
    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    t_full_count: torch.Tensor
    t_full_index: torch.Tensor
    t_partial_count: torch.Tensor
    t_partial_index: torch.Tensor
    allowed_pairs: torch.Tensor
    exact: bool
    density_exact: bool

    @classmethod
    def from_pairs(
        cls,
        q_extents: tuple[int, ...],
        kv_extents: tuple[int, ...],
        q_tile: tuple[int, ...],
        kv_tile: tuple[int, ...],
        num_heads: int,
        heads_stored: int,
        head: torch.Tensor,
        q_index: torch.Tensor,
        kv_index: torch.Tensor,
        is_full: torch.Tensor,
        allowed_pairs: torch.Tensor,
        exact: bool,
        density_exact: bool,
    ) -> TileSchedule:
        """Build the lists from visited pairs (head class, Q tile, KV tile, FULL?)."""
        nq = math.prod(tile_grid(q_extents, q_tile))
        nk = math.prod(tile_grid(kv_extents, kv_tile))
        f, p = is_full, ~is_full
        fc, fi = _padded_lists(q_index[f], kv_index[f], head[f], heads_stored, nq)
        pc, pi = _padded_lists(q_index[p], kv_index[p], head[p], heads_stored, nq)
        tfc, tfi = _padded_lists(kv_index[f], q_index[f], head[f], heads_stored, nk)
        tpc, tpi = _padded_lists(kv_index[p], q_index[p], head[p], heads_stored, nk)
        return cls(q_extents, kv_extents, q_tile, kv_tile, num_heads, fc, fi, pc, pi, tfc, tfi, tpc, tpi,
                   allowed_pairs, exact, density_exact)

    # ------------------------------------------------------------ shape
    @property
    def q_grid(self) -> tuple[int, ...]:
        return tile_grid(self.q_extents, self.q_tile)

    @property
    def kv_grid(self) -> tuple[int, ...]:
        return tile_grid(self.kv_extents, self.kv_tile)

    @property
    def num_q_tiles(self) -> int:
        return self.full_count.shape[1]

    @property
    def num_kv_tiles(self) -> int:
        return self.t_full_count.shape[1]

    def q_tile_tokens(self) -> torch.Tensor:
        return tile_token_counts(self.q_extents, self.q_tile)

    def kv_tile_tokens(self) -> torch.Tensor:
        return tile_token_counts(self.kv_extents, self.kv_tile)

    # ------------------------------------------------------------ counts over heads x Q tiles x KV tiles
    def _over_heads(self, per_class: torch.Tensor) -> int:
        total = int(per_class.sum())
        return total * self.num_heads if self.heads_stored == 1 else total

    @property
    def allowed_total(self) -> int | float:
        """Allowed (head, query, key) token pairs: an exact int when ``density_exact``
        (summed as Python ints), else the float64 estimate."""
        per_class = self.allowed_pairs.to(torch.float64).tolist()
        factor = self.num_heads if self.heads_stored == 1 else 1
        if self.density_exact:
            return sum(int(round(x)) for x in per_class) * factor
        return math.fsum(per_class) * factor

    @property
    def density(self) -> float:
        """Allowed token pairs / all token pairs, over heads (exact counts divided
        once, in float64, when ``density_exact``)."""
        return self.allowed_total / self.total_pairs

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every visited pair: (head class, Q tile, KV tile, is FULL), sorted by head, Q tile, KV tile."""
        out = []
        for index, full in ((self.full_index, True), (self.partial_index, False)):
            h, qi, slot = torch.nonzero(index >= 0, as_tuple=True)
            out.append((h, qi, index[h, qi, slot].to(torch.int64), torch.full_like(h, full, dtype=torch.bool)))
        h = torch.cat([o[0] for o in out])
        qi = torch.cat([o[1] for o in out])
        ki = torch.cat([o[2] for o in out])
        full = torch.cat([o[3] for o in out])
        order = torch.argsort((h * self.num_q_tiles + qi) * self.num_kv_tiles + ki)
        return h[order], qi[order], ki[order], full[order]

    def runs(self) -> dict[str, bool]:
        """Which tile lists are each one run of consecutive tiles (``index[j] == index[0] + j``; the lists
        are sorted), by the kernels' list names: ``FULL``, ``PART``, ``T_FULL``, ``T_PART``. A kernel steps
        through a run with no index load in its loop (``compiler.codegen.triton.kernels.list_tile``). Asked of host
        lists: the Triton runner reads a route's (selected per call, on the GPU) by index without asking."""
        out = {}
        for name, count, index in (("FULL", self.full_count, self.full_index),
                                   ("PART", self.partial_count, self.partial_index),
                                   ("T_FULL", self.t_full_count, self.t_full_index),
                                   ("T_PART", self.t_partial_count, self.t_partial_index)):
            step = torch.arange(index.shape[-1])
            live = step < count[..., None]
            out[name] = bool(((index[..., :1] + step == index) | ~live).all())
        return out

    def classes(self) -> torch.Tensor:
        """Dense class map ``[heads_stored, num_q_tiles, num_kv_tiles]``: 0 EMPTY, 1 PARTIAL, 2 FULL
        (for tests and pictures; O(tiles^2))."""
        out = torch.zeros(self.heads_stored, self.num_q_tiles, self.num_kv_tiles, dtype=torch.int8)
        h, qi, ki, full = self.pairs()
        out[h, qi, ki] = torch.where(full, 2, 1).to(torch.int8)
        return out

    def describe(self) -> str:
        return (f"TileSchedule(q_tile={self.q_tile}, kv_tile={self.kv_tile}, tiles {self.num_q_tiles} x "
                f"{self.num_kv_tiles} x {self.num_heads} heads: full {self.full}, partial {self.partial}, "
                f"empty {self.empty})")
