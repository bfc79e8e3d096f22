"""A route's selection kept across calls (issue 44, item 4: SparseD's, Recycled Attention's and any refresh
schedule's reuse): a call can return the selection it made (``return_selection=True``) and a later call can
take one (``selection=``) instead of scoring and choosing again.

- ``given_pattern``: the pattern a call with ``selection=`` runs: the same mask and blocks, its route reading
  the selection from an input ``selection`` ``float[heads, nq, blocks]`` (selected where > 0) instead of
  choosing; ``routing._select`` and ``device_routes._select_blocks`` keep the selected blocks the mask lets a
  query reach. Every backend and path that serves given route scores (``by probs(BRANCH)``) serves it.
- ``recording``: the selections a forward makes (``routing._select`` on the host, ``device_routes`` on the
  device) recorded for ``return_selection`` while it is open.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import sympy
import torch

from ...core import ir
from ...core import symbols as S

#: The input a given selection is passed in (``float[heads, nq, blocks]``, a leading batch dimension optional)
SELECTION = "selection"


def block_count(pat: ir.PatternIR) -> sympy.Expr:
    """The number of key blocks of ``pat``'s route, an expression of the sizes (``compiler.route_blocks.block_ids``'s
    count: runs of a sequence, or tiles of a grid, the last ones possibly smaller)."""
    route = pat.route
    if pat.keys.kind == "seq" or not pat.keys.axes:
        return -sympy.floor(-S.NK / route.block[0])
    count = sympy.Integer(1)
    for (_, extent), size in zip(pat.keys.axes, route.block, strict=True):
        count *= -sympy.floor(-extent / size)
    return count


@functools.lru_cache(maxsize=64)
def given_pattern(pat: ir.PatternIR) -> ir.PatternIR:
    """``pat`` with its route's selection read from the input ``SELECTION`` (the module docstring)."""
    nblocks = block_count(pat)
    decl = ir.InputDecl(SELECTION, "float", (S.HEADS, S.NQ, nblocks), ("heads", "nq", "blocks"))
    route = ir.Route(nblocks, pat.route.block, "token", None, False, scores=SELECTION, given=True)
    return dataclasses.replace(pat, route=route, inputs=(*pat.inputs, decl))


_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("attnc_route_selection", default=None)


@contextlib.contextmanager
def recording():
    """Record the selections made while open: yields the list they are appended to, in order."""
    made: list[torch.Tensor] = []
    token = _RECORD.set(made)
    try:
        yield made
    finally:
        _RECORD.reset(token)


def record(selected: torch.Tensor) -> torch.Tensor:
    """Note ``selected`` (``[B | 1, Hq, Nq, nblocks]``) where a ``recording`` is open; returns it."""
    made = _RECORD.get()
    if made is not None:
        made.append(selected)
    return selected
