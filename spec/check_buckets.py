"""Bucketed patterns: ``route buckets(WINDOW) by nearest(CENTROIDS)``, the Routing Transformer's balanced
clusters. The declaration without that clause is checked by the ordinary ``Checker`` as the attention within a
bucket; what is new is checked here and lowered to ``ir.BucketedIR``:

- the pattern is self-attention over one sequence (``tokens seq``): its buckets are chosen among the
  call's queries and among its keys;
- within a bucket it takes a mask of positions, heads and sizes (causal, a window), no other score term and
  no other route: the buckets are attended in torch (``runtime.bucketed``), where the mask is evaluated on
  the gathered positions;
- ``WINDOW`` is an int of the parameters and sizes (at least 1; at most n, checked per call);
- ``CENTROIDS`` names an input ``float[heads, CLUSTERS, dk]``, the pattern's only input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sympy

from ..core import ir
from ..core import symbols as S
from . import ast
from .check_types import INT
from .checker import Checker

#: The clauses a bucketed pattern takes besides its layout, parameters, lets and the centroids input.
BUCKET_CLAUSES = "tokens seq, mask"


def has_buckets(decl: ast.Declaration) -> bool:
    """Whether a declaration has a ``route buckets(...)`` clause (then ``lower_bucketed`` checks it)."""
    return any(isinstance(c, ast.BucketRoute) for c in decl.clauses)


def lower_bucketed(module: ast.Module, decl: ast.Declaration, params: dict,
                   resolve: Callable, strict: bool = True) -> ir.BucketedIR:
    """Check a declaration with ``route buckets(...)`` and lower it to ``ir.BucketedIR``."""
    clause = next(c for c in decl.clauses if isinstance(c, ast.BucketRoute))
    within = dataclasses.replace(decl, clauses=tuple(c for c in decl.clauses if c is not clause))
    checker = Checker(module, within, params, resolve, strict=strict)
    if decl.kind == "recurrence":
        raise checker.error("'route' is a pattern's clause, not a recurrence's", clause.pos)
    routes = [c for c in decl.clauses
              if isinstance(c, (*ast.ROUTE_CLAUSES, ast.BranchRoute))]
    if len(routes) > 1:
        raise checker.error(f"'route' is given twice (first at line {routes[0].pos.line})", routes[1].pos)
    for c in within.clauses:
        if isinstance(c, ast.Branch | ast.Combine | ast.PooledKeys):
            raise checker.error("a bucketed pattern (route buckets) has no branches", c.pos)
        if isinstance(c, ast.ExprClause) and c.keyword != "mask":
            raise checker.error(f"a bucketed pattern takes a mask only ('{c.keyword}' is not attended within "
                                "its buckets in this version)", c.pos, hint=f"clauses: {BUCKET_CLAUSES}")
    within_ir = checker.lower()
    if within_ir.queries.kind != "seq" or not within_ir.self_attention:
        raise checker.error("route buckets chooses among one sequence's tokens: the pattern must be 'tokens seq'",
                            clause.pos)
    mask_clause = checker._single("mask")
    if any(S.input_name(f.func) for f in within_ir.mask.atoms(sympy.Function)):
        raise checker.error("the mask of a bucketed pattern reads positions, heads and sizes only (no input) "
                            "in this version", mask_clause.pos if mask_clause is not None else clause.pos)
    window = checker.expect(clause.window, INT, "a bucket's window").expr
    checker._no_positions(window, clause.window.pos, "a bucket's window", allow_head=False)
    if window.is_number and window < 1:
        raise checker.error(f"a bucket holds at least 1 token, got window {window}", clause.window.pos)
    centroids = checker.inputs.get(clause.centroids)
    want = f"input {clause.centroids}: float[heads, clusters, dk]"
    if centroids is None:
        raise checker.error(f"'{clause.centroids}' is not a declared input", clause.centroids_pos,
                            hint=f"declare it: {want}")
    if centroids.dtype != "float" or len(centroids.dims) != 3 or centroids.dim_names[0] != "heads" \
            or centroids.dim_names[2] != "dk":
        raise checker.error(f"the centroids must be float[heads, CLUSTERS, dk], '{clause.centroids}' is "
                            f"{centroids.dtype}[{', '.join(centroids.dim_names)}]", clause.centroids_pos,
                            hint=f"declare it: {want}")
    for name in checker.inputs:
        if name != clause.centroids:
            raise checker.error(f"a bucketed pattern reads one input, its centroids; '{name}' is not read",
                                checker.input_pos.get(name, clause.pos))
    return ir.BucketedIR(
        name=decl.name,
        pattern=within_ir,
        window=window,
        centroids=clause.centroids,
        inputs=within_ir.inputs,
        params=within_ir.params,
        filename=module.filename,
        source=module.source,
    )
