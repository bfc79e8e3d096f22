"""What ``q_tile`` / ``kv_tile`` mean: one convention for every backend (cpu,
triton), the simulator and the CLI (``--q-tile``/``--kv-tile``).

- A tile is a positive int or a tuple (or list) of positive ints (numpy ints too).
- On a ``seq`` layout it is the number of tokens per tile: ``64`` or ``(64,)``.
- On a grid of r axes, r extents are a box (``(2, 8, 8)``, one per axis in
  the layout's order); one extent (``64`` or ``(64,)``) is a flat tile: that
  many consecutive tokens of the row-major token order.
- Flat tiles on a grid tile the pattern's flat view, so the other side is
  then flat as well (one extent): a box is never paired with a flat grid tile.
- Given only one of the two, the other takes the same value when it fits the
  other layout (one extent, or as many as its axes).
- Extents beyond an axis (or beyond the token count) are clipped at the call.

``parse_tiles`` checks all of this when a module is compiled (the sizes may
be unknown then); ``Tiles.fit`` clips to the extents once they are known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...core import ir
from ...core.errors import SpecError
from .evaluate import positive_int


def layout_rank(layout: ir.Layout) -> int:
    """Axes of a layout: 1 for ``seq``."""
    return len(layout.axes) if layout.kind == "grid" else 1


@dataclass(frozen=True)
class Tiles:
    """Checked tile arguments of one pattern (None: chosen by the backend)."""

    q: tuple[int, ...] | None
    kv: tuple[int, ...] | None
    #: one-extent tiles on a grid: tiles of the flat token order (the flat view)
    flat: bool = False

    @property
    def forced(self) -> bool:
        return self.q is not None

    def fit(self, q_extents: tuple[int, ...], kv_extents: tuple[int, ...]
            ) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
        """(Q tile, KV tile, flat) for these layout extents, each extent clipped to its
        axis; with ``flat`` the extents are those of the flat view (token counts)."""
        if self.q is None or self.kv is None:
            raise ValueError("no forced tiles to fit")
        if self.flat:
            q_extents, kv_extents = (math.prod(q_extents),), (math.prod(kv_extents),)
        q = tuple(min(t, L) for t, L in zip(self.q, q_extents, strict=True))
        kv = tuple(min(t, L) for t, L in zip(self.kv, kv_extents, strict=True))
        return q, kv, self.flat


def _one(what: str, tile, rank: int, role: str) -> tuple[int, ...]:
    out = tuple(positive_int(what, t) for t in (tile if isinstance(tile, tuple | list) else (tile,)))
    if len(out) not in (1, rank):
        raise SpecError(f"the {role} are a {rank}-axis grid: give one extent per axis ({rank}) for box tiles, "
                        f"or one for flat tiles of the token order; got {len(out)}", where=f"argument {what}")
    return out


def parse_tiles(pat: ir.PatternIR, q_tile=None, kv_tile=None) -> Tiles:
    """Check ``q_tile``/``kv_tile`` against the pattern's layouts (see the module docstring)."""
    q_rank, kv_rank = layout_rank(pat.queries), layout_rank(pat.keys)
    q = None if q_tile is None else _one("q_tile", q_tile, q_rank, "queries")
    kv = None if kv_tile is None else _one("kv_tile", kv_tile, kv_rank, "keys")
    if q is None and kv is None:
        return Tiles(None, None)
    if kv is None:
        if len(q) not in (1, kv_rank):
            raise SpecError(f"kv_tile defaults to q_tile {q}, which does not fit the keys' {kv_rank}-axis layout",
                            where="argument kv_tile", hint="give kv_tile too")
        kv = q
    if q is None:
        if len(kv) not in (1, q_rank):
            raise SpecError(f"q_tile defaults to kv_tile {kv}, which does not fit the queries' {q_rank}-axis layout",
                            where="argument q_tile", hint="give q_tile too")
        q = kv
    flat_q, flat_kv = q_rank > 1 and len(q) == 1, kv_rank > 1 and len(kv) == 1
    if (flat_q and len(kv) != 1) or (flat_kv and len(q) != 1):
        box, what = ("kv_tile", kv) if flat_q else ("q_tile", q)
        raise SpecError(f"a flat tile on a grid tiles the flat token order, so the other side is flat too; "
                        f"got the box {what}", where=f"argument {box}",
                        hint="give one extent on both sides, or a box (one extent per axis) on both")
    return Tiles(q, kv, flat_q or flat_kv)
