"""Why context parallelism does not run a softmax pattern: one check, raised naming the caller's argument, for the
runs (``ContextParallel``, naming ``attn``) and the estimates (``simulate_parallel``, ``attnc sim --ranks``), so
that both refuse the same patterns with the same message."""

from __future__ import annotations

from ...core import ir
from ...core.errors import SpecError
from ..plan import clusters, forms


def refuse(pat: ir.PatternIR, where: str) -> None:
    """Raise why context parallelism does not run ``pat``, naming ``where``; return where it does."""
    forms.refuse_context_parallel(pat, where)
    if pat.weights is not None:
        raise SpecError(f"'{pat.name}' weights its scores by {pat.weights.describe()}: context parallelism runs "
                        "softmax patterns only in this version", where=where)
    if pat.score_scale is not None:
        raise SpecError(f"'{pat.name}' scales each query's scores by {pat.score_scale}: context parallelism does not "
                        "run a score scale in this version", where=where)
    table = next((d.derived[0] for d in clusters.derived_inputs(pat) if d.derived[0] in clusters.SCORE_TABLES), None)
    if table is not None:
        raise SpecError(f"'{pat.name}' reads a score table made from the whole sequence ({table}()): context "
                        "parallelism does not run it in this version", where=where)
    if not pat.self_attention:
        raise SpecError(f"'{pat.name}' attends from one layout to another; context parallelism shards one sequence",
                        where=where)
