"""A generated kernel's signature: its parameters by name, the ``def`` they make, and the rule that a kernel takes
only what its body reads.

A parameter is one value (a pointer, an int, a float, a descriptor), a constexpr, or a group: values that go
together, passed as one tuple and opened at the kernel's top (``Q, sq_b, sq_h, sq_n = Q``: a tensor's pointer and
its strides; ``FULL_N, FULL_I, full_w = FULL``: a tile list's counts, entries and row width). Triton specialises each
value of a group as it would a parameter of its own (a unit stride becomes the constant 1), but not a value whose
divisibility changes from call to call: those stay parameters of their own, never specialised (``fixed``).

The runtime fills every launch by these names (``runtime.backends.triton.kernel_launch.bound_args``): it names what it
has, and each kernel takes the names its ``def`` lists, in its order."""

from __future__ import annotations

import io
import tokenize
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One parameter of a generated kernel: ``name`` in its ``def``; ``fields``, the names a group's values take in
    the body (empty: a single value); ``constexpr`` with its ``default`` (the text after ``=``, or None); ``fixed``: a
    value Triton must not specialise on (a size that changes from call to call)."""

    name: str
    fields: tuple[str, ...] = ()
    constexpr: bool = False
    default: str | None = None
    fixed: bool = False

    def names(self) -> tuple[str, ...]:
        """The names the body may read of this parameter: a group's fields, else its own name."""
        return self.fields or (self.name,)

    def text(self) -> str:
        """The parameter as the ``def`` writes it."""
        if not self.constexpr:
            return self.name
        return f"{self.name}: tl.constexpr" + ("" if self.default is None else f" = {self.default}")


def value(name: str, fixed: bool = False) -> Param:
    """A single run-time value (``fixed``: never specialised on)."""
    return Param(name, fixed=fixed)


def group(name: str, *fields: str) -> Param:
    """Values passed as one tuple ``name``, opened into ``fields`` at the kernel's top."""
    return Param(name, fields=tuple(fields))


def tensor(name: str, *strides: str) -> Param:
    """A tensor's pointer (named ``name`` in the body too) and its ``strides``, as one group."""
    return group(name, name, *strides)


def constexpr(name: str, default: str | None = None) -> Param:
    """A compile-time constant, with the text of its ``default`` (None: the launch always gives it)."""
    return Param(name, constexpr=True, default=default)


def constexprs(*texts: str) -> list[Param]:
    """Constexprs from ``NAME`` or ``NAME = default`` texts."""
    out = []
    for text in texts:
        name, _, default = (part.strip() for part in text.partition("="))
        out.append(constexpr(name, default or None))
    return out


def names_read(lines: list[str]) -> set[str]:
    """The names a kernel body's code reads: its NAME tokens, not the words of its comments or strings."""
    out: set[str] = set()
    source = "\n".join(line.strip() for line in lines) + "\n"  # one statement per line is all tokenize needs
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            out.add(tok.string)
    return out


def taken(params: list[Param], body: list[str]) -> list[Param]:
    """The parameters the body reads (a group where it reads any of its fields), in their order; a name given twice
    is an error of the generator."""
    seen: set[str] = set()
    for p in params:
        if p.name in seen:
            raise ValueError(f"kernel parameter {p.name} given twice")
        seen.add(p.name)
    read = names_read(body)
    return [p for p in params if read.intersection(p.names())]


def opening(params: list[Param]) -> list[str]:
    """The lines that open the groups among ``params`` into their fields."""
    lines = [f"{', '.join(p.fields)} = {p.name}" for p in params if p.fields]
    if not lines:
        return []
    return ["# each group opened: a tensor's pointer and strides, a tile list's counts, entries and row width", *lines]
