"""The routing forms, one module each (``base.RouteForm``): the selection of each route kind (``core.route_kinds``)
on the host and on the device, and what it refuses; the one place a route's form is looked up.

Adding a kind: its facts in ``core.route_kinds`` (``register``), its form here (a module holding ``FORM``, added to
``FORMS``, or ``register`` from anywhere), CONTRIBUTING.md."""

from __future__ import annotations

from ....core import ir, route_kinds
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

#: Every form by the name of its route kind.
FORMS: dict[str, RouteForm] = {form.kind: form for form in (
    given_selection.FORM, top_p_antidiagonal.FORM, top_p_share.FORM, stripes_by_anchor.FORM, top_k_tokens.FORM,
    top_k_blocks.FORM)}


def register(form: RouteForm) -> RouteForm:
    """Add the form of a kind registered in ``core.route_kinds`` (a name already taken is refused)."""
    if form.kind not in route_kinds.KINDS:
        raise ValueError(f"no route kind '{form.kind}' is registered (core.route_kinds.register it first)")
    return route_kinds.add_entry(FORMS, form.kind, form, f"the route kind '{form.kind}' has a form already")


def unregister(kind: str) -> None:
    """Remove a form added by ``register`` (a test's)."""
    FORMS.pop(kind, None)


def form_of(route: ir.Route) -> RouteForm:
    """The form of ``route``'s kind."""
    form = FORMS.get(route.kind)
    if form is None:
        raise SpecError(f"the route kind '{route.kind}' has no selection registered", where="route",
                        hint="register its RouteForm (runtime.plan.forms.register)")
    return form


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
