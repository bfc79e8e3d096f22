"""What the tiled runners share when planning: a bounded plan cache, the ranking schedules of
candidate tiles, and the names of the inputs a mask reads."""

from __future__ import annotations

from collections import OrderedDict

import torch

from ...compiler.analysis import evaluate as E
from ...core import ir


def mask_uses_inputs(pat: ir.PatternIR) -> bool:
    return bool(mask_input_names(pat))


def mask_input_names(pat: ir.PatternIR) -> set[str]:
    """The call-time inputs the mask reads."""
    return set(E.input_names(pat.mask))


def score_input_names(pat: ir.PatternIR) -> set[str]:
    """The call-time inputs the score terms read (the bias's, FoX's gate): those a backward differentiates
    (a mask's, a route's indexer, are not)."""
    names = set(E.input_names(pat.bias)) if pat.bias is not None else set()
    # relative(E, r)'s table is computed from E at every call: E is differentiated through it
    names |= {d.derived[2] for d in pat.inputs if d.name in names and d.derived is not None and d.derived[0] == "relative"}
    return names | ({pat.decay} if pat.decay is not None else set())


def block_key(bound: E.Bound) -> tuple:
    """What a context-parallel block's plan depends on besides the mask's inputs: the grid sizes, heads,
    and both offsets and row counts."""
    return (tuple(sorted(bound.axis_sizes.items())), bound.heads, bound.q_offset, bound.n, bound.k_offset,
            bound.nk)


def same_tensors(a: dict, b: dict) -> bool:
    """Two dicts of tensors with the same names, shapes, dtypes and values (a plan cached for a mask's
    inputs serves only the same inputs)."""
    return a.keys() == b.keys() and all(
        a[n].shape == t.shape and a[n].dtype == t.dtype and torch.equal(a[n], t) for n, t in b.items())


def ranked_schedule(classified: dict | None, key: tuple):
    """A schedule to rank the tiles ``key`` = (q_tile, kv_tile, flat) by, from ``classified``
    (``CpuRunner.schedules_for``): the exact one where classified, else a ranking one (a bounded
    refinement, stored under ``("ranked", *key)`` by the executor's and the Flex lowering's
    rankings, which compare the same candidates); None when neither is there."""
    if classified is None:
        return None
    exact = classified.get(key)
    return exact if exact is not None else classified.get(("ranked", *key))


#: Plans a ``CpuRunner`` keeps (least recently used dropped first): one per (sizes, n, nk,
#: heads); a decoding loop makes one per step. ``CpuRunner.max_plans`` overrides it per module.
PLAN_CACHE_SIZE = 64


class PlanCache(OrderedDict):
    """A bounded LRU mapping: a lookup refreshes an entry, an insert beyond ``limit`` drops the oldest."""

    def __init__(self, limit: int = PLAN_CACHE_SIZE):
        super().__init__()
        self.limit = limit

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def get(self, key, default=None):
        try:  # one lookup and the refresh (a warm call's path: ``in`` then ``[]`` looked the key up twice)
            value = OrderedDict.__getitem__(self, key)
        except KeyError:
            return default
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        self.trim()

    def trim(self) -> None:
        while len(self) > max(1, self.limit):
            self.popitem(last=False)
