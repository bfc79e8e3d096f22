"""Queries after a KV cache (``nk > n``: the last n of nk tokens) on a runner that has no query
offset of its own (``Support.query_offset == "padded"``): the whole sequence runs with zero queries
in front, and the last n rows are returned. Exactly the definition (spec/REFERENCE.md); nk x nk
work; differentiable. A route that scores blocks of queries is refused (``check_padding``).

Eagerly the runner's own autograd differentiates the padded call (``padded_forward``); a call
traced by ``torch.compile`` runs the runner's op forward and backward on the padded rows
(``padded_traced_forward`` / ``padded_traced_backward``)."""

from __future__ import annotations

import dataclasses

import torch

from ...compiler import evaluate as E
from ...core.errors import SpecError


def check_padding(pat) -> None:
    """Refuse queries after a KV cache where zero queries in front would change the answer: a route that
    scores blocks of queries would score the zeros too."""
    route = getattr(pat, "route", None)
    if route is None or route.score == "token":
        return
    if route.score == "antidiagonal":
        why = (f"'{pat.name}' selects blocks by antidiagonal scoring over every query of a block: "
               "queries after a KV cache (nk > n) are not supported")
    else:
        why = (f"'{pat.name}' routes by the mean of query blocks, which needs every query of a "
               "block: queries after a KV cache (nk > n) are not supported")
    raise SpecError(why, where="argument k", hint="call with all the queries (nk == n)")


def whole_bound(pat, bound: E.Bound, head_dim: int) -> E.Bound:
    """The bound of the whole sequence (nk queries and keys) of a call with ``bound.q_offset`` > 0."""
    return E.bind_sizes(pat, n=bound.nk, nk=bound.nk, heads=bound.heads, sizes=bound.axis_sizes, dk=head_dim)


def _padded(x: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` with ``rows`` rows of ``fill`` in front along the token dimension (dim 2)."""
    pad = x.new_full((*x.shape[:2], rows, *x.shape[3:]), fill)
    return torch.cat([pad, x], dim=2)


def padded_forward(runner, call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``runner.forward`` of ``call`` (whose ``bound.q_offset`` > 0) through zero queries in front."""
    check_padding(runner.pattern)
    bound = call.bound
    full = whole_bound(runner.pattern, bound, q.shape[-1])
    out, lse = runner.forward(dataclasses.replace(call, bound=full), _padded(q, bound.q_offset), k, v)
    return out[:, :, bound.q_offset:], lse[:, :, bound.q_offset:]


def padded_traced_forward(runner, bound: E.Bound, q, k, v, inputs: dict, scale: float):
    """``runner.traced_forward`` (no autograd) of a call with ``bound.q_offset`` > 0, through zero queries
    in front."""
    check_padding(runner.pattern)
    full = whole_bound(runner.pattern, bound, q.shape[-1])
    out, lse = runner.traced_forward(full, _padded(q, bound.q_offset), k, v, inputs, scale)
    return out[:, :, bound.q_offset:], lse[:, :, bound.q_offset:]


def padded_traced_backward(runner, bound: E.Bound, q, k, v, out, lse, dout, dlse, inputs: dict, scale: float,
                           wrt: list[str]):
    """``runner.traced_backward`` of ``padded_traced_forward``. The padded rows take no output gradient,
    and their lse is +inf so that their probabilities are exactly 0: they add nothing to dk, dv or an
    input's gradient (a finite lse could overflow exp(s - lse) to inf, and inf * 0 is NaN)."""
    off = bound.q_offset
    full = whole_bound(runner.pattern, bound, q.shape[-1])
    dq, dk, dv, d_in = runner.traced_backward(
        full, _padded(q, off), k, v, _padded(out, off), _padded(lse, off, float("inf")), _padded(dout, off),
        None if dlse is None else _padded(dlse, off), inputs, scale, wrt)
    return dq[:, :, off:], dk, dv, d_in
