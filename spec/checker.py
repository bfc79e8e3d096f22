"""The checker: names, scopes, types, shapes, cycles and clause rules of a
declaration, producing its IR (``compiler.ir``) as it goes.

Every problem is a ``SpecError`` at the position of the construct at fault.
Types are ``int``, ``float`` and ``bool``, combined as in Python, except that
``and``/``or``/``not`` take bools only, arithmetic never takes bools, and
``int ** int`` is an int only when the exponent is known to be >= 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import sympy

from ..core import ir
from ..core import symbols as S
from ..core.errors import Pos, SpecError, did_you_mean
from . import ast

INT, FLOAT, BOOL = "int", "float", "bool"

#: Names with a fixed meaning in every expression; no param, let or input may take them.
FIXED_NAMES = frozenset({"q", "k", "h", "heads", "n", "nk", "dk", "causal"})
#: Builtin functions and their argument counts (min, max).
BUILTINS = {
    "abs": (1, 1),
    "min": (2, 64),
    "max": (2, 64),
    "clamp": (3, 3),
    "log2": (1, 1),
    "bit_length": (1, 1),
    "is_pow2": (1, 1),
    "exp": (1, 1),
    "log": (1, 1),
    "sqrt": (1, 1),
    "tanh": (1, 1),
    "window": (1, 2),
}
WINDOW_KEYWORDS = ("dilation", "stride", "causal")
INT64_LIMIT = 2**63


@dataclass(frozen=True)
class Typed:
    type: str
    expr: sympy.Basic


# ----------------------------------------------------------------- frames
@dataclass
class Frame:
    """What q, k and the sizes mean where a declaration is lowered (its own
    layout at top level, the caller's when a pattern is called)."""

    queries: ir.Layout
    keys: ir.Layout
    sizes: dict[str, sympy.Expr]  # size names visible as values (axis extents)

    @property
    def q_flat(self) -> sympy.Expr:
        return self.queries.flat("q")

    @property
    def k_flat(self) -> sympy.Expr:
        return self.keys.flat("k")

    @property
    def n(self) -> sympy.Expr:
        return self.queries.length(S.N)

    @property
    def nk(self) -> sympy.Expr:
        if self.queries == self.keys:
            return self.n
        return self.keys.length(S.NK)


def _kind_of_value(value) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    return FLOAT


def _plain_number(value):
    """numpy scalars (``np.int64(3)``, ``np.float32(0.5)``, ``np.bool_``) as the Python
    bool, int or float they hold; anything else unchanged (and judged by the caller)."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        item = value.item()
        return item if isinstance(item, bool | int | float) else value
    return value


def _sympy_value(value) -> sympy.Basic:
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    return sympy.Float(value)


def _children(node: ast.Expr):
    if isinstance(node, ast.Index):
        return node.indices
    if isinstance(node, ast.Unary):
        return (node.operand,)
    if isinstance(node, ast.Binary):
        return (node.left, node.right)
    if isinstance(node, ast.Compare):
        return node.operands
    if isinstance(node, ast.IfExpr):
        return (node.cond, node.then, node.orelse)
    if isinstance(node, ast.Call):
        return node.args + tuple(k.value for k in node.kwargs)
    return ()


def names_used(node: ast.Expr) -> set[str]:
    """Every bare name an expression refers to."""
    out: set[str] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, ast.Name):
            out.add(cur.id)
        stack.extend(_children(cur))
    return out


# ----------------------------------------------------------------- the checker
@dataclass
class Checker:
    """Checks and lowers one declaration.

    ``params`` maps parameter names to given values; ``strict`` requires a
    value for every parameter (compile time); otherwise a parameter without
    one stays a symbol (``attnc check``). ``resolve`` finds a called pattern
    by name: it returns (module, declaration) or None.
    """

    module: ast.Module
    decl: ast.Declaration
    params: dict[str, object]
    resolve: Callable[[str, ast.Module], tuple[ast.Module, ast.Declaration] | None]
    strict: bool = True
    frame: Frame | None = None
    call_stack: tuple[str, ...] = ()
    param_exprs: dict[str, Typed] | None = None  # when called: typed values from the caller

    env_params: dict[str, Typed] = field(default_factory=dict)
    env_lets: dict[str, Typed] = field(default_factory=dict)
    inputs: dict[str, ir.InputDecl] = field(default_factory=dict)
    input_pos: dict[str, Pos] = field(default_factory=dict)
    windows: list[ir.WindowSite] = field(default_factory=list)

    # ------------------------------------------------------------ errors
    def error(self, message: str, pos: Pos | None, hint: str | None = None) -> SpecError:
        return SpecError(message, pos, filename=self.module.filename, source=self.module.source, hint=hint)

    # ------------------------------------------------------------ entry points
    def lower(self) -> ir.PatternIR | ir.RecurrenceIR:
        self._bind_params()
        layouts = self._layout_clauses()
        if self.frame is None:
            self.frame = self._own_frame(layouts)
        self._declare_inputs()
        self._lower_lets()
        if self.decl.kind == "recurrence":
            return self._recurrence(layouts)
        return self._pattern()

    # ------------------------------------------------------------ params
    def _bind_params(self) -> None:
        seen: dict[str, ast.Param] = {}
        for p in self.decl.params:
            if p.name in seen:
                raise self.error(f"parameter '{p.name}' is declared twice", p.pos)
            if p.name in FIXED_NAMES:
                raise self.error(f"'{p.name}' is a builtin name and cannot be a parameter", p.pos)
            seen[p.name] = p
        if self.param_exprs is None:
            for name in self.params:
                if name not in seen:
                    hint = did_you_mean(name, seen) or (
                        "parameters: " + ", ".join(seen) if seen else f"'{self.decl.name}' takes no parameters"
                    )
                    raise SpecError(f"'{self.decl.name}' has no parameter '{name}'", where=f"argument {name}", hint=hint)
        for p in self.decl.params:
            declared = None if p.default is None else _kind_of_value(p.default)
            if self.param_exprs is not None and p.name in self.param_exprs:
                typed = self.param_exprs[p.name]
            elif self.param_exprs is None and p.name in self.params:
                value = _plain_number(self.params[p.name])
                if isinstance(value, sympy.Basic) or not isinstance(value, bool | int | float):
                    raise SpecError(f"expected a number or bool, got {type(value).__name__}", where=f"argument {p.name}")
                if isinstance(value, float) and not math.isfinite(value):
                    raise SpecError("must be finite", where=f"argument {p.name}")
                kind = _kind_of_value(value)
                if declared is not None and kind != declared and not (declared == FLOAT and kind == INT):
                    raise SpecError(
                        f"expected {declared} (the default of '{p.name}' is {p.default!r}), got {kind} {value!r}",
                        where=f"argument {p.name}",
                    )
                if declared == FLOAT:
                    value, kind = float(value), FLOAT
                typed = Typed(kind, _sympy_value(value))
            elif p.default is not None:
                typed = Typed(declared, _sympy_value(p.default))
            elif self.strict or self.param_exprs is not None:
                where = "a call of" if self.param_exprs is not None else "argument"
                raise SpecError(
                    f"parameter '{p.name}' of '{self.decl.name}' has no default and no value was given",
                    p.pos if self.param_exprs is not None else None,
                    filename=self.module.filename,
                    source=self.module.source,
                    where=f"{where} {p.name}",
                    hint=f"pass {p.name}=...",
                )
            else:  # `attnc check` of a bare parameter: an int whose value comes later
                typed = Typed(INT, S.param_symbol(p.name))
            if declared is not None and typed.type != declared:
                if not (declared == FLOAT and typed.type == INT):
                    raise self.error(f"parameter '{p.name}' is {declared}, got {typed.type}", p.pos)
                typed = Typed(FLOAT, typed.expr)
            self.env_params[p.name] = typed

    # ------------------------------------------------------------ layouts
    def _layout_clauses(self) -> dict[str, ast.LayoutClause]:
        found: dict[str, ast.LayoutClause] = {}
        for c in self.decl.clauses:
            if isinstance(c, ast.LayoutClause):
                if c.role in found:
                    raise self.error(f"'{c.role}' is given twice", c.pos)
                found[c.role] = c
        if "tokens" in found and ("queries" in found or "keys" in found):
            other = found.get("queries") or found.get("keys")
            raise self.error("give either 'tokens' or 'queries' and 'keys', not both", other.pos)
        if ("queries" in found) != ("keys" in found):
            c = found.get("queries") or found.get("keys")
            raise self.error("'queries' and 'keys' must be given together", c.pos)
        for c in found.values():
            self._check_layout(c.layout)
        return found

    def _check_layout(self, layout: ast.Layout) -> None:
        """Distinct axis names, literal extents >= 1; a concatenation has at most one grid,
        distinct segment names, and no axis named like a segment."""
        axes: dict[str, ast.AxisDecl] = {}
        for a in (a for seg in layout.segments for a in seg.axes) if layout.segments else layout.axes:
            if a.name in axes:
                raise self.error(f"axis '{a.name}' is declared twice", a.pos)
            axes[a.name] = a
            if isinstance(a.size, int) and a.size < 1:
                raise self.error("an axis size must be at least 1", a.size_pos)
        grids = [seg for seg in layout.segments if seg.kind == "grid"]
        if len(grids) > 1:
            raise self.error("a concatenation has at most one grid segment", grids[1].pos,
                             hint="q.AXIS and 'q in grid' name the one grid")
        names: dict[str, Pos] = {"grid": grids[0].pos} if grids else {}
        for seg in layout.segments:
            if seg.kind != "seq":
                continue
            if isinstance(seg.size, int):
                if seg.size < 1:
                    raise self.error("a segment size must be at least 1", seg.size_pos)
                continue
            if seg.size in names:
                what = "the grid segment" if seg.size == "grid" else f"segment '{seg.size}'"
                raise self.error(f"{what} is already declared (line {names[seg.size].line}); "
                                 "segment names must differ", seg.size_pos)
            if seg.size in axes:
                raise self.error(f"segment '{seg.size}' has the name of an axis of the grid", seg.size_pos,
                                 hint="segment sizes and axes need distinct names (q in NAME, q.AXIS)")
            names[seg.size] = seg.pos

    def _extent(self, size: str | int, pos: Pos, what: str) -> sympy.Expr:
        """An axis or segment size: a literal, an int parameter, or a size name bound later."""
        if isinstance(size, int):
            return sympy.Integer(size)
        if size in self.env_params:
            typed = self.env_params[size]
            if typed.type != INT:
                raise self.error(f"{what} '{size}' must be an int parameter", pos)
            if isinstance(typed.expr, sympy.Integer) and typed.expr < 1:
                raise self.error(f"{what} '{size}' must be at least 1, got {typed.expr}", pos)
            return typed.expr
        if size in FIXED_NAMES:
            raise self.error(f"'{size}' is a builtin name and cannot be {_article_of(what)}", pos)
        return S.size_symbol(size)

    def _layout(self, clause: ast.LayoutClause | None) -> ir.Layout:
        if clause is None or clause.layout.kind == "seq":
            return ir.Layout("seq")
        if clause.layout.kind == "concat":
            segments = []
            for seg in clause.layout.segments:
                if seg.kind == "seq":
                    size = self._extent(seg.size, seg.size_pos, "segment size")
                    name = seg.size if isinstance(seg.size, str) else None
                    segments.append(ir.Segment("seq", name, size))
                else:
                    axes = self._axes(seg.axes)
                    segments.append(ir.Segment("grid", "grid", sympy.Mul(*(e for _, e in axes)), axes))
            return ir.Layout("seq", segments=tuple(segments))
        return ir.Layout("grid", self._axes(clause.layout.axes))

    def _axes(self, axes: tuple[ast.AxisDecl, ...]) -> tuple[tuple[str, sympy.Expr], ...]:
        return tuple((a.name, self._extent(a.size, a.size_pos, "axis size")) for a in axes)

    def _own_frame(self, layouts: dict[str, ast.LayoutClause]) -> Frame:
        if "tokens" in layouts or not layouts:
            q = kv = self._layout(layouts.get("tokens"))
        else:
            q, kv = self._layout(layouts["queries"]), self._layout(layouts["keys"])
            if q == kv and kv.kind == "seq" and not kv.segments:  # cross attention: nk keys, independent of n
                kv = ir.Layout("seq", cross=True)
        sizes: dict[str, sympy.Expr] = {}
        for clause in layouts.values():
            for size in _size_names(clause.layout):
                if size not in self.env_params:
                    sizes[size] = S.size_symbol(size)
        return Frame(q, kv, sizes)

    # ------------------------------------------------------------ inputs
    def _declare_inputs(self) -> None:
        for c in self.decl.clauses:
            if not isinstance(c, ast.Input):
                continue
            self._check_new_name(c.name, c.name_pos)
            if c.dtype not in (INT, FLOAT):
                raise self.error(f"input type must be 'int' or 'float', got '{c.dtype}'", c.dtype_pos)
            dims, names = [], []
            for d in c.dims:
                if isinstance(d.value, int):
                    if d.value < 1:
                        raise self.error("an input dimension must be at least 1", d.pos)
                    dims.append(sympy.Integer(d.value))
                    names.append(str(d.value))
                    continue
                dims.append(self._dim_size(d))
                names.append(d.value)
            self.inputs[c.name] = ir.InputDecl(c.name, c.dtype, tuple(dims), tuple(names))
            self.input_pos[c.name] = c.name_pos

    def _dim_size(self, d: ast.Dim) -> sympy.Expr:
        frame = self.frame
        if d.value == "heads":
            return S.HEADS
        if d.value == "dk":
            return S.DK
        if d.value == "n":
            return frame.n
        if d.value == "nk":
            return frame.nk
        if d.value in frame.sizes:
            return frame.sizes[d.value]
        if d.value in self.env_params and self.env_params[d.value].type == INT:
            return self.env_params[d.value].expr
        known = ["heads", "n", "nk", "dk", *frame.sizes]
        raise self.error(
            f"unknown dimension '{d.value}'",
            d.pos,
            hint=did_you_mean(d.value, known) or "dimensions: " + ", ".join(known),
        )

    def _check_new_name(self, name: str, pos: Pos) -> None:
        if name in FIXED_NAMES:
            raise self.error(f"'{name}' is a builtin name and cannot be redefined", pos)
        if name in self.env_params:
            raise self.error(f"'{name}' is already a parameter", pos)
        if name in self.inputs or name in self.env_lets:
            raise self.error(f"'{name}' is already defined", pos)
        if self.frame is not None and name in self.frame.sizes:
            if name in (*self.frame.queries.segment_names, *self.frame.keys.segment_names):
                raise self.error(f"'{name}' is already a segment size (seq({name}) in the layout)", pos,
                                 hint=f"it names the segment ('q in {name}') and its length")
            raise self.error(f"'{name}' is already an axis size", pos)

    # ------------------------------------------------------------ lets
    def _lower_lets(self) -> None:
        lets: dict[str, ast.Let] = {}
        for c in self.decl.clauses:
            if isinstance(c, ast.Let):
                self._check_new_name(c.name, c.name_pos)
                if c.name in lets:
                    raise self.error(f"'{c.name}' is already defined (line {lets[c.name].pos.line})", c.name_pos)
                lets[c.name] = c
        graph = nx.DiGraph()
        graph.add_nodes_from(lets)
        for name, let in lets.items():
            for used in names_used(let.value):
                if used in lets:
                    graph.add_edge(name, used)
        try:
            cycle = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            names = [a for a, _ in cycle] + [cycle[0][0]]
            first = min((lets[a] for a, _ in cycle), key=lambda c: (c.pos.line, c.pos.col))
            raise self.error(
                f"'{first.name}' is defined in terms of itself: " + " -> ".join(names),
                first.name_pos,
                hint="definitions may not be cyclic",
            )
        for name in reversed(list(nx.topological_sort(graph))):
            self.env_lets[name] = self.expr(lets[name].value)

    # ------------------------------------------------------------ patterns
    def _single(self, keyword: str) -> ast.Clause | None:
        found = None
        for c in self.decl.clauses:
            kw = c.keyword if isinstance(c, ast.ExprClause) else ("route" if isinstance(c, ast.Route) else None)
            if kw == keyword:
                if found is not None:
                    raise self.error(f"'{keyword}' is given twice (first at line {found.pos.line})", c.pos)
                found = c
        return found

    def _pattern(self) -> ir.PatternIR:
        mask_clause = self._single("mask")
        mask = sympy.true
        if mask_clause is not None:
            mask = self.expect(mask_clause.value, BOOL, "a mask").expr
        bias = softcap = None
        bias_clause = self._single("bias")
        if bias_clause is not None:
            bias = self.expect_number(bias_clause.value, "a bias").expr
        softcap_clause = self._single("softcap")
        if softcap_clause is not None:
            typed = self.expect_number(softcap_clause.value, "a softcap")
            self._no_positions(typed.expr, softcap_clause.value.pos, "a softcap")
            if typed.expr.is_number and not typed.expr > 0:
                raise self.error(f"softcap must be positive, got {typed.expr}", softcap_clause.value.pos)
            softcap = typed.expr
        decay = None
        decay_clause = self._single("decay")
        if decay_clause is not None:
            decay = self._input_gate(decay_clause.value, (("heads", "n"),), "a pattern's decay").name
            if not self._implies_causal(mask):
                raise self.error(
                    "'decay' (Forgetting Transformer gates) needs a causal mask",
                    decay_clause.pos,
                    hint="add 'causal and ...' to the mask",
                )
        route_clause = self._single("route")
        route = self._route(route_clause) if route_clause is not None else None
        return ir.PatternIR(
            name=self.decl.name,
            queries=self.frame.queries,
            keys=self.frame.keys,
            mask=mask,
            bias=bias,
            softcap=softcap,
            decay=decay,
            route=route,
            inputs=tuple(self.inputs.values()),
            params=tuple((k, v.expr) for k, v in self.env_params.items()),
            windows=tuple(self.windows),
            filename=self.module.filename,
            source=self.module.source,
        )

    def _implies_causal(self, mask: sympy.Basic) -> bool:
        """Whether some top-level conjunct of the mask is q - k >= c with c >= 0."""
        if mask == sympy.false:  # `causal and q < 0` folds to false: no pair at all, so causal
            return True
        conjuncts = mask.args if isinstance(mask, sympy.And) else (mask,)
        diff_qk = self.frame.q_flat - self.frame.k_flat
        for c in conjuncts:
            if isinstance(c, sympy.GreaterThan | sympy.StrictGreaterThan):
                e = c.lhs - c.rhs
            elif isinstance(c, sympy.LessThan | sympy.StrictLessThan):
                e = c.rhs - c.lhs
            else:
                continue
            rest = sympy.expand(e - diff_qk)
            if rest.is_number:
                strict = isinstance(c, sympy.StrictGreaterThan | sympy.StrictLessThan)
                if (strict and rest <= 1) or (not strict and rest <= 0):
                    return True
        return False

    def _input_gate(self, node: ast.Expr, shapes: tuple[tuple[str, ...], ...], what: str) -> ir.InputDecl:
        if not isinstance(node, ast.Name) or node.id not in self.inputs:
            want = " or ".join("float[" + ", ".join(s) + "]" for s in shapes)
            raise self.error(f"{what} must name an input of shape {want}", node.pos)
        decl = self.inputs[node.id]
        if decl.dtype != FLOAT or decl.dim_names not in shapes:
            want = " or ".join("float[" + ", ".join(s) + "]" for s in shapes)
            got = f"{decl.dtype}[{', '.join(decl.dim_names)}]"
            raise self.error(f"{what} must be an input of shape {want}; '{node.id}' is {got}", node.pos)
        return decl

    def _route(self, c: ast.Route) -> ir.Route:
        topk = self.expect(c.topk, INT, "topk").expr
        self._no_positions(topk, c.topk.pos, "topk", allow_head=False)
        if topk.is_number and topk < 1:
            raise self.error(f"topk must be at least 1, got {topk}", c.topk.pos)
        keys = self.frame.keys
        if keys.kind == "seq":
            if len(c.blocks) != 1 or c.blocks[0].axis is not None:
                raise self.error("'tokens seq' has no axes: write blocks(SIZE)", c.blocks[0].pos)
            blocks = (self._block_size(c.blocks[0].size),)
        else:
            if c.blocks[0].axis is None:
                raise self.error(
                    "a grid layout needs per-axis blocks",
                    c.blocks[0].pos,
                    hint="write blocks(" + ", ".join(f"{a}: SIZE" for a in keys.axis_names) + ")",
                )
            given: dict[str, sympy.Expr] = {}
            for b in c.blocks:
                if b.axis not in keys.axis_names:
                    raise self.error(f"unknown axis '{b.axis}'", b.pos, hint=did_you_mean(b.axis, keys.axis_names))
                if b.axis in given:
                    raise self.error(f"axis '{b.axis}' is given twice", b.pos)
                given[b.axis] = self._block_size(b.size)
            blocks = tuple(given.get(a, sympy.Integer(1)) for a in keys.axis_names)
        left, right = c.left, c.right
        if left.arg != "q" or left.func not in (None, "mean"):
            raise self.error("the routing score's left side must be 'q' or 'mean(q)'", left.pos)
        if right.arg != "k" or right.func != "mean":
            raise self.error("the routing score's right side must be 'mean(k)'", right.pos)
        score = "token" if left.func is None else "block"
        if score == "block" and self.frame.queries != keys:
            raise self.error("'mean(q)' needs the same layout for queries and keys", left.pos)
        keep = None
        if c.keep is not None:
            keep = self.expect(c.keep, BOOL, "keep").expr
        return ir.Route(topk, blocks, score, keep, c.shared)

    def _block_size(self, node: ast.Expr) -> sympy.Expr:
        size = self.expect(node, INT, "a block size").expr
        self._no_positions(size, node.pos, "a block size", allow_head=False)
        if size.is_number and size < 1:
            raise self.error(f"a block size must be at least 1, got {size}", node.pos)
        return size

    # ------------------------------------------------------------ recurrences
    def _recurrence(self, layouts: dict[str, ast.LayoutClause]) -> ir.RecurrenceIR:
        for c in self.decl.clauses:
            bad = None
            if isinstance(c, ast.ExprClause) and c.keyword != "decay":
                bad = c.keyword
            elif isinstance(c, ast.Route):
                bad = "route"
            elif isinstance(c, ast.LayoutClause) and (c.role != "tokens" or c.layout.kind != "seq"):
                kind = " + ".join(seg.kind for seg in c.layout.segments) or c.layout.kind
                bad = f"{c.role} {kind}"
            if bad:
                raise self.error(f"'{bad}' is not allowed in a recurrence", c.pos,
                                 hint="a recurrence has a decay, lets and inputs over 'tokens seq'")
        decay_clause = self._single("decay")
        if decay_clause is None:
            raise self.error(f"recurrence '{self.decl.name}' needs a 'decay' clause", self.decl.name_pos)
        node = decay_clause.value
        if isinstance(node, ast.Name) and node.id in self.inputs:
            decl = self._input_gate(node, (("heads", "n"), ("heads", "n", "dk")), "a recurrence's decay")
            gate = "scalar" if len(decl.dims) == 2 else "vector"
            decay: sympy.Expr | str = decl.name
        else:
            typed = self.expect_number(node, "a decay")
            free = typed.expr.free_symbols - {S.H, S.HEADS}
            if any(not str(s).startswith("param_") for s in free):
                raise self.error(
                    "a recurrence's decay may depend only on the head h and parameters",
                    node.pos,
                    hint="for a data-dependent gate declare 'input g: float[heads, n]' and write 'decay g'",
                )
            gate, decay = "head", typed.expr
        return ir.RecurrenceIR(
            name=self.decl.name,
            gate=gate,
            decay=decay,
            inputs=tuple(self.inputs.values()),
            params=tuple((k, v.expr) for k, v in self.env_params.items()),
            filename=self.module.filename,
            source=self.module.source,
        )

    # ------------------------------------------------------------ expressions
    def expect(self, node: ast.Expr, want: str, what: str) -> Typed:
        typed = self.expr(node)
        if typed.type != want:
            raise self.error(f"{what} must be {_article(want)}, got {_article(typed.type)}", node.pos)
        return typed

    def expect_number(self, node: ast.Expr, what: str) -> Typed:
        typed = self.expr(node)
        if typed.type == BOOL:
            raise self.error(f"{what} must be a number, got a bool", node.pos)
        return typed

    def _no_positions(self, expr: sympy.Basic, pos: Pos, what: str, allow_head: bool = True) -> None:
        banned = {S.Q, S.K} | ({S.H} if not allow_head else set())
        for sym in expr.free_symbols:
            if sym in banned or str(sym).startswith(("q_", "k_")) or (
                getattr(sym, "func", None) is not None and S.input_name(sym.func)
            ):
                raise self.error(f"{what} must not depend on {'q, k or h' if not allow_head else 'q or k'}", pos)
        if any(S.input_name(f.func) for f in expr.atoms(sympy.Function)):
            raise self.error(f"{what} must not depend on inputs", pos)

    def expr(self, node: ast.Expr) -> Typed:
        method = getattr(self, "_e_" + type(node).__name__)
        typed = method(node)
        e = typed.expr
        if isinstance(e, sympy.Integer) and abs(int(e)) >= INT64_LIMIT:
            raise self.error("constant too large (it must fit in 64 bits)", node.pos)
        if isinstance(e, sympy.Number) and not e.is_finite:
            raise self.error("expression is not a finite number", node.pos)
        return typed

    def _e_Num(self, node: ast.Num) -> Typed:
        return Typed(_kind_of_value(node.value), _sympy_value(node.value))

    def _e_BoolLit(self, node: ast.BoolLit) -> Typed:
        return Typed(BOOL, sympy.true if node.value else sympy.false)

    def _e_Name(self, node: ast.Name) -> Typed:
        name, frame = node.id, self.frame
        fixed = {
            "q": lambda: Typed(INT, frame.q_flat),
            "k": lambda: Typed(INT, frame.k_flat),
            "h": lambda: Typed(INT, S.H),
            "heads": lambda: Typed(INT, S.HEADS),
            "n": lambda: Typed(INT, frame.n),
            "nk": lambda: Typed(INT, frame.nk),
            "dk": lambda: Typed(INT, S.DK),
            "causal": lambda: Typed(BOOL, sympy.Le(frame.k_flat, frame.q_flat)),
        }
        if name in fixed:
            return fixed[name]()
        if name in self.env_lets:
            return self.env_lets[name]
        if name in self.env_params:
            return self.env_params[name]
        if name in frame.sizes:
            return Typed(INT, frame.sizes[name])
        if name in self.inputs:
            dims = ", ".join(self.inputs[name].dim_names)
            raise self.error(f"input '{name}' must be indexed, e.g. {name}[...] with {len(self.inputs[name].dims)} index(es) ({dims})", node.pos)
        if name in BUILTINS:
            raise self.error(f"'{name}' is a function: call it with arguments", node.pos)
        if self.resolve(name, self.module) is not None:
            return self._call_pattern(ast.Call(node.pos, name, (), (), node.pos))
        known = [*fixed, *self.env_lets, *self.env_params, *frame.sizes, *self.inputs, *self.module.by_name]
        raise self.error(f"unknown name '{name}'", node.pos, hint=did_you_mean(name, known))

    def _e_Attr(self, node: ast.Attr) -> Typed:
        if node.base not in ("q", "k"):
            raise self.error(f"'{node.base}.{node.axis}': only q.AXIS and k.AXIS are coordinates", node.pos)
        layout = self.frame.queries if node.base == "q" else self.frame.keys
        axes = [a for a, _ in layout.coordinate_axes]
        if node.axis not in axes:
            if not axes:
                flat = "a concatenation without a grid" if layout.segments else "a flat 'seq'"
                raise self.error(f"unknown axis '{node.axis}': the tokens are {flat}", node.axis_pos,
                                 hint="declare a grid: tokens grid(AXIS: SIZE, ...)")
            raise self.error(f"unknown axis '{node.axis}'", node.axis_pos,
                             hint=did_you_mean(node.axis, axes) or "axes: " + ", ".join(axes))
        return Typed(INT, layout.coordinate(node.base, node.axis))

    def _e_Membership(self, node: ast.Membership) -> Typed:
        operand = node.operand
        if not isinstance(operand, ast.Name) or operand.id not in ("q", "k"):
            raise self.error("only 'q in SEGMENT' and 'k in SEGMENT' test a segment", operand.pos)
        layout = self.frame.queries if operand.id == "q" else self.frame.keys
        role = "queries" if operand.id == "q" else "keys"
        if not layout.segments:
            raise self.error(f"'{operand.id} in {node.segment}' needs a concatenated layout; the {role} are "
                             f"'{layout.describe()}'", node.pos,
                             hint="tokens seq(text) + grid(t: frames, y: height, x: width)")
        names = layout.segment_names
        if node.segment not in names:
            raise self.error(f"unknown segment '{node.segment}'", node.segment_pos,
                             hint=did_you_mean(node.segment, names) or "segments: " + ", ".join(names))
        return Typed(BOOL, layout.contains(operand.id, node.segment))

    def _e_Index(self, node: ast.Index) -> Typed:
        if node.name not in self.inputs:
            raise self.error(f"'{node.name}' is not an input", node.pos,
                             hint=did_you_mean(node.name, self.inputs) or f"declare it: input {node.name}: int[n]")
        decl = self.inputs[node.name]
        if len(node.indices) != len(decl.dims):
            raise self.error(
                f"input '{node.name}' has {len(decl.dims)} dimension(s) ({', '.join(decl.dim_names)}), "
                f"indexed with {len(node.indices)}",
                node.pos,
            )
        idx = [self.expect(i, INT, "an index").expr for i in node.indices]
        return Typed(decl.dtype, decl.function(*idx))

    def _e_Unary(self, node: ast.Unary) -> Typed:
        if node.op == "not":
            return Typed(BOOL, sympy.Not(self.expect(node.operand, BOOL, "the operand of 'not'").expr))
        operand = self.expr(node.operand)
        if node.op == "~":
            if operand.type != INT:
                raise self.error(f"'~' needs an int, got {_article(operand.type)}", node.operand.pos)
            return Typed(INT, S.BitNot(operand.expr))
        if operand.type == BOOL:
            raise self.error(f"unary '{node.op}' needs a number, got a bool", node.operand.pos)
        return Typed(operand.type, -operand.expr if node.op == "-" else operand.expr)

    def _e_Binary(self, node: ast.Binary) -> Typed:
        op = node.op
        if op in ("and", "or"):
            a = self.expect(node.left, BOOL, f"the left operand of '{op}'")
            b = self.expect(node.right, BOOL, f"the right operand of '{op}'")
            return Typed(BOOL, S.logic_and(a.expr, b.expr) if op == "and" else S.logic_or(a.expr, b.expr))
        a, b = self.expr(node.left), self.expr(node.right)
        for side, t in ((node.left, a), (node.right, b)):
            if t.type == BOOL:
                raise self.error(f"'{op}' needs numbers, got a bool", side.pos,
                                 hint="use 'and', 'or', 'not' to combine bools" if op in "&|^" else None)
        both_int = a.type == INT and b.type == INT
        num_type = INT if both_int else FLOAT
        x, y = a.expr, b.expr
        if op in ("<<", ">>", "&", "|", "^"):
            if not both_int:
                bad = node.left if a.type != INT else node.right
                raise self.error(f"'{op}' needs ints, got a float", bad.pos)
            if op in ("<<", ">>") and y.is_number and (y < 0 or y > 63):
                raise self.error(f"shift count {y} out of range 0..63", node.right.pos)
            fn = {"<<": S.ShiftLeft, ">>": S.ShiftRight, "&": S.BitAnd, "|": S.BitOr, "^": S.BitXor}[op]
            return Typed(INT, fn(x, y))
        if op in ("/", "//", "%") and y.is_Number and y.is_zero:  # 0 and 0.0 alike (sympy: 0.0 != 0)
            raise self.error("division by zero", node.right.pos)
        if op == "+":
            return Typed(num_type, x + y)
        if op == "-":
            return Typed(num_type, x - y)
        if op == "*":
            return Typed(num_type, x * y)
        if op == "/":
            return Typed(FLOAT, x / y)
        if op == "//":
            return Typed(num_type, S.FloorDiv(x, y))
        if op == "%":
            return Typed(num_type, S.Mod(x, y))
        if op == "**":
            return self._power(node, a, b)
        raise self.error(f"unknown operator '{op}'", node.pos)  # unreachable: the grammar has no others

    def _power(self, node: ast.Binary, a: Typed, b: Typed) -> Typed:
        x, y = a.expr, b.expr
        if y.is_number:
            if a.type == INT and b.type == INT and not (x.is_number and abs(x) <= 1) and abs(y) > 64:
                raise self.error(f"exponent {y} too large for an int power (the result must fit in 64 bits)", node.right.pos)
            if x.is_number:
                try:
                    value = float(x) ** float(y)
                except (OverflowError, ZeroDivisionError):
                    raise self.error("constant out of range", node.pos) from None
                if isinstance(value, complex) or not math.isfinite(value):
                    raise self.error("constant is not a finite real number", node.pos)
                if a.type == INT and b.type == INT and y >= 0 and abs(value) >= INT64_LIMIT:
                    raise self.error("constant too large (it must fit in 64 bits)", node.pos)
        if a.type == INT and b.type == INT and y.is_nonnegative:
            return Typed(INT, x**y)
        return Typed(FLOAT, _fold(x**y))

    def _e_Compare(self, node: ast.Compare) -> Typed:
        vals = [self.expr(o) for o in node.operands]
        parts = []
        for (a, b), op, onode in zip(zip(vals, vals[1:], strict=False), node.ops, node.operands[1:], strict=True):
            if (a.type == BOOL) != (b.type == BOOL):
                raise self.error(f"cannot compare {_article(a.type)} with {_article(b.type)}", onode.pos)
            if a.type == BOOL:
                if op not in ("==", "!="):
                    raise self.error(f"'{op}' cannot order bools; only == and != compare bools", onode.pos)
                parts.append(sympy.Equivalent(a.expr, b.expr) if op == "==" else sympy.Xor(a.expr, b.expr))
                continue
            rel = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge, "==": sympy.Eq, "!=": sympy.Ne}[op]
            # sympy decides a relation from the assumptions of its sides, which walk
            # the expanded tree (free_symbols): exponential in nested lets.
            small = S.tree_size(a.expr) + S.tree_size(b.expr) <= S.SIMPLIFY_LIMIT
            # a side sympy deems non-real (log(-q)) is NaN in float semantics: the comparison is
            # left to the evaluators (NaN compares False), never decided (or refused) by sympy
            # (asked only of small sides: assumptions walk the expanded tree)
            decide = small and all(side.is_extended_real is not False and side is not sympy.nan
                                   for side in (a.expr, b.expr))
            parts.append(rel(a.expr, b.expr, evaluate=decide))
        return Typed(BOOL, S.logic_and(*parts))

    def _e_IfExpr(self, node: ast.IfExpr) -> Typed:
        cond = self.expect(node.cond, BOOL, "the condition of 'if'").expr
        a, b = self.expr(node.then), self.expr(node.orelse)
        if (a.type == BOOL) != (b.type == BOOL):
            raise self.error(f"the branches of 'if' have different types ({a.type} and {b.type})", node.orelse.pos)
        if a.type == BOOL:
            return Typed(BOOL, sympy.ITE(cond, a.expr, b.expr))
        kind = INT if a.type == b.type == INT else FLOAT
        return Typed(kind, S.Piecewise((a.expr, cond), (b.expr, sympy.true)))

    def _e_Call(self, node: ast.Call) -> Typed:
        # Functions (builtins, patterns) and values (params, lets, inputs) are
        # separate namespaces: a parameter named `window` does not hide window().
        if node.func not in BUILTINS:
            if node.func in self.inputs:
                raise self.error(f"input '{node.func}' is indexed with [...], not called", node.func_pos)
            return self._call_pattern(node)
        if node.func == "window":
            return self._window(node)
        lo, hi = BUILTINS[node.func]
        if node.kwargs:
            raise self.error(f"'{node.func}' takes no keyword arguments", node.kwargs[0].pos)
        if not lo <= len(node.args) <= hi:
            count = str(lo) if lo == hi else f"at least {lo}"
            raise self.error(f"'{node.func}' takes {count} argument(s), got {len(node.args)}", node.func_pos)
        if node.func == "is_pow2":
            return Typed(BOOL, S.IsPow2(self.expect(node.args[0], INT, "the argument of is_pow2").expr))
        if node.func in ("log2", "bit_length"):
            x = self.expect(node.args[0], INT, f"the argument of {node.func}").expr
            return Typed(INT, (S.Log2Floor if node.func == "log2" else S.BitLength)(x))
        args = [self.expect_number(a, f"an argument of {node.func}") for a in node.args]
        kind = INT if all(a.type == INT for a in args) else FLOAT
        xs = [a.expr for a in args]
        if node.func == "abs":
            return Typed(kind, S.Abs(xs[0]))
        if node.func == "min":
            return Typed(kind, S.Min(*xs))
        if node.func == "max":
            return Typed(kind, S.Max(*xs))
        if node.func == "clamp":
            return Typed(kind, S.Min(S.Max(xs[0], xs[1]), xs[2]))
        fn = {"exp": sympy.exp, "log": S.Log, "sqrt": S.Sqrt, "tanh": sympy.tanh}[node.func]
        x = xs[0]
        if x.is_number and ((node.func == "log" and x <= 0) or (node.func == "sqrt" and x < 0)):
            raise self.error(f"{node.func} of {x} is not a finite real number", node.args[0].pos)
        if node.func == "exp" and x.is_number and x > 700:
            raise self.error("exp overflows", node.args[0].pos)
        return Typed(FLOAT, _fold(fn(x)))

    def _window(self, node: ast.Call) -> Typed:
        frame = self.frame
        if frame.queries != frame.keys:
            raise self.error("window() needs the same layout for queries and keys", node.func_pos)
        layout = frame.queries
        args = list(node.args)
        axis_names = [a for a, _ in layout.coordinate_axes]
        if not axis_names or (layout.segments and len(args) == 1):  # a sequence (or a concatenation's flat positions)
            if len(args) != 1:
                raise self.error(
                    f"window() on 'tokens seq' takes one positional argument (SIZE), got {len(args)}",
                    node.func_pos,
                    hint="window(SIZE, dilation = 1, stride = 1, causal = false)",
                )
            axis, length, qa, ka = None, frame.n, frame.q_flat, frame.k_flat
        else:
            if len(args) != 2:
                raise self.error(
                    f"window() on a grid takes two positional arguments (AXIS, SIZE), got {len(args)}",
                    node.func_pos,
                    hint="window(AXIS, SIZE, dilation = 1, stride = 1, causal = false)",
                )
            axis_node = args.pop(0)
            if not isinstance(axis_node, ast.Name) or axis_node.id not in axis_names:
                shown = axis_node.id if isinstance(axis_node, ast.Name) else "this"
                raise self.error(
                    f"'{shown}' is not an axis",
                    axis_node.pos,
                    hint=(did_you_mean(axis_node.id, axis_names) if isinstance(axis_node, ast.Name) else None)
                    or "axes: " + ", ".join(axis_names),
                )
            axis = axis_node.id
            length, qa, ka = layout.size_of(axis), layout.coordinate("q", axis), layout.coordinate("k", axis)
        values = {"size": (args[0], INT), "dilation": (None, INT), "stride": (None, INT), "causal": (None, BOOL)}
        for kw in node.kwargs:
            if kw.name not in WINDOW_KEYWORDS:
                raise self.error(f"window() has no argument '{kw.name}'", kw.pos,
                                 hint=did_you_mean(kw.name, WINDOW_KEYWORDS) or "arguments: dilation, stride, causal")
            values[kw.name] = (kw.value, values[kw.name][1])
        lowered = {}
        defaults = {"dilation": sympy.Integer(1), "stride": sympy.Integer(1), "causal": sympy.false}
        for name, (vnode, want) in values.items():
            if vnode is None:
                lowered[name] = defaults[name]
                continue
            e = self.expect(vnode, want, f"window {name}").expr
            self._no_positions(e, vnode.pos, f"window {name}", allow_head=False)
            if want == INT and e.is_number and e < 1:
                raise self.error(f"window {name} must be at least 1, got {e}", vnode.pos)
            if want == BOOL and e not in (sympy.true, sympy.false):
                raise self.error("window causal must be a constant bool", vnode.pos)
            lowered[name] = e
        self.windows.append(
            ir.WindowSite(axis, length, lowered["size"], lowered["dilation"], lowered["stride"], node.pos,
                          self.module.filename, self.module.source)
        )
        return Typed(BOOL, S.Window(qa, ka, length, lowered["size"], lowered["dilation"], lowered["stride"], lowered["causal"]))

    def _call_pattern(self, node: ast.Call) -> Typed:
        found = self.resolve(node.func, self.module)
        if found is None:
            known = [*BUILTINS, *self.module.by_name]
            raise self.error(f"unknown function or pattern '{node.func}'", node.func_pos, hint=did_you_mean(node.func, known))
        module, decl = found
        if decl.kind != "pattern":
            raise self.error(f"'{node.func}' is a recurrence; only patterns can be used in a mask", node.func_pos)
        if node.args:
            raise self.error(f"pattern '{node.func}' takes keyword arguments only", node.args[0].pos)
        ident = f"{module.filename}:{decl.name}"
        chain = (*self.call_stack, f"{self.module.filename}:{self.decl.name}")
        if ident in chain:
            names = [c.rsplit(":", 1)[1] for c in chain[chain.index(ident):]] + [decl.name]
            raise self.error(f"pattern '{decl.name}' calls itself: " + " -> ".join(names), node.func_pos)
        callee_params = {p.name: p for p in decl.params}
        given: dict[str, Typed] = {}
        for kw in node.kwargs:
            if kw.name not in callee_params:
                raise self.error(f"pattern '{decl.name}' has no parameter '{kw.name}'", kw.pos,
                                 hint=did_you_mean(kw.name, callee_params) or (
                                     "parameters: " + ", ".join(callee_params) if callee_params else None))
            given[kw.name] = self.expr(kw.value)
        for name, typed in given.items():
            default = callee_params[name].default
            want = None if default is None else _kind_of_value(default)
            if want is not None and typed.type != want and not (want == FLOAT and typed.type == INT):
                kw = next(k for k in node.kwargs if k.name == name)
                raise self.error(f"parameter '{name}' of '{decl.name}' is {want}, got {_article(typed.type)}", kw.value.pos)
        frame = self._callee_frame(module, decl, node)
        callee = Checker(module, decl, {}, self.resolve, strict=True, frame=frame, call_stack=chain, param_exprs=given)
        try:
            result = callee.lower()
        except SpecError as err:
            if err.filename == module.filename and module is not self.module:
                raise self.error(f"in pattern '{decl.name}' called here: {err.message}", node.func_pos) from None
            raise
        for name, inp in callee.inputs.items():
            mine = self.inputs.get(name)
            if mine is None:
                self.inputs[name] = inp
            elif (mine.dtype, mine.dims) != (inp.dtype, inp.dims):
                raise self.error(f"input '{name}' of '{decl.name}' differs from this pattern's '{name}'", node.func_pos)
        self.windows.extend(callee.windows)
        return Typed(BOOL, result.mask)

    def _callee_frame(self, module: ast.Module, decl: ast.Declaration, node: ast.Call) -> Frame:
        """The callee sees the caller's positions; its grid axes and named segments must exist in the caller."""
        frame = self.frame
        layouts = [c for c in decl.clauses if isinstance(c, ast.LayoutClause)]
        sizes = dict(frame.sizes)
        q_layout, k_layout = frame.queries, frame.keys
        for c in layouts:
            segments = c.layout.segments
            for a in [a for seg in segments for a in seg.axes] if segments else c.layout.axes:
                for layout in (q_layout, k_layout):
                    if a.name not in (name for name, _ in layout.coordinate_axes):
                        raise self.error(
                            f"pattern '{decl.name}' uses axis '{a.name}', which this pattern's layout lacks",
                            node.func_pos,
                        )
                if isinstance(a.size, str):
                    sizes[a.size] = q_layout.size_of(a.name)
            for seg in segments:
                if seg.kind != "seq" or not isinstance(seg.size, str):
                    continue
                for layout in (q_layout, k_layout):
                    if seg.size not in layout.segment_names:
                        raise self.error(
                            f"pattern '{decl.name}' uses segment '{seg.size}', which this pattern's layout lacks",
                            node.func_pos,
                        )
                sizes[seg.size] = next(s.size for s in q_layout.segments if s.name == seg.size)
        return Frame(q_layout, k_layout, sizes)


def _fold(expr: sympy.Basic) -> sympy.Basic:
    """Exact constants like log(31/32) become floats, so the IR holds plain numbers."""
    if not expr.free_symbols and not isinstance(expr, sympy.Number) and expr.is_number:
        value = expr.evalf(30)
        if value.is_real and value.is_finite:
            return sympy.Float(value, 30)
    return expr


def _size_names(layout: ast.Layout) -> list[str]:
    """The size names a layout declares (axis extents and segment sizes), in order."""
    axes = [a for seg in layout.segments for a in seg.axes] if layout.segments else list(layout.axes)
    names = [a.size for a in axes if isinstance(a.size, str)]
    return names + [seg.size for seg in layout.segments if seg.kind == "seq" and isinstance(seg.size, str)]


def _article_of(what: str) -> str:
    return ("an " if what[0] in "aeiou" else "a ") + what


def _article(kind: str) -> str:
    return {"int": "an int", "float": "a float", "bool": "a bool"}[kind]
