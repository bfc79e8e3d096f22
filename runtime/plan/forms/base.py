"""A routing form: how the routes of one kind select, on the host and on the device, and what they cannot serve.

Every form is one module of this package holding one ``RouteForm`` (``FORM``), registered in ``forms.FORMS``; the
selection rule itself may live beside it (``plan/antidiagonal.py``, ``plan/share.py``) and the shared scores and
top-k choice in ``plan/route_scores.py``. The checker lowers a clause to an ``ir.Route`` whose fields say its form
(``matches``); ``routing._select`` (host, reference), ``device_routes.route_call_plan`` (device),
``forms.refuse_query_offset`` and ``refuse_context_parallel`` ask the form, never the fields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ....core import ir


def _serves(_pat: ir.PatternIR) -> str | None:
    return None


@dataclass(frozen=True)
class RouteForm:
    """One routing form (see the module docstring)."""

    name: str
    #: whether a route is of this form (``forms.form_of`` asks the forms in ``FORMS``' order)
    matches: Callable[[ir.Route], bool]
    #: ``(pat, bound, q, k, inputs, allowed) -> (selected [B | 1, Hq, Nq, nblocks] bool, key_block (CPU), nblocks)``:
    #: the call's selection on q's device, ``allowed(key_block, nblocks, dtype)`` the blocks the mask lets each
    #: query reach (densely for the reference, over the schedule's tiles for the executor); not differentiated
    select: Callable[..., tuple[torch.Tensor, torch.Tensor, int]]
    #: ``(pat, bound, q, k, tensors, c) -> selected``: the same on the device with no host read, ``c`` the plan's
    #: ``device_routes.Constants``
    select_on_device: Callable[..., torch.Tensor]
    #: why queries after a KV cache (``nk > n``) are refused, or None where each query selects alone
    decode_refusal: Callable[[ir.PatternIR], str | None] = _serves
    #: why context parallelism refuses the route, or None where it gathers what the selection reads
    context_parallel_refusal: Callable[[ir.PatternIR], str | None] = _serves
    #: ``(plan, allowed, keep, block) -> dict``: what the form's device selection reads besides the common
    #: constants, made once per plan (``Constants.extras``); None: nothing
    device_extras: Callable[..., dict] | None = None
