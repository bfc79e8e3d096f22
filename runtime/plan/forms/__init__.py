"""The routing forms, one module each (``base.RouteForm``), and the one place a route's form is looked up.

Adding a form: write its module here (``FORM``: how it matches an ``ir.Route``, its selection on the host and on
the device, what it refuses), add it to ``FORMS``, and give the checker the clause that lowers to it (CONTRIBUTING.md)."""

from __future__ import annotations

from ....core import ir
from ....core.errors import SpecError
from . import (
    given_selection,
    stripes_by_anchor,
    top_k_blocks,
    top_k_tokens,
    top_p_antidiagonal,
    top_p_share,
)
from .base import RouteForm

#: Every form, asked in this order (a given selection first: it keeps the blocks of the route it stands for;
#: stripes before top-k tokens: both select single keys; top-k blocks last: any other route with a K)
FORMS: tuple[RouteForm, ...] = (given_selection.FORM, top_p_antidiagonal.FORM, top_p_share.FORM,
                                stripes_by_anchor.FORM, top_k_tokens.FORM, top_k_blocks.FORM)


def form_of(route: ir.Route) -> RouteForm:
    """The form of ``route``."""
    for form in FORMS:
        if form.matches(route):
            return form
    raise AssertionError(f"no routing form matches {route}")  # the checker lowers only to these


def refuse_query_offset(pat, where: str = "argument k") -> None:
    """Refuse queries after a KV cache (``nk > n``) where the route's form selects across queries, naming
    ``where`` (a call's ``k``; a decode step's simulation its ``nk``)."""
    route = getattr(pat, "route", None)
    why = None if route is None else form_of(route).decode_refusal(pat)  # None: selected per query
    if why is not None:
        raise SpecError(why, where=where, hint="call with all the queries (nk == n)")


def refuse_context_parallel(pat, where: str) -> None:
    """Refuse a pattern whose route context parallelism does not run, naming ``where``."""
    route = getattr(pat, "route", None)
    why = None if route is None else form_of(route).context_parallel_refusal(pat)
    if why is not None:
        raise SpecError(why, where=where, hint="run it on one device")
