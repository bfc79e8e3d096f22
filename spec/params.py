"""Per-axis parameters given the NATTEN way: one value for every axis, or one per axis.

A pattern on a grid declares one parameter per axis, named ``NAME_AXIS``
(``kernel_size_y``, ``kernel_size_x``). When it declares such a parameter for
every axis of its grid and no ``NAME`` itself, the argument ``NAME`` sets
them all: a single value goes to every axis, a tuple or list holds one value
per axis in the grid's order (``kernel_size=(3, 5)`` on ``grid(y: ..., x: ...)``
is ``kernel_size_y=3, kernel_size_x=5``), as NATTEN's ``kernel_size``,
``stride``, ``dilation`` and ``is_causal`` do. A one-element tuple or list
given for a declared parameter is its element (NATTEN's ``na1d`` accepts
``kernel_size=(7,)``). Everything else is passed on unchanged, so the checker
reports unknown names and bad values as usual.
"""

from __future__ import annotations

import dataclasses

from ..core import ir
from ..core.errors import SpecError
from . import ast


def grid_axes(decl: ast.Declaration) -> tuple[str, ...]:
    """The axis names of the declaration's query grid (or its concatenation's grid segment), in
    order (empty for a sequence)."""
    for role in ("tokens", "queries"):
        for c in decl.clauses:
            if isinstance(c, ast.LayoutClause) and c.role == role:
                grids = [seg for seg in c.layout.segments if seg.kind == "grid"]  # a concatenation's grid
                axes = grids[0].axes if grids else c.layout.axes
                if axes:
                    return tuple(a.name for a in axes)
    return ()


def expand_axis_params(decl: ast.Declaration, params: dict) -> tuple[dict, dict[str, tuple[str, str]]]:
    """``params`` with every NATTEN-style argument expanded into its per-axis parameters.

    Returns the expanded parameters and, for each parameter that an expansion
    set, ``(argument, axis)``: where its value came from, for error messages.
    """
    declared = {p.name for p in decl.params}
    per_head = {p.name for p in decl.params if p.per_head}
    axes = grid_axes(decl)
    out: dict = {}
    origin: dict[str, tuple[str, str]] = {}
    for name, value in params.items():
        per_axis = [f"{name}_{a}" for a in axes]
        if name in declared or not axes or not all(p in declared for p in per_axis):
            if name in declared and isinstance(value, tuple | list) and name not in per_head:
                if len(value) != 1:
                    raise SpecError(f"expected one value, got a sequence of {len(value)}", where=f"argument {name}",
                                    hint=f"'{decl.name}' has no per-axis '{name}'")
                value = value[0]
            _put(out, origin, name, value, None)
            continue
        if isinstance(value, tuple | list):
            if len(value) != len(axes):
                raise SpecError(
                    f"expected one value or {len(axes)} (one per axis: {', '.join(axes)}), got {len(value)}",
                    where=f"argument {name}",
                    hint="or set each axis: " + ", ".join(f"{p}=..." for p in per_axis),
                )
            values = list(value)
        else:
            values = [value] * len(axes)
        for axis, target, v in zip(axes, per_axis, values, strict=True):
            _put(out, origin, target, v, (name, axis))
    return out, origin


def _put(out: dict, origin: dict, target: str, value, source: tuple[str, str] | None) -> None:
    if target in out:
        first = origin.get(target, (target, ""))[0]
        second = source[0] if source else target
        raise SpecError(f"'{target}' is given twice (by '{first}' and by '{second}')",
                        where=f"argument {second}")
    out[target] = value
    if source is not None:
        origin[target] = source


def blame_argument(err: SpecError, origin: dict[str, tuple[str, str]]) -> SpecError:
    """An error about an expanded parameter, told in terms of the argument the user gave."""
    if err.where is None or not err.where.startswith("argument "):
        return err
    target = err.where[len("argument "):]
    if target not in origin:
        return err
    name, axis = origin[target]
    return SpecError(f"{err.message} (axis {axis}, '{target}')", where=f"argument {name}", hint=err.hint)


def blame_parameter(err: SpecError, module: ast.Module, decl: ast.Declaration,
                    given: dict) -> SpecError:
    """An error at a use of a parameter the caller gave (``route topk(topk)`` with ``topk=0``),
    told as an error of that argument: its value is at fault, not the file (which may be the
    stdlib's). The position is kept in the hint."""
    if err.pos is None or err.filename != module.filename:
        return err
    for name in _names_at(decl.clauses, err.pos):
        if name in given:
            used = f"'{name}' is read at {err.filename}:{err.pos.line}:{err.pos.col}"
            return SpecError(err.message, where=f"argument {name}",
                             hint=used + (f"; {err.hint}" if err.hint else ""))
    return err


def _names_at(node, pos) -> list[str]:
    """The names (``ast.Name``) of a declaration's clauses that start at ``pos``."""
    return [name.id for name in _names(node) if (name.pos.line, name.pos.col) == (pos.line, pos.col)]


def names_in(node) -> list[str]:
    """Every name (``ast.Name``) an expression's syntax reads, in no set order."""
    return [name.id for name in _names(node)]


def _names(node):
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, tuple | list):
            stack.extend(cur)
        elif isinstance(cur, ast.Name):
            yield cur
        elif dataclasses.is_dataclass(cur) and not isinstance(cur, type):
            stack.extend(getattr(cur, f.name) for f in dataclasses.fields(cur))


def name_window_arguments(pat, origin: dict[str, tuple[str, str]]):
    """``pat`` with its windows' given parameters (``ir.WindowSite.given``) told as the arguments the caller gave:
    a NATTEN-style ``kernel_size`` for the ``kernel_size_y`` it set (``expand_axis_params``' ``origin``)."""
    if isinstance(pat, ir.CombinedIR):  # each branch's windows
        branches = tuple(dataclasses.replace(b, pattern=name_window_arguments(b.pattern, origin)) for b in pat.branches)
        return dataclasses.replace(pat, branches=branches)
    if isinstance(pat, ir.BucketedIR):
        return dataclasses.replace(pat, pattern=name_window_arguments(pat.pattern, origin))
    if not isinstance(pat, ir.PatternIR) or not any(site.given for site in pat.windows):
        return pat

    def told(given):
        return tuple((role, origin[declared][0], declared, f"axis {origin[declared][1]}, '{declared}'")
                     if declared in origin else (role, argument, declared, note)
                     for role, argument, declared, note in given)

    sites = tuple(dataclasses.replace(site, given=told(site.given)) for site in pat.windows)
    return dataclasses.replace(pat, windows=sites)
