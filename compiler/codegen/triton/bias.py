"""The bias term as the Triton kernels compute it: its factor per head (computed once per head,
in log2 units), the input indices the forward kernel checks on attended pairs, and its
derivatives (the backward's gradients of bias inputs: added by the dQ kernel, or on the host in torch's
deterministic mode)."""

from __future__ import annotations

import sympy
import torch

from ....core import ir
from ....core import symbols as S
from ....core.errors import SpecError
from ...analysis import evaluate as E
from ..expr_printer import has_input
from .exprs import FP32_MAX, LOG2E


# ----------------------------------------------------------------- the bias, split per head
def head_factor(bias: sympy.Basic) -> tuple[sympy.Basic, sympy.Basic]:
    """``bias = coef * rest`` with ``coef`` the factors of a top-level product that depend on the
    head alone (numbers included, inputs not): the kernels compute it once per head, times
    log2(e), and multiply each score's ``rest`` by it (ALiBi's slope: no power or division per
    score). An integer-valued bias stays whole (its integer arithmetic, wrap-around
    included, is the evaluator's); an integer combination with rational coefficients gives its
    rational content (``q/3 - k/3``: ``1/3`` and ``q - k``). Float products are reordered only."""
    one = sympy.Integer(1)
    if bias.is_integer or not isinstance(bias, sympy.Expr):
        return one, bias
    if isinstance(bias, sympy.Add):
        coef, rest = bias.primitive()
        return (coef, rest) if coef != 1 and rest.is_integer else (one, bias)
    if not isinstance(bias, sympy.Mul):
        return (bias, one) if _head_only(bias) else (one, bias)
    head = [a for a in bias.args if _head_only(a)]
    rest = [a for a in bias.args if not _head_only(a)]
    if not head:
        return one, bias
    return sympy.Mul(*head), (sympy.Mul(*rest) if rest else one)


def split_bias(bias: sympy.Basic | None, bound: E.Bound) -> tuple[sympy.Basic, sympy.Basic | None]:
    """(coef, rest) of the bias as the kernels compute it: ``head_factor``'s split when log2(e)
    times the coefficient fits float32, else (1, bias); (1, None) without a bias."""
    coef, rest = head_factor(bias) if bias is not None else (sympy.Integer(1), None)
    if not _fits_log2_units(coef, bound):
        coef, rest = sympy.Integer(1), bias
    return coef, rest


def _fits_log2_units(coef: sympy.Basic, bound: E.Bound) -> bool:
    """Whether log2(e) times the coefficient stays a finite float32 on every head (a coefficient
    near the float32 limit is not folded: log2(e) * rest is then computed per score)."""
    values = E.head_values(coef, bound.subs, bound.heads) if not coef.is_Number else torch.tensor([float(coef)])
    return bool(torch.isfinite(values).all()) and float(values.abs().max()) * LOG2E <= FP32_MAX


def _head_only(e: sympy.Basic) -> bool:
    """Whether an expression is a value per head known at generation: no position, no input."""
    return isinstance(e, sympy.Expr) and e.free_symbols <= {S.H} and not has_input(e)


# ----------------------------------------------------------------- input indices checked
def bias_index_checks(pat: ir.PatternIR, bound: E.Bound) -> list[tuple[sympy.Basic, int]]:
    """(input read, dimension) of every index of the bias that is not proven in range
    on all valid (head, query, key): the forward kernel checks those on the attended
    pairs and reports an offending index (``ERR``), in this order. A literal index
    is checked at generation; an index of positions only is proven by intervals over
    the whole matrix; an index that reads an input is always checked."""
    if pat.bias is None:
        return []
    out = []
    for site in E.input_sites(E.substitute(pat.bias, bound)):
        dims = [int(sympy.sympify(d).subs(bound.subs)) for d in pat.input(S.input_name(site.func)).dims]
        for j, arg in enumerate(site.args):
            if not isinstance(arg, sympy.Integer) and not _proven_in_range(pat, bound, arg, dims[j]):
                out.append((site, j))
    return out


def _proven_in_range(pat: ir.PatternIR, bound: E.Bound, index: sympy.Basic, size: int) -> bool:
    """Whether an index of positions only lies in ``0..size - 1`` at every valid position,
    by interval bounds over the whole matrix with no intermediate integer near 2**63
    (where int64 would wrap and the bounds would not hold)."""
    from ...analysis.interval_numbers import Num
    from ...analysis.intervals import IntervalEvaluator

    if has_input(index):
        return False

    def box(hi: int) -> Num:
        return Num(torch.tensor(0.0, dtype=torch.float64), torch.tensor(float(hi), dtype=torch.float64))

    env = {S.Q: box(bound.n - 1), S.K: box(bound.nk - 1), S.H: box(bound.heads - 1)}
    for role, layout in (("q", pat.queries), ("k", pat.keys)):
        for axis, extent in layout.axes:
            env[S.coord(role, axis)] = box(int(extent.subs(bound.subs)) - 1)
    try:
        ev = IntervalEvaluator(env)
        for node in sympy.preorder_traversal(index):
            if isinstance(node, sympy.Expr) and node.is_integer and not node.is_Number:
                b = ev(node)
                if not (float(b.lo) > -(2.0 ** 62) and float(b.hi) < 2.0 ** 62):
                    return False
        b = ev(index)
        return float(b.lo) >= 0 and float(b.hi) <= size - 1
    except (SpecError, TypeError, ValueError, KeyError):  # no interval rule: check at run time
        return False


# ----------------------------------------------------------------- derivatives
def derivative(expr: sympy.Basic, u: sympy.Basic) -> sympy.Basic:
    """d expr / d u with the evaluator's (torch autograd's) rules at the kinks, in terms
    the evaluator computes: abs' = sign (0 at 0); min/max follow the active argument and
    split a tie evenly between the two sides of each pairwise step, in ``expr``'s order of the
    arguments (``max(a, b, c)`` is ``max(max(a, b), c)``: a three-way tie gives 1/4, 1/4 and 1/2);
    floor, ceiling and ``//`` have derivative 0; ``a % b`` is ``a - b * (a // b)``. ``u``: a real
    symbol, or an input read of ``expr`` (``w[k]``), differentiated as a real variable in its place."""
    frozen: dict = {}

    def freeze(node):
        d = sympy.Dummy("c", real=True)
        frozen[d] = node
        return d

    def condition(relation):
        # A branch's condition, opaque while differentiating (a Boolean symbol), taken on the original arguments
        # (a min, not its rewrite); the branches are the IR's unfolded Piecewise: sympy's own folded a Piecewise in
        # a condition (rewriting it to sets), which took minutes or failed for a few nested clamps or an `if`
        d = sympy.Dummy("cond")
        frozen[d] = relation
        return d

    def rewrite(e):
        if not e.has(u):
            return e
        args = [rewrite(a) for a in e.args]
        # (a frozen value and a condition read the original arguments: the rewritten ones hold other frozen symbols)
        if isinstance(e, sympy.floor | sympy.ceiling | S.FloorDiv):
            return freeze(e)
        if isinstance(e, sympy.Mod):
            a, b = args
            return a - b * freeze(S.FloorDiv(*e.args))
        if isinstance(e, sympy.Abs):
            (a,), (orig,) = args, e.args
            return S.Piecewise((a, condition(orig > 0)), (-a, condition(orig < 0)), (0, True))
        if isinstance(e, sympy.Min | sympy.Max):
            out, orig = args[0], e.args[0]
            for b, b_orig in zip(args[1:], e.args[1:], strict=True):
                first, second = (orig < b_orig, orig > b_orig) if isinstance(e, sympy.Min) else (orig > b_orig,
                                                                                                orig < b_orig)
                out = S.Piecewise((out, condition(first)), (b, condition(second)), ((out + b) / 2, True))
                orig = e.func(orig, b_orig)
            return out
        if not args:
            return e
        return e.func(*args)

    # the kinks are rewritten before a read is made a variable: replaced first, sympy would sort a min's
    # arguments anew around it, and each read would be differentiated under another pairwise order (the
    # shares of a three-way tie then summed to 3/4)
    body = rewrite(expr)
    if isinstance(u, sympy.Symbol):
        d = sympy.diff(body, u)
    else:
        x = sympy.Dummy("u", real=True)
        d = sympy.diff(body.xreplace({u: x}), x).xreplace({x: u})
    return d.xreplace(frozen) if frozen else d


def bias_input_sites(bias: sympy.Basic, names) -> list[tuple[sympy.Basic, sympy.Basic]]:
    """Each place ``bias`` reads one of the inputs ``names`` (an input read, ``X[i, j, ...]``), with d bias / d (the
    value read there) (``derivative``'s rules), in a deterministic order: a bias input's gradient is dS times that
    derivative, added at the place's index."""
    sites = sorted((f for f in bias.atoms(sympy.Function) if S.input_name(f.func) in names), key=sympy.default_sort_key)
    return [(site, derivative(bias, site)) for site in sites]


def bias_input_names(pat: ir.PatternIR) -> set[str]:
    """The float inputs the bias reads (their gradients take dS per pair: the dQ kernel's)."""
    return {name for f in pat.bias.atoms(sympy.Function) if (name := S.input_name(f.func))
            and pat.input(name).dtype == "float"}
