"""Every unknown name of a declaration at once. The checker stops at its first error, but a file
with several misspelt names should not take one run per name: when that error is an unknown name,
the declaration is scanned for the others, and all are reported together, each at its position
(``SeveralErrors``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..core.errors import Pos, SpecError, did_you_mean
from . import ast
from .check_types import BUILTINS, FIXED_NAMES


class SeveralErrors(SpecError):
    """Several errors of one file, rendered one after the other; as a ``SpecError`` (message,
    position, hint) it is the first."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.message, first.pos, filename=first.filename, source=first.source,
                         hint=first.hint, where=first.where)

    def render(self) -> str:
        return "\n".join(err.render() for err in self.errors)


def all_unknown_names(err: SpecError, module: ast.Module, decl: ast.Declaration,
                      resolve: Callable[[str, ast.Module], object | None]) -> SpecError:
    """``err``, or, when it is one of several unknown names of ``decl`` (names, inputs indexed
    with ``[...]``, functions), all of them as one ``SeveralErrors``. A name counts as unknown
    here only where the declaration defines it nowhere (parameters, lets, inputs, branches, layout
    axes and sizes) and it is no builtin or pattern: no name the checker takes is reported."""
    if err.pos is None or err.filename != module.filename:
        return err
    known = _defined(decl) | FIXED_NAMES
    inputs = [c.name for c in decl.clauses if isinstance(c, ast.Input)]
    found: dict[tuple[int, int], tuple[str, str, list[str]]] = {}  # position -> message, name, near
    # `combine softmax(A, B)`: the merge is a word of the combine clause, not a function
    merges = [c.value for c in decl.clauses if isinstance(c, ast.Combine) and isinstance(c.value, ast.Call)
              and c.value.func == "softmax"]
    for node in _nodes(decl.clauses):
        if isinstance(node, ast.Name) and node.id not in known and node.id not in BUILTINS \
                and resolve(node.id, module) is None:
            found[node.pos.line, node.pos.col] = (f"unknown name '{node.id}'", node.id,
                                                  [*known, *module.by_name])
        elif isinstance(node, ast.Index) and node.name not in known:
            found[node.pos.line, node.pos.col] = (f"'{node.name}' is not an input", node.name,
                                                  inputs)
        elif isinstance(node, ast.Call) and node.func not in BUILTINS and node not in merges \
                and resolve(node.func, module) is None:
            found[node.func_pos.line, node.func_pos.col] = (
                f"unknown function or pattern '{node.func}'", node.func,
                [*BUILTINS, *module.by_name])
    at = (err.pos.line, err.pos.col)
    if len(found) < 2 or at not in found:
        return err
    errors = []
    for (line, col), (message, name, near) in sorted(found.items()):
        pos = Pos(line, col, line, col + len(name))
        errors.append(err if (line, col) == at else SpecError(
            message, pos, filename=module.filename, source=module.source,
            hint=did_you_mean(name, near)))
    return SeveralErrors(errors)


def _defined(decl: ast.Declaration) -> set[str]:
    """Every name the declaration itself defines: parameters, lets, inputs, branches, layout
    axes and the sizes its layouts name."""
    names = {p.name for p in decl.params}
    for c in decl.clauses:
        if isinstance(c, ast.Let | ast.Input | ast.Branch):
            names.add(c.name)
        elif isinstance(c, ast.LayoutClause):
            for seg in (*c.layout.segments, c.layout):
                for a in seg.axes:
                    names.add(a.name)
                    if isinstance(a.size, str):
                        names.add(a.size)
                if isinstance(getattr(seg, "size", None), str):
                    names.add(seg.size)
        elif isinstance(c, ast.PooledKeys) and isinstance(c.size, str):
            names.add(c.size)
    return names


def _nodes(root):
    """Every dataclass node under ``root`` (clauses, expressions, keywords), depth first."""
    stack = [root]
    while stack:
        cur = stack.pop()
        if isinstance(cur, tuple | list):
            stack.extend(reversed(cur))
        elif dataclasses.is_dataclass(cur) and not isinstance(cur, type):
            yield cur
            stack.extend(getattr(cur, f.name) for f in reversed(dataclasses.fields(cur)))
