"""A routing form: how the routes of one kind select, on the host and on the device, and what they cannot serve.

Every form is one module of this package holding one ``RouteForm`` (``FORM``), registered in ``forms.FORMS`` under
the name of the route kind it implements (``core.route_kinds``: the kind's facts, the form its selection); the
selection rule itself may live beside it (``plan/antidiagonal.py``, ``plan/share.py``) and the shared scores and
top-k choice in ``plan/route_scores.py``. ``routing._select`` (host, reference), ``device_routes.route_call_plan``
(device), ``forms.refuse_query_offset`` and ``refuse_context_parallel`` ask the form of the route's kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ....core import ir, route_kinds


def serves(_pat: ir.PatternIR) -> str | None:
    """A form's answer where it serves the case: no refusal."""
    return None


def _unless_per_query(pat: ir.PatternIR) -> str | None:
    """A kind's decode refusal by its facts: a query that selects alone decodes as the whole call selects."""
    if pat.route.per_query:
        return None
    return (f"'{pat.name}' selects its {route_kinds.kind_of(pat.route).title} across queries, which needs every "
            "query of the call: queries after a KV cache (nk > n) are not supported")


def _no_context_parallel(pat: ir.PatternIR) -> str:
    """A kind's context-parallel refusal where its form says nothing: its selection is written for one device."""
    return (f"'{pat.name}' routes by {route_kinds.kind_of(pat.route).title}, which context parallelism does not run: "
            "the form selects on one device")


@dataclass(frozen=True)
class RouteForm:
    """One routing form (see the module docstring)."""

    #: the route kind it implements (``core.route_kinds.KINDS``)
    kind: str
    #: ``(pat, bound, q, k, inputs, allowed) -> (selected [B | 1, Hq, Nq, nblocks] bool, key_block (CPU), nblocks)``:
    #: the call's selection on q's device, ``allowed(key_block, nblocks, dtype)`` the blocks the mask lets each
    #: query reach (densely for the reference, over the schedule's tiles for the executor); not differentiated
    select: Callable[..., tuple[torch.Tensor, torch.Tensor, int]]
    #: ``(pat, bound, q, k, tensors, c) -> selected``: the same on the device with no host read, ``c`` the plan's
    #: ``device_routes.Constants``; None: the kind selects on the host only (``select``)
    select_on_device: Callable[..., torch.Tensor] | None = None
    #: why queries after a KV cache (``nk > n``) are refused, or None where it selects them (default: by the kind's
    #: ``per_query``)
    decode_refusal: Callable[[ir.PatternIR], str | None] = _unless_per_query
    #: why context parallelism refuses the route, or None (``serves``) where ``parallel.routing`` runs it, which
    #: holds for top-k routes only (default: refused)
    context_parallel_refusal: Callable[[ir.PatternIR], str | None] = _no_context_parallel
    #: ``(plan, allowed, keep, block) -> dict``: what the form's device selection reads besides the common
    #: constants, made once per plan (``Constants.extras``); None: nothing
    device_extras: Callable[..., dict] | None = None
