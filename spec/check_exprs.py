"""Expressions and their types: names, coordinates, segment tests, input indexing,
operators, comparisons and conditionals, each typed and lowered to sympy.

Types combine as in Python, except that ``and``/``or``/``not`` take bools only,
arithmetic never takes bools, and ``int ** int`` is an int only when the exponent is
known to be >= 0."""

from __future__ import annotations

import math

import sympy

from ..core import symbols as S
from ..core.errors import Pos, did_you_mean
from . import ast
from .check_types import (
    BOOL,
    BUILTINS,
    FLOAT,
    INT,
    INT64_LIMIT,
    Typed,
    article,
    fold,
    kind_of_value,
    sympy_value,
)


class ExpressionChecks:
    """Checker methods that type and lower expressions (calls aside)."""

    def expect(self, node: ast.Expr, want: str, what: str) -> Typed:
        typed = self.expr(node)
        if typed.type != want:
            hint = None
            if want == INT and typed.type == FLOAT:  # (q - k) / 2: the language's / is a true division
                hint = "'/' divides as floats: '//' divides ints (floor division), e.g. (q - k) // 2"
            raise self.error(f"{what} must be {article(want)}, got {article(typed.type)}", node.pos, hint=hint)
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
        folded = None if isinstance(e, sympy.Number) else self._bad_fold(e)
        if folded is not None and not isinstance(folded, sympy.Integer):
            # an operand that is zero whatever q and k, under a division or a negative power: sympy folds the
            # part to complex infinity (or NaN), which no evaluator takes
            raise self.error("expression divides by zero: a part of it is 0 for every position", node.pos,
                             hint="write the division without the operand that is always 0")
        if folded is not None:
            # constants multiplied out exactly (q * 2**62 * 4 is q * 2**64), where the run time's 64-bit integers
            # would wrap: no backend could evaluate the folded form as the text reads
            raise self.error(f"constant too large: this expression folds to a coefficient of {folded}, which does "
                             "not fit in 64 bits", node.pos,
                             hint="integer arithmetic wraps at 64 bits at run time; write the constants so that "
                                  "their product fits")
        return typed

    def _bad_fold(self, e: sympy.Basic) -> sympy.Basic | None:
        """A part of ``e`` that sympy folded to what no evaluator takes: complex infinity or NaN, or an integer
        past 64 bits; None if there is none. A walk of its parts that stops at those already walked (a node's
        operands were checked before it, and lets share parts: linear)."""
        walked = self.__dict__.setdefault("_walked_parts", {})  # id -> part (held, so that ids stay unique)
        stack = [e]
        while stack:
            part = stack.pop()
            if id(part) in walked:
                continue
            if part is sympy.zoo or part is sympy.nan:
                return part
            if isinstance(part, sympy.Integer) and not -INT64_LIMIT <= int(part) < INT64_LIMIT:
                return part
            walked[id(part)] = part
            stack.extend(part.args)
        return None

    def _e_Num(self, node: ast.Num) -> Typed:
        return Typed(kind_of_value(node.value), sympy_value(node.value))

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
                raise self.error(f"'~' needs an int, got {article(operand.type)}", node.operand.pos)
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
        return Typed(FLOAT, fold(x**y))

    def _e_Compare(self, node: ast.Compare) -> Typed:
        vals = [self.expr(o) for o in node.operands]
        parts = []
        for (a, b), op, onode in zip(zip(vals, vals[1:], strict=False), node.ops, node.operands[1:], strict=True):
            if (a.type == BOOL) != (b.type == BOOL):
                raise self.error(f"cannot compare {article(a.type)} with {article(b.type)}", onode.pos)
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
