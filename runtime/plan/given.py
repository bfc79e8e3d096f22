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

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.route_blocks import block_count
from ...core import ir
from ...core import symbols as S

#: The input a given selection is passed in (``float[heads, nq, blocks]``, a leading batch dimension optional)
SELECTION = "selection"


@functools.lru_cache(maxsize=64)
def given_pattern(pat: ir.PatternIR) -> ir.PatternIR:
    """``pat`` with its route's selection read from the input ``SELECTION`` (the module docstring). The inputs
    only the route read (an indexer's, its keep's) are not asked for: a given selection needs none of them."""
    nblocks = block_count(pat.keys, pat.route.block)
    decl = ir.InputDecl(SELECTION, "float", (S.HEADS, S.NQ, nblocks), ("heads", "nq", "blocks"))
    route = ir.top_k_route(nblocks, pat.route.block, "token", None, scores=SELECTION, given=True)
    read = set(E.input_names(pat.mask)) | (set(E.input_names(pat.bias)) if pat.bias is not None else set())
    read |= {pat.decay} if pat.decay is not None else set()
    kept = tuple(d for d in pat.inputs if d.name in read)
    return dataclasses.replace(pat, route=route, inputs=(*kept, decl))


def route_only_inputs(pat: ir.PatternIR) -> set[str]:
    """The inputs of ``pat`` that a given selection makes unneeded (``given_pattern`` does not ask for them)."""
    return {d.name for d in pat.inputs} - {d.name for d in given_pattern(pat).inputs}


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
