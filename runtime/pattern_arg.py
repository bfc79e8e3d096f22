"""The ``pattern`` argument of the entry points (compile_attention, materialize_mask, simulate): a loaded
pattern, or its source loaded with a name and parameters; refused where an entry point has no model of it."""

from __future__ import annotations

from ..core import ir
from ..core.errors import SpecError
from ..spec.library import load

Pattern = ir.PatternIR | ir.RecurrenceIR | ir.CombinedIR | ir.BucketedIR


def as_pattern(pattern, name: str | None, params: dict) -> Pattern:
    """A loaded pattern as it is (no name or parameters may come with it), else the source loaded."""
    if isinstance(pattern, ir.PatternIR | ir.RecurrenceIR | ir.CombinedIR | ir.BucketedIR):
        if name is not None or params:
            raise SpecError("name= and parameters apply when loading; this pattern is already loaded",
                            where="argument pattern", hint="pass the source (path, 'stdlib:NAME' or text) instead")
        return pattern
    return load(pattern, name=name, **params)


def refuse_bucketed(pat: Pattern, what: str) -> None:
    """``what`` (an entry point) has no model of a bucketed pattern: refused, naming the pattern."""
    if isinstance(pat, ir.BucketedIR):
        from .bucketed import not_served

        raise not_served(pat, f"{what} has no model of it in this version", "argument pattern")
