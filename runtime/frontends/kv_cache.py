"""Queries after a KV cache (``nk > n``: the last n of nk tokens) on a runner that has no query
offset of its own (``Support.query_offset == "padded"``): the whole sequence runs with zero queries
in front, and the last n rows are returned. Exactly the definition (spec/REFERENCE.md); nk x nk
work; differentiable."""

from __future__ import annotations

import dataclasses

import torch

from ...compiler import evaluate as E
from ...core.errors import SpecError


def padded_forward(runner, call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``runner.forward`` of ``call`` (whose ``bound.q_offset`` > 0) through zero queries in front."""
    pat = runner.pattern
    bound = call.bound
    route = getattr(pat, "route", None)
    if route is not None and route.score == "antidiagonal":
        raise SpecError(f"'{pat.name}' selects blocks by antidiagonal scoring over every query of a block: "
                        "queries after a KV cache (nk > n) are not supported", where="argument k",
                        hint="call with all the queries (nk == n)")
    if route is not None and route.score != "token":
        raise SpecError(f"'{pat.name}' routes by the mean of query blocks, which needs every query of a "
                        "block: queries after a KV cache (nk > n) are not supported", where="argument k",
                        hint="call with all the queries (nk == n)")
    full = E.bind_sizes(pat, n=bound.nk, nk=bound.nk, heads=bound.heads, sizes=bound.axis_sizes, dk=q.shape[-1])
    pad = q.new_zeros(q.shape[0], q.shape[1], bound.q_offset, q.shape[3])
    out, lse = runner.forward(dataclasses.replace(call, bound=full), torch.cat([pad, q], dim=2), k, v)
    return out[:, :, bound.q_offset:], lse[:, :, bound.q_offset:]
