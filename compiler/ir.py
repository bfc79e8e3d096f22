"""The IR: what a checked declaration means, as sympy expressions plus small
descriptors. Hashable: ``key()`` is stable across processes and will key the
kernel caches. Source positions ride along for compile-time errors but are not
part of the key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import sympy

from ..spec.errors import Pos, SpecError
from . import symbols as S


@dataclass(frozen=True)
class Layout:
    """``seq`` (axes empty) or ``grid(a: SIZE, ...)``, row-major, last axis fastest."""

    kind: str
    axes: tuple[tuple[str, sympy.Expr], ...] = ()
    cross: bool = False  # `keys seq` beside `queries seq`: the keys have their own length nk

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    def size_of(self, axis: str) -> sympy.Expr:
        return dict(self.axes)[axis]

    def length(self, flat_symbol: sympy.Symbol) -> sympy.Expr:
        """Number of tokens: the flat symbol (n or nk) for seq, the product for grid."""
        if self.kind == "seq":
            return flat_symbol
        return sympy.Mul(*(s for _, s in self.axes))

    def flat(self, role: str) -> sympy.Expr:
        """The flat position of a token in terms of this layout's coordinates."""
        if self.kind == "seq":
            return S.Q if role == "q" else S.K
        expr = sympy.Integer(0)
        for name, size in self.axes:
            expr = expr * size + S.coord(role, name)
        return sympy.expand(expr)

    def describe(self) -> str:
        if self.kind == "seq":
            return "seq"
        return "grid(" + ", ".join(f"{a}: {_size_text(s)}" for a, s in self.axes) + ")"


def _size_text(s: sympy.Expr) -> str:
    return str(s).removeprefix("size_")


@dataclass(frozen=True)
class InputDecl:
    """``input NAME: int[...]|float[...]``; dims are size expressions or ints."""

    name: str
    dtype: str
    dims: tuple[sympy.Expr, ...]
    dim_names: tuple[str, ...]

    @property
    def function(self):
        return S.input_function(self.name, self.dtype)


@dataclass(frozen=True)
class WindowSite:
    """Where a ``window(...)`` call stands, for the compile-time size checks."""

    axis: str | None
    length: sympy.Expr
    size: sympy.Expr
    dilation: sympy.Expr
    stride: sympy.Expr
    pos: Pos
    filename: str = "<spec>"
    source: str | None = None


@dataclass(frozen=True)
class Route:
    """``route topk(K) blocks(...) by SCORE [keep EXPR] [shared]``.

    ``block`` has one extent per key-layout axis (one entry for seq);
    ``score`` is 'token' (q @ mean(k), MoBA) or 'block' (mean(q) @ mean(k),
    BiFormer). ``keep`` is an expression of q, h and k, where k is bound to
    the first key of the block.
    """

    topk: sympy.Expr
    block: tuple[sympy.Expr, ...]
    score: str
    keep: sympy.Basic | None
    shared: bool


@dataclass(frozen=True)
class PatternIR:
    """A softmax-attention pattern: mask, score terms, routing, layouts, inputs."""

    name: str
    queries: Layout
    keys: Layout
    mask: sympy.Basic
    bias: sympy.Expr | None
    softcap: sympy.Expr | None
    decay: str | None  # name of a float[heads, n] input of log forget gates (FoX)
    route: Route | None
    inputs: tuple[InputDecl, ...]
    params: tuple[tuple[str, object], ...]
    windows: tuple[WindowSite, ...] = field(default=(), compare=False)
    filename: str = field(default="<spec>", compare=False)
    source: str | None = field(default=None, compare=False)

    kind = "pattern"

    @property
    def self_attention(self) -> bool:
        return self.queries == self.keys

    def key(self) -> str:
        return _key(
            "pattern",
            self.queries,
            self.keys,
            self.mask,
            self.bias,
            self.softcap,
            self.decay,
            self.route,
            self.inputs,
        )

    def input(self, name: str) -> InputDecl:
        return next(i for i in self.inputs if i.name == name)

    def describe_terms(self) -> list[str]:
        """The mask and score terms, one readable line each (for ``.source``)."""
        lines = [f"mask = {self.mask}"]
        if self.softcap is not None:
            lines.append(f"softcap = {self.softcap}")
        if self.bias is not None:
            lines.append(f"bias = {self.bias}")
        if self.decay is not None:
            lines.append(f"decay = cumsum({self.decay})[q] - cumsum({self.decay})[k]")
        if self.route is not None:
            r = self.route
            lines.append(f"route = topk({r.topk}) blocks{tuple(r.block)} score={r.score} keep={r.keep} shared={r.shared}")
        return lines


@dataclass(frozen=True)
class RecurrenceIR:
    """A linear recurrence ``S_t = diag(exp(decay_t)) S_{t-1} + k_t^T v_t``.

    ``gate`` is 'head' (``decay`` a sympy expression of h: RetNet, Lightning),
    'scalar' (``decay`` names a float[heads, n] input: Mamba2) or 'vector'
    (a float[heads, n, dk] input: GLA).
    """

    name: str
    gate: str
    decay: sympy.Expr | str
    inputs: tuple[InputDecl, ...]
    params: tuple[tuple[str, object], ...]
    filename: str = field(default="<spec>", compare=False)
    source: str | None = field(default=None, compare=False)

    kind = "recurrence"

    def key(self) -> str:
        return _key("recurrence", self.gate, self.decay, self.inputs)


def _canon(x) -> str:
    if isinstance(x, sympy.Basic):
        return sympy.srepr(x)
    if isinstance(x, tuple | list):
        return "(" + ",".join(_canon(i) for i in x) + ")"
    if hasattr(x, "__dataclass_fields__"):
        fields = [f for f in x.__dataclass_fields__.values() if f.compare]
        return type(x).__name__ + "(" + ",".join(_canon(getattr(x, f.name)) for f in fields) + ")"
    return repr(x)


def _key(*parts) -> str:
    return hashlib.sha256(_canon(parts).encode()).hexdigest()


# ----------------------------------------------------------------- compile-time checks
def check_window_sizes(ir: PatternIR, subs: dict) -> None:
    """Window larger than its axis, stride larger than the window: errors once sizes are known.
    Sizes that passed are remembered on the pattern (every call binds its sizes: sympy
    substitution per window would be a fixed cost of each call)."""
    passed = ir.__dict__.setdefault("_window_sizes_passed", set())
    key = tuple(sorted((str(sym), str(val)) for sym, val in subs.items()))
    if key in passed:
        return
    for site in ir.windows:
        vals = [sympy.sympify(x).subs(subs) for x in (site.length, site.size, site.dilation, site.stride)]
        if not all(isinstance(v, sympy.Integer) for v in vals):
            continue
        L, size, dil, stride = (int(v) for v in vals)
        axis = f"axis '{site.axis}'" if site.axis else "the sequence"
        if size * dil > L:
            raise SpecError(
                f"window of {size}" + (f" with dilation {dil}" if dil > 1 else "")
                + f" does not fit {axis} of length {L}",
                site.pos,
                filename=site.filename,
                source=site.source,
                hint="window size times dilation must be at most the axis length",
            )
        if stride > size:
            raise SpecError(
                f"stride {stride} is larger than the window {size}",
                site.pos,
                filename=site.filename,
                source=site.source,
            )
    passed.add(key)
