"""Tiles as the kernels address them: the schedule's shape (tile grids, tile extents, BLOCK sizes)
and the lines that give every slot of a tile its token, grid coordinates, validity and memory row.

A tile index and a slot give the token's grid coordinates by integer arithmetic with literal
extents (``address`` and ``flat`` layouts), or the host permutes q/k/v into tile order beforehand
(``permute`` layout) and only the memory row changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ....core import ir
from ...analysis import evaluate as E
from ...analysis.schedule import block_size, tile_grid


@dataclass(frozen=True)
class ScheduleShape:
    """The shape of a tile schedule as the kernels see it: tile grids (extents
    tiled, one per tile axis) and tile extents. One tile axis on a grid layout
    means flat tiles of the row-major token order."""

    q_extents: tuple[int, ...]
    kv_extents: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]

    @classmethod
    def of(cls, schedule) -> ScheduleShape:
        return cls(tuple(schedule.q_extents), tuple(schedule.kv_extents), tuple(schedule.q_tile),
                   tuple(schedule.kv_tile))

    @property
    def q_slots(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_slots(self) -> int:
        return math.prod(self.kv_tile)

    @property
    def block_m(self) -> int:
        return block_size(self.q_slots)

    @property
    def block_n(self) -> int:
        return block_size(self.kv_slots)


def layout_of(config) -> str:
    """The token layout of a kernel config: 'flat', 'address' (the default) or 'permute'."""
    return getattr(config, "layout", "address") if config is not None else "address"


def edge_padded(extents, tile) -> bool:
    """Whether only the tiles at the grid's far edges have padded slots: some extent is not a multiple of
    its tile, and a tile's slots fill its power-of-two block (else every tile has padded slots)."""
    return block_size(math.prod(tile)) == math.prod(tile) and any(L % t for L, t in zip(extents, tile, strict=True))


def tile_coordinate(tile_var: str, axis: int, grid: tuple[int, ...]) -> str:
    """The coordinate along ``axis`` of tile ``tile_var`` in its tile ``grid`` (tiles in row-major order)."""
    g_stride = math.prod(grid[axis + 1:])
    tc = f"({tile_var} // {g_stride})" if g_stride > 1 else tile_var
    return f"({tc} % {grid[axis]})" if axis > 0 else tc


def box_tile(extents, tile, permuted: bool) -> tuple[int, ...]:
    """The box a tensor descriptor loads a tile as (``KernelConfig.tma``): on a grid in token order (the
    ``address`` layout), the tile itself, a box of the grid's axes (TMA reads 0 past the grid's edge, as the
    masked pointer loads do); otherwise its run of memory rows (1-D tiles, or tiles permuted into tile order)."""
    if len(extents) > 1 and not permuted:
        return tuple(tile)
    return (math.prod(tile),)


def boxes_are_rows(shape: ScheduleShape, layout: str) -> bool:
    """Whether both Q and KV tiles of ``shape`` load as runs of memory rows (``box_tile``), as the descriptors that
    Hopper's one-loop forward makes in the kernel span them."""
    permuted = layout == "permute"
    return (len(box_tile(shape.q_extents, shape.q_tile, permuted)) == 1
            and len(box_tile(shape.kv_extents, shape.kv_tile, permuted)) == 1)


def box_coordinates(tile_var: str, extents, tile, permuted: bool, block: str, head: str, heads: str) -> str:
    """The descriptor coordinates of tile ``tile_var``'s box (``box_tile``), the head dim's 0 last, for ``head`` of
    ``heads`` heads: ``batch, head, first row`` in a ``[B, H, rows, d]`` tensor, ``batch, head`` and the box's
    origin on a 2-D grid (``[B, H, Y, X, d]``); on a 3-D grid batch and head merged in one dimension
    (``[B * H, T, Y, X, d]``: a descriptor has at most 5)."""
    if len(box_tile(extents, tile, permuted)) == 1:
        return f"batch, {head}, {tile_var} * {block}, 0"
    grid = tile_grid(extents, tile)
    origin = [f"{tile_coordinate(tile_var, a, grid)} * {t}" for a, t in enumerate(tile)]
    lead = [f"batch, {head}"] if len(tile) == 2 else [f"batch * {heads} + {head}"]
    return ", ".join([*lead, *origin, "0"])


def tile_code(role: str, tile_var: str, extents, tile, layout_axes: list[int], permuted: bool, block: str,
               wide: bool, uniform: frozenset[int], offset: str | None = None, edge: bool = False,
               extent: str | None = None) -> list[str]:
    """Lines computing, for tile ``tile_var`` of ``role`` ('q' or 'k'): the flat token
    ``{role}_tok``, grid coordinates ``{role}_c{i}`` (scalars on ``uniform_axes``), validity
    ``{role}_ok`` and the memory row ``{role}_row`` of every slot. ``offset``: the name of the
    runtime argument that makes a block's rows absolute positions (1-D tiles of a block of a longer
    sequence; the memory rows stay the block's). ``edge`` (where ``edge_padded``): also the scalar
    ``{role}_edge``, whether this tile is one with padded slots (last along an axis its tiles overrun).
    ``extent``: the name of the runtime argument holding the rows (a block's: ``Q_EXT``, ``K_EXT``), in place of
    ``extents``' value, so that one module serves every length (a decode step's cache grows by a key a step)."""
    if offset is not None and (len(extents) != 1 or permuted or uniform):
        raise ValueError("a block's tiles are 1-D runs of its rows, in memory order, with no uniform axis")
    r = role
    slots = math.prod(tile)
    grid = tile_grid(extents, tile)
    sl = f"{r}_slot"  # per role: a loop may not rebind a variable of another shape
    lines = [f"{sl} = tl.arange(0, {block})"]
    if extent is not None and len(extents) != 1:
        raise ValueError("rows given at run time are 1-D runs")
    if len(extents) == 1:
        lines.append(f"{r}_tok = {tile_var} * {tile[0]} + {sl}")
        ok = [f"({sl} < {slots})"] if block_size(slots) != slots else []
        if extent is not None:  # any length: every tile may be the last, part-filled one
            ok.append(f"({r}_tok < {extent})")
        elif extents[0] % tile[0]:
            ok.append(f"({r}_tok < {extents[0]})")
        lines.append(f"{r}_ok = " + (" & ".join(ok) if ok else f"{sl} < {block}"))
        edges = [f"({tile_var} == ({extent} - 1) // {tile[0]})" if extent is not None else
                 f"({tile_var} == {grid[0] - 1})"]
    else:
        lines.append(f"# tile coordinates in the tile grid {tuple(grid)}, slot coordinates in the tile {tuple(tile)}")
        ok = [f"({sl} < {slots})"] if block_size(slots) != slots else []
        edges = []
        flat_terms = []
        for a, (L, t) in enumerate(zip(extents, tile, strict=True)):
            s_stride = math.prod(tile[a + 1:])
            tc = tile_coordinate(tile_var, a, grid)
            sc = f"({sl} // {s_stride})" if s_stride > 1 else sl
            sc = f"({sc} % {t})" if a > 0 else sc
            lines.append(f"{r}_a{a} = {tc}  # one value per tile" if a in uniform else f"{r}_a{a} = {tc} * {t} + {sc}")
            if L % t:
                ok.append(f"({r}_a{a} < {L})")
                edges.append(f"({tc} == {grid[a] - 1})")
            flat_terms.append((f"{r}_a{a}", math.prod(extents[a + 1:])))
        lines.append(f"{r}_ok = " + (" & ".join(ok) if ok else f"{sl} < {block}"))
        lines.append(f"{r}_tok = " + " + ".join(f"{v} * {s}" if s > 1 else v for v, s in flat_terms))
    if edge and (edge_padded(extents, tile) if extent is None else block_size(slots) == slots):
        lines.append(f"{r}_edge = " + " | ".join(edges) + "  # a tile with padded slots (the grid's far edge)")
    if permuted:
        lines.append(f"{r}_row = {tile_var} * {slots} + {sl}  # q/k/v were permuted into tile order on the host")
    else:
        lines.append(f"{r}_row = {r}_tok")
    if wide:
        lines.append(f"{r}_row = {r}_row.to(tl.int64)  # token offsets exceed int32 at these sizes")
    if offset is not None:
        lines.append(f"{r}_tok = {r}_tok + {offset}  # the block's rows -> absolute positions")
    # grid coordinates of the pattern's layout
    if len(layout_axes) and len(extents) == 1:
        stride = 1
        coords = []
        for i in reversed(range(len(layout_axes))):
            L = layout_axes[i]
            if i in uniform:  # the tile lies inside one stretch of `stride` tokens
                per = stride // tile[0]
                coords.append((i, f"({tile_var} // {per}) % {L}  # one value per tile" if per > 1 else
                               f"{tile_var} % {L}  # one value per tile"))
            else:
                coords.append((i, f"({r}_tok // {stride}) % {L}" if stride > 1 else f"{r}_tok % {L}"))
            stride *= L
        for i, text in sorted(coords):
            lines.append(f"{r}_c{i} = {text}")
    elif len(layout_axes):
        for a in range(len(layout_axes)):
            lines.append(f"{r}_c{a} = {r}_a{a}")
    return lines


def axis_extents(layout: ir.Layout, bound: E.Bound) -> list[int]:
    """The extents of a grid layout's axes at bound sizes (none for a sequence)."""
    if layout.kind == "seq":
        return []
    return [int(size.subs(bound.subs)) for _, size in layout.axes]
