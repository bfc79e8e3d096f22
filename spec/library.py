"""Finding specs: files, ``stdlib:NAME``, source text, and the stdlib index.
``load`` turns any of them into checked IR with parameters bound."""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from importlib import resources

from ..core import ir
from ..core.errors import SpecError, did_you_mean
from . import ast
from .ast import STDLIB_PREFIX
from .check_branches import has_branches, lower_combined
from .check_buckets import has_buckets, lower_bucketed
from .check_names import all_unknown_names
from .checker import Checker
from .params import blame_argument, blame_parameter, expand_axis_params, name_window_arguments
from .parser import parse, read_file


@lru_cache(maxsize=1)
def stdlib_modules() -> tuple[ast.Module, ...]:
    """Every stdlib file, parsed once per process."""
    folder = resources.files("attnc.stdlib_patterns")
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".attn"):
            out.append(parse(entry.read_text(encoding="utf-8"), f"stdlib:{entry.name}"))
    return tuple(out)


def stdlib_index() -> dict[str, tuple[ast.Module, ast.Declaration]]:
    """Declaration name -> (module, declaration) over the whole stdlib."""
    return {d.name: (m, d) for m in stdlib_modules() for d in m.declarations}


def resolve(name: str, module: ast.Module) -> tuple[ast.Module, ast.Declaration] | None:
    """A pattern name used in ``module``: its own declarations first, then the stdlib."""
    if name in module.by_name:
        return module, module.by_name[name]
    return stdlib_index().get(name)


def read_source(source: str | os.PathLike, where: str = "argument source") -> tuple[str, str]:
    """(text, filename) of a path, ``stdlib:NAME`` or spec text; errors name ``where`` (the CLI: its FILE).

    A ``Path`` (any ``os.PathLike``), a string naming an existing file, or a
    string ending in ``.attn`` is always a path (``"patterns/win.attn"``). Other
    strings are spec text when they hold a newline or start like a spec
    (``pattern``, ``recurrence`` or a ``#`` comment), else a path."""
    if isinstance(source, os.PathLike):
        name = os.fspath(source)
        if not isinstance(name, str):
            raise SpecError("expected a text path, got a bytes path", where=where)
        return read_path(name, where=where), name
    if not isinstance(source, str):
        raise SpecError(f"expected a path, 'stdlib:NAME' or spec text, got {type(source).__name__}",
                        where=where)
    if not source.strip():
        raise SpecError("an empty source: expected a path, 'stdlib:NAME' or spec text", where=where,
                        hint="run 'attnc list' to see the stdlib patterns")
    if source.startswith(STDLIB_PREFIX):
        name = source[len(STDLIB_PREFIX):]
        index = stdlib_index()
        if name not in index:
            raise SpecError(f"no stdlib pattern '{name}'", where=where,
                            hint=did_you_mean(name, index) or "run 'attnc list' to see them")
        module, _ = index[name]
        return module.source, module.filename
    if not any(c in source for c in "\n\r\0") and (
        source.endswith(".attn") or os.path.exists(source)
        or not source.lstrip("\ufeff \t").startswith(("pattern", "recurrence", "#"))
    ):
        return read_path(source, where=where), source
    return source, "<spec>"


def read_path(path: str, where: str) -> str:
    """``parser.read_file``, with a hint at ``stdlib:NAME`` when no file has that name and a
    stdlib pattern has it (or one close to it): ``load("streaming")`` meant
    ``load("stdlib:streaming")``."""
    if not os.path.lexists(path):
        base = os.path.basename(path)
        if base == path:  # a bare name, no folder: perhaps a stdlib pattern
            stem = base.removesuffix(".attn")
            near = difflib.get_close_matches(stem, sorted(stdlib_index()), n=1)
            if near:
                raise SpecError(f"no such file: {path}", where=where,
                                hint=f"did you mean 'stdlib:{near[0]}'? (a stdlib pattern)")
    return read_file(path, where=where)


def pick(module: ast.Module, name: str | None, stdlib_name: str | None = None,
         option: str = "name") -> ast.Declaration:
    """The declaration to compile: ``name``, the stdlib name, or the only one. ``option`` is the
    argument that gives ``name`` as the caller knows it (``name`` in Python, ``--name`` on the
    command line), for messages."""
    if name is None and stdlib_name is not None:
        name = stdlib_name
    if name is not None:
        if not isinstance(name, str):
            raise SpecError(f"expected a declaration name (str), got {type(name).__name__}",
                            where=f"argument {option}")
        if name not in module.by_name:
            raise SpecError(f"{module.filename} declares no '{name}'", where=f"argument {option}",
                            hint=did_you_mean(name, module.by_name) or "declared: " + ", ".join(module.by_name))
        return module.by_name[name]
    if not module.declarations:
        raise SpecError(f"{module.filename} declares nothing", where="argument source")
    if len(module.declarations) > 1:
        how = f"{option} NAME" if option.startswith("-") else f"{option}=..."
        raise SpecError(f"{module.filename} declares several patterns; pick one with {how}",
                        where=f"argument {option}", hint="declared: " + ", ".join(module.by_name))
    return module.declarations[0]


def lower(module: ast.Module, decl: ast.Declaration, params: dict, strict: bool = True,
          symbolic: frozenset[str] = frozenset()):
    """Check one declaration and build its IR. NATTEN-style arguments (one
    value or a tuple for a family of per-axis parameters) are expanded first
    (``params.expand_axis_params``). ``symbolic``: int parameters of a plain
    pattern kept as symbols though given (``S.param_symbol``), for the kernels
    that read them at run time (``compiler.codegen.triton.run_values``)."""
    expanded, origin = expand_axis_params(decl, params)
    try:
        if has_buckets(decl):  # balanced clusters: attention within buckets, averaged per token
            lowered = lower_bucketed(module, decl, expanded, resolve, strict=strict)
        elif has_branches(decl):  # several attentions over the same queries, combined
            lowered = lower_combined(module, decl, expanded, resolve, strict=strict)
        else:
            lowered = Checker(module, decl, expanded, resolve, strict=strict, symbolic=symbolic).lower()
        return name_window_arguments(lowered, origin)
    except SpecError as err:
        err = all_unknown_names(err, module, decl, resolve)  # every misspelt name, not the first
        raise blame_argument(blame_parameter(err, module, decl, expanded), origin) from None


def load(source, name: str | None = None, **params) -> ir.PatternIR | ir.RecurrenceIR | ir.CombinedIR | ir.BucketedIR:
    """Load a pattern or recurrence: ``source`` is a path, ``"stdlib:NAME"`` or
    spec text; ``name`` picks one of several declarations; keyword arguments
    set parameters (``load("stdlib:neighborhood_2d", kernel_size=(7, 5))``)."""
    text, filename = read_source(source)
    module = parse(text, filename)
    stdlib_name = source[len(STDLIB_PREFIX):] if isinstance(source, str) and source.startswith(STDLIB_PREFIX) else None
    return lower(module, pick(module, name, stdlib_name), params)


def check_text(text: str, filename: str) -> list[ir.PatternIR | ir.RecurrenceIR]:
    """Parse and check every declaration of a file (parameters without defaults stay symbolic)."""
    module = parse(text, filename)
    return [lower(module, d, {}, strict=False) for d in module.declarations]
