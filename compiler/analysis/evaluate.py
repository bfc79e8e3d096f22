"""Exact, vectorised evaluation of IR expressions in torch. The semantics of record: every backend is tested
against what this computes. The sizes and inputs it evaluates at are bound by ``binding`` (``Bound``,
``bind_sizes``, ``bind_inputs``), re-exported here: the callers bind and evaluate through one name, ``E``.

Integers are int64 and exact; ``//`` and ``%`` are floored (Python's rule,
also for negative operands and floats); a rational combination of integers
(``(q - k) / 3``) is computed exactly and divided once. To keep masks total
when every branch is evaluated, ``x // 0`` is 0 and ``x % 0`` is x for ints;
floats follow IEEE as torch does (``x // 0.0`` is +-inf or NaN, ``x % 0.0`` NaN).

Tensors are 4-D, ``[batch | 1, heads | 1, queries | 1, keys | 1]``.
"""

from __future__ import annotations

import functools

import sympy
import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from .binding import (  # noqa: F401 (re-exported: binding and evaluation are read through one name, E)
    INT,
    Bound,
    bind_inputs,
    bind_sizes,
    block_bound,
    check_input_names,
    check_size_names,
    kernel_head_dim,
    plain_ints,
    positive_int,
)
from .float_ops import float_pow, min_max

FLOAT = torch.float64


# ----------------------------------------------------------------- evaluation
def _is_float(x) -> bool:
    return isinstance(x, float) or (isinstance(x, torch.Tensor) and x.dtype.is_floating_point)


def as_tensor(x, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if dtype is None or x.dtype == dtype else x.to(dtype)
    if dtype is None:
        dtype = torch.bool if isinstance(x, bool) else (INT if isinstance(x, int) else FLOAT)
    return torch.tensor(x, dtype=dtype)


def _promote(*xs):
    """Python's int/float promotion: any float makes all float64."""
    if any(_is_float(x) for x in xs):
        return [(x.to(FLOAT) if isinstance(x, torch.Tensor) and not x.dtype.is_floating_point else
                 float(x) if not isinstance(x, torch.Tensor) else x) for x in xs]
    return list(xs)


def _floordiv(a, b):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        if _is_float(a) or _is_float(b):
            return S.float_floordiv(float(a), float(b))  # torch's IEEE result for b == 0
        return 0 if b == 0 else a // b
    a, b = _promote(a, b)
    if _is_float(a):
        return torch.div(as_tensor(a), b, rounding_mode="floor")
    bt = as_tensor(b)
    safe = torch.where(bt == 0, torch.ones_like(bt), bt)
    return torch.where(bt == 0, torch.zeros((), dtype=INT), torch.div(as_tensor(a), safe, rounding_mode="floor"))


def _mod(a, b):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        if _is_float(a) or _is_float(b):
            return S.float_mod(float(a), float(b))
        return a if b == 0 else a % b
    a, b = _promote(a, b)
    if _is_float(a):  # (the dtype as torch.remainder would give it: a 0-dim divisor does not widen)
        dtype = torch.result_type(as_tensor(a), as_tensor(b))
        return S.float_remainder(*torch.broadcast_tensors(as_tensor(a), as_tensor(b))).to(dtype)
    at, bt = as_tensor(a), as_tensor(b)
    safe = torch.where(bt == 0, torch.ones_like(bt), bt)
    return torch.where(bt == 0, at, torch.remainder(at, safe))


def bit_length_tensor(x: torch.Tensor) -> torch.Tensor:
    """Python's int.bit_length, exactly, on an int64 tensor."""
    y = as_tensor(x).abs()
    if y.numel() and int(y.max()) < 2**53:  # held exactly by a double: its exponent is the bit length
        return torch.frexp(y.to(torch.float64)).exponent.to(y.dtype)  # (frexp(0) gives 0)
    out = torch.zeros_like(y)
    for s in (32, 16, 8, 4, 2, 1):
        big = y >= (1 << s)
        out = out + big * s
        y = torch.where(big, y >> s, y)
    return out + (y > 0).to(INT)


def window_range(qa, L: int, size: int, dilation: int, stride: int, causal: bool):
    """NATTEN's window of query coordinates ``qa`` (tensor) on an axis of length L:
    (first key, last key) in axis coordinates; keys in between step by ``dilation``."""
    d, s = dilation, stride
    qa = as_tensor(qa)
    g = qa % d
    Lg = (L - g + d - 1) // d
    iq = qa // d
    if causal:
        leader = torch.minimum((iq // s) * s + s - 1, Lg - 1)
        lo, hi = (leader - size + 1).clamp(min=0), iq
    else:
        leader = torch.minimum((iq // s) * s + s // 2, Lg - 1)
        wl, wr = size // 2, size // 2 + size % 2 - 1
        centre = torch.minimum(torch.maximum(leader, torch.full_like(leader, wl)), Lg - 1 - wr)
        lo, hi = centre - wl, centre + wr
    return lo * d + g, hi * d + g


def window_tensor(qa, ka, L: int, size: int, dilation: int, stride: int, causal: bool) -> torch.Tensor:
    """Vectorised ``symbols.window_keys``: NATTEN's neighborhood along one axis."""
    qa, ka = as_tensor(qa), as_tensor(ka)
    first, last = window_range(qa, L, size, dilation, stride, causal)
    return ((ka - qa) % dilation == 0) & (ka >= first) & (ka <= last)


def ratio_parts(e: sympy.Basic) -> tuple[sympy.Expr, sympy.Expr] | None:
    """(numerator, denominator) of an Add/Mul with a rational coefficient or a
    negative power, both integer expressions, when evaluation computes it as one
    division of integers (``Evaluator._exact_ratio``; the interval rules mirror it)."""
    if not any(isinstance(r, sympy.Rational) and not r.is_Integer for r in e.args) and not any(
        isinstance(a, sympy.Mul) and any(isinstance(r, sympy.Rational) and not r.is_Integer for r in a.args)
        for a in e.args
    ) and not any(isinstance(a, sympy.Pow) and a.exp.is_negative for a in e.args):
        return None
    num, den = sympy.fraction(sympy.together(e))
    if den == 1 or not (num.is_integer and den.is_integer):
        return None
    return num, den


class Evaluator:
    """Evaluates sympy IR expressions given tensors for symbols and inputs.

    ``guard``: where input indices are checked. None (the mask): every
    position, an index outside its input is an error. A bool tensor
    (broadcastable to the positions; score terms): only where it holds (the
    attended pairs); elsewhere an out-of-range index is never an error and
    reads element 0 instead, a value the caller discards."""

    def __init__(self, env: dict, inputs: dict[str, torch.Tensor], batched: set[str], batch: int | None,
                 guard: torch.Tensor | None = None):
        self.env = env
        self.inputs = inputs
        self.batched = batched
        self.batch = batch
        self.guard = guard
        self.cache: dict = {}

    def guarded(self, guard: torch.Tensor) -> Evaluator:
        """This evaluator with input indices checked only where ``guard`` holds (values
        already computed stay valid, they were checked everywhere, except those that read inputs: read again
        under the guard, see ``_input``)."""
        out = Evaluator(self.env, self.inputs, self.batched, self.batch, guard)
        # not the input reads: a guarded read keeps the pairs not attended out of the gradients (``_input``)
        out.cache = {e: v for e, v in self.cache.items() if not input_sites(e)}
        return out

    def __call__(self, expr: sympy.Basic):
        key = expr
        if key in self.cache:
            return self.cache[key]
        try:
            value = self._eval(expr)
        except OverflowError:  # sizes folded into a constant coefficient past 64 bits (q * n * 2**60 at n = 16)
            raise SpecError(f"the expression folds to a constant past 64 bits at these sizes: {expr}",
                            where="evaluation", hint="integer arithmetic wraps at 64 bits at run time, but sizes "
                            "and constants are multiplied out exactly: write them so that their product fits"
                            ) from None
        self.cache[key] = value
        return value

    def _eval(self, e: sympy.Basic):
        if e is sympy.true or e is sympy.false:
            return bool(e)
        if isinstance(e, sympy.Integer):
            return int(e)
        if isinstance(e, sympy.Rational | sympy.Float):
            return float(e)
        if e.is_Number or isinstance(e, sympy.NumberSymbol):
            return float(e.evalf(30))
        if isinstance(e, sympy.Symbol):
            if e not in self.env:
                raise SpecError(f"'{str(e).removeprefix('param_').removeprefix('size_')}' has no value",
                                where="evaluation", hint="give every parameter and size a value")
            return self.env[e]
        if isinstance(e, sympy.Add | sympy.Mul):
            exact = self._exact_ratio(e)
            if exact is not None:
                return exact
            terms = S.float_factored(e.args) if isinstance(e, sympy.Add) else e.args  # (q - k) * 0.1 rounded once
            vals = [v.to(FLOAT) if _is_float(v) and isinstance(v, torch.Tensor) else v for v in _promote(*(self(a) for a in terms))]  # float64 (float32 input + 1e308 overflowed)
            out = vals[0]
            for v in vals[1:]:
                out = out + v if isinstance(e, sympy.Add) else out * v
            return out
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if isinstance(e, S.FloorDiv):
            return _floordiv(self(e.args[0]), self(e.args[1]))
        if isinstance(e, sympy.Mod):
            return _mod(self(e.args[0]), self(e.args[1]))
        if isinstance(e, sympy.Min | sympy.Max):
            vals = [as_tensor(v) for v in _promote(*(self(a) for a in e.args))]
            return min_max(vals, isinstance(e, sympy.Min))  # -0.0 < 0.0 in every element
        if isinstance(e, sympy.Abs):
            v = self(e.args[0])
            return abs(v)
        if isinstance(e, sympy.floor | sympy.ceiling):
            v = self(e.args[0])
            if not _is_float(v):
                return v
            return (torch.floor if isinstance(e, sympy.floor) else torch.ceil)(as_tensor(v))
        if isinstance(e, sympy.Piecewise):
            *rest, (last, _) = e.args
            out = self(last)
            for value, cond in reversed(rest):
                a, b = _promote(self(value), out)
                out = torch.where(as_tensor(self(cond)), as_tensor(a), as_tensor(b))
            return out
        if isinstance(e, sympy.core.relational.Relational):
            a, b = _promote(self(e.lhs), self(e.rhs))
            a = as_tensor(a)
            op = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}[e.rel_op]
            return op(a, b)
        if isinstance(e, sympy.And | sympy.Or | sympy.Xor):
            vals = [as_tensor(self(a)) for a in e.args]
            fn = {sympy.And: torch.logical_and, sympy.Or: torch.logical_or, sympy.Xor: torch.logical_xor}[type(e)]
            out = vals[0]
            for v in vals[1:]:
                out = fn(out, v)
            return out
        if isinstance(e, sympy.Not):
            return torch.logical_not(as_tensor(self(e.args[0])))
        if isinstance(e, sympy.Equivalent):
            vals = [as_tensor(self(a)) for a in e.args]
            return torch.stack(torch.broadcast_tensors(*vals)).all(0) | ~torch.stack(torch.broadcast_tensors(*vals)).any(0)
        if isinstance(e, sympy.ITE):
            c, a, b = (as_tensor(self(x)) for x in e.args)
            return torch.where(c, a, b)
        if isinstance(e, sympy.exp | S.Log | sympy.tanh | S.Sqrt):
            fn = {sympy.exp: torch.exp, S.Log: torch.log, sympy.tanh: torch.tanh, S.Sqrt: torch.sqrt}[type(e)]
            return fn(as_tensor(float(self(e.args[0])) if not isinstance(self(e.args[0]), torch.Tensor) else self(e.args[0]), FLOAT))
        if isinstance(e, S.IsPow2):
            x = as_tensor(self(e.args[0]))
            return (x > 0) & ((x & (x - 1)) == 0)
        if isinstance(e, S.BitLength):
            return bit_length_tensor(self(e.args[0]))
        if isinstance(e, S.Log2Floor):
            x = as_tensor(self(e.args[0]))
            return torch.where(x >= 1, bit_length_tensor(x) - 1, torch.full_like(x, -1))
        if isinstance(e, S.BitAnd | S.BitOr | S.BitXor | S.ShiftLeft | S.ShiftRight):
            a, b = as_tensor(self(e.args[0])), self(e.args[1])
            fn = {S.BitAnd: torch.bitwise_and, S.BitOr: torch.bitwise_or, S.BitXor: torch.bitwise_xor,
                  S.ShiftLeft: torch.bitwise_left_shift, S.ShiftRight: torch.bitwise_right_shift}[type(e)]
            return fn(a, as_tensor(b))
        if isinstance(e, S.BitNot):
            return torch.bitwise_not(as_tensor(self(e.args[0])))
        if isinstance(e, S.Window):
            qa, ka, L, size, dil, stride, causal = e.args
            # sizes known as numbers, or as symbols bound to ints (an unsubstituted expression)
            consts = [v for v in (self(x) for x in (L, size, dil, stride)) if type(v) is int]
            if len(consts) != 4:
                raise SpecError("window() sizes must be known numbers at evaluation", where="evaluation")
            return window_tensor(self(qa), self(ka), *consts, causal=bool(causal))
        name = S.input_name(e.func)
        if name is not None:
            return self._input(name, e.args)
        raise SpecError(f"cannot evaluate {type(e).__name__}", where="evaluation")  # a checker gap

    def _exact_ratio(self, e):
        """q/3 - k/3 as (q - k) / 3: integers exact, one rounding at the end."""
        parts = ratio_parts(e)
        if parts is None:
            return None
        a, b = self(parts[0]), self(parts[1])
        if _is_float(a) or _is_float(b):
            return None
        return as_tensor(a, FLOAT) / as_tensor(b, FLOAT) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else (
            a / b if b != 0 else float("nan") if a == 0 else float("inf") * (1 if a > 0 else -1))

    def _pow(self, e: sympy.Pow):
        base, exp = self(e.base), self(e.exp)
        if not _is_float(base) and not _is_float(exp):
            exp_nonneg = e.exp.is_nonnegative
            if exp_nonneg:
                if isinstance(base, torch.Tensor) or isinstance(exp, torch.Tensor):
                    return torch.pow(as_tensor(base), as_tensor(exp))
                return base**exp
        base_f = as_tensor(base, FLOAT) if isinstance(base, torch.Tensor) else float(base)
        exp_f = as_tensor(exp, FLOAT) if isinstance(exp, torch.Tensor) else float(exp)
        return float_pow(base_f, exp_f)  # the same bits wherever the pair sits in the tensor

    def _input(self, name: str, args):
        t = self.inputs[name]
        batched = name in self.batched
        idx = [as_tensor(self(a)) for a in args]
        sizes = t.shape[1:] if batched else t.shape
        for i, (ix, size) in enumerate(zip(idx, sizes, strict=True)):
            outside = (ix < 0) | (ix >= size)
            if not bool(outside.any()):
                continue
            bad = outside if self.guard is None else outside & self.guard
            if bool(bad.any()):
                value = int(torch.broadcast_to(ix, bad.shape)[bad][0])
                raise index_error(name, i, value, size, guarded=self.guard is not None)
            idx[i] = torch.where(outside, torch.zeros((), dtype=ix.dtype), ix)  # read, then discarded
        if batched:  # the batch replaces the leading (size-1) dimension of the positions
            # scalar indices (``plen[0]``) take the positions' rank, so the batch lands in front
            ndim = max([ix.dim() for ix in idx] + [v.dim() for v in self.env.values() if isinstance(v, torch.Tensor)])
            b = torch.arange(t.shape[0]).view(-1, *([1] * (ndim - 1)))
            value = t[(b, *idx)]
        else:
            value = t[tuple(idx)]
        if self.guard is not None and value.dtype.is_floating_point and value.requires_grad:
            # a score term: the pairs not attended read 0, so that nothing they read reaches a gradient (their
            # dS is 0, but 0 times a partial of inf, as s * t[i] with t[i] = -inf there, would be NaN)
            value = torch.where(self.guard, value, torch.zeros((), dtype=value.dtype))
        return value


def index_error(name: str, dim: int, value: int, size: int, *, guarded: bool) -> SpecError:
    """The one error of an input indexed outside its extent (every backend raises this)."""
    where = "at a (query, key) pair the pattern attends" if guarded else "in the mask (evaluated on every pair)"
    return SpecError(
        f"input '{name}' indexed out of range {where}: index {value} in dimension {dim}, valid 0..{size - 1}",
        where=f"argument {name}",
        hint=None if guarded else "a mask reads its inputs at every (query, key) pair: keep the index in range "
                                  "(e.g. with clamp), or index in the bias, which reads only attended pairs",
    )


def input_sites(expr: sympy.Basic | None) -> list[sympy.Basic]:
    """The input reads (``w[k + 1]``) of an expression, in a deterministic order."""
    if expr is None:
        return []
    return sorted((f for f in expr.atoms(sympy.Function) if S.input_name(f.func)), key=sympy.default_sort_key)


@functools.lru_cache(maxsize=256)
def input_names(expr: sympy.Basic) -> frozenset[str]:
    """The call-time inputs an expression reads (memoised: asked on every call, e.g. of the mask). Each
    distinct sub-expression is visited once: nested lets share theirs, and their tree (``atoms``'
    walk) can be exponentially larger than the expression."""
    seen: set = set()
    names: set = set()
    stack = [expr]
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        if isinstance(e, sympy.Function) and (name := S.input_name(e.func)):
            names.add(name)
        stack.extend(e.args)
    return frozenset(names)


def mask_input_names(pat: ir.PatternIR) -> frozenset[str]:
    """The call-time inputs that the mask and the route's selection read (its keep, its indexer,
    its scores), with the centroids of the cluster ids among them: all that a mask needs
    (``attnc show``, ``materialize_mask``), not a bias's table or a gate."""
    names = set(input_names(pat.mask))
    route = pat.route
    if route is not None:
        names |= set(input_names(route.keep)) if isinstance(route.keep, sympy.Basic) else set()
        names |= set(route.inputs)
    names |= {d.derived[2] for d in pat.inputs if d.name in names and d.derived is not None
              and d.derived[0] == "cluster"}
    return frozenset(names)


#: Positions evaluated at once by ``check_mask_indices``.
CHECK_CHUNK = 1 << 22


def check_mask_indices(pat: ir.PatternIR, bound: Bound, inputs: dict, batch: int | None = None, *,
                       value_indexed: bool | None = None) -> None:
    """Raise ``index_error`` unless every input index of the mask is in range at every
    (head, query, key): the mask is read everywhere (the reference evaluates it on
    the whole matrix), while the tiled backends evaluate it on PARTIAL tiles only.
    Only the index expressions are evaluated, by chunks of queries, and over one
    query (key) where they do not depend on the query (key). ``value_indexed``: only the
    reads whose index reads an input (True; ``value_indexed_sites``) or only the others (False),
    whose check depends on the sizes alone, not on any input's values."""
    if not input_names(pat.mask):
        return
    q_syms = {S.Q} | {S.coord("q", a) for a in pat.queries.axis_names}
    k_syms = {S.K} | {S.coord("k", a) for a in pat.keys.axis_names}
    for site in input_sites(substitute(pat.mask, bound)):
        if value_indexed is not None and _reads_by_value(site) != value_indexed:
            continue
        n = bound.n if site.free_symbols & q_syms else 1
        nk = bound.nk if site.free_symbols & k_syms else 1
        rows = max(1, CHECK_CHUNK // (nk * bound.heads))
        for start in range(0, n, rows):
            ev = evaluator(pat, bound, inputs, batch=batch, q_index=torch.arange(start, min(n, start + rows)),
                           k_index=torch.arange(nk), required=mask_input_names(pat))
            ev(site)


def _reads_by_value(site: sympy.Basic) -> bool:
    """Whether an input read's index reads an input (``w[doc[q]]``), not positions and sizes alone."""
    return any(input_names(a) for a in site.args)


def value_indexed_sites(expr: sympy.Basic | None) -> list[sympy.Basic]:
    """The input reads of an expression whose index reads an input: whether they are in range depends on
    that input's values (every other read's on the sizes alone, checked once per sizes)."""
    return [site for site in input_sites(expr) if _reads_by_value(site)]


def token_env(pat: ir.PatternIR, bound: Bound, q_flat, k_flat, head) -> dict:
    """Symbol values for given flat query and key tokens (tensors of any broadcastable
    shapes): the sizes, ``h``, and ``q``/``k`` or their grid coordinates. ``q_flat``
    are query ROWS (0..n-1); ``bound.q_offset`` makes them absolute positions (``k_flat`` and
    ``bound.k_offset`` likewise)."""
    env: dict = {sym: int(v) for sym, v in bound.subs.items()}
    env[S.H] = head if isinstance(head, torch.Tensor) else torch.tensor([head], device=q_flat.device)  # as in the whole mask (int64 wraps; w // h is float64)
    if bound.q_offset:  # query rows are the last n tokens (or a block's): absolute positions
        q_flat = q_flat + bound.q_offset
    if bound.k_offset:  # a block's key rows: absolute positions
        k_flat = k_flat + bound.k_offset
    for role, layout, flat in (("q", pat.queries, q_flat), ("k", pat.keys, k_flat)):
        if layout.kind == "seq":
            env[S.Q if role == "q" else S.K] = flat
            continue
        rest = flat
        for axis, size in reversed(layout.axes):
            extent = int(size.subs(bound.subs))
            env[S.coord(role, axis)] = rest % extent
            rest = rest // extent
    return env


class _Positions(dict):
    """``position_env``'s symbols, the head index ``[1, heads, 1, 1]`` made only when an expression reads ``h``: a
    mask that never reads it at 10**9 heads is a broadcast view, not an 8 GB index made three times."""

    def __init__(self, env: dict, heads: int):
        super().__init__(env)
        self.heads = heads

    def __contains__(self, key) -> bool:
        return key == S.H or super().__contains__(key)

    def __missing__(self, key):
        if key != S.H:
            raise KeyError(key)
        value = self[S.H] = torch.arange(self.heads).view(1, -1, 1, 1)
        return value


def position_env(pat: ir.PatternIR, bound: Bound, q_index=None, k_index=None, heads: int | None = None) -> dict:
    """Symbol -> tensor over ``[1, heads, Nq, Nk]``: every query and key, or the given flat positions."""
    heads = bound.heads if heads is None else heads
    q_index = torch.arange(bound.n) if q_index is None else q_index
    k_index = torch.arange(bound.nk) if k_index is None else k_index
    env = token_env(pat, bound, q_index.to(INT).view(1, 1, -1, 1), k_index.to(INT).view(1, 1, 1, -1), 0)
    del env[S.H]
    return _Positions(env, heads)


def evaluator(pat: ir.PatternIR, bound: Bound, inputs: dict | None = None, *, batch: int | None = None,
              q_index=None, k_index=None, required: frozenset[str] | None = None) -> Evaluator:
    """An evaluator over all (head, query, key) positions of a bound pattern (``required``: the
    inputs it must be given, as ``bind_inputs`` takes them; default every declared one)."""
    tensors, found_batch = bind_inputs(pat, bound, inputs, batch, required=required)
    batched = {name for name, t in tensors.items() if t.dim() > len(pat.input(name).dims)}
    env = position_env(pat, bound, q_index, k_index)
    return Evaluator(env, tensors, batched, found_batch)


def substitute(expr: sympy.Basic, bound: Bound) -> sympy.Basic:
    """The sizes of ``bound`` put into ``expr`` (shared sub-expressions once)."""
    try:
        return S.substitute(expr, bound.subs)
    except (TypeError, ValueError, ZeroDivisionError) as err:  # e.g. (heads - 1) ** -1 compared at heads = 1
        raise SpecError(f"the expression is undefined at these sizes ({err})", where="evaluation") from None


def mask_tensor(pat: ir.PatternIR, bound: Bound, inputs: dict | None = None, *, batch: int | None = None,
                q_index=None, k_index=None) -> torch.Tensor:
    """The exact mask, bool ``[B | 1, heads, Nq, Nk]`` (route selection not applied). Only the
    inputs the mask reads must be given (``mask_input_names``: not a bias's table)."""
    ev = evaluator(pat, bound, inputs, batch=batch, q_index=q_index, k_index=k_index,
                   required=mask_input_names(pat))
    nq = bound.n if q_index is None else len(q_index)
    nk = bound.nk if k_index is None else len(k_index)
    value = as_tensor(ev(substitute(pat.mask, bound)), torch.bool)
    b = ev.batch or 1
    return torch.broadcast_to(value, (b, bound.heads, nq, nk))


def score_bias(pat: ir.PatternIR, bound: Bound, ev: Evaluator,
               allowed: torch.Tensor | None = None) -> torch.Tensor | float | None:
    """The ``bias`` term as float64 (broadcastable to ``[B, H, Nq, Nk]``), or None.
    ``allowed``: the attended pairs, where the bias's input indices are checked
    (elsewhere they are not an error: see ``Evaluator``)."""
    if pat.bias is None:
        return None
    if allowed is not None:
        ev = ev.guarded(allowed)
    value = ev(substitute(pat.bias, bound))
    return as_tensor(value, FLOAT) if isinstance(value, torch.Tensor) else float(value)


def head_values(expr: sympy.Expr, subs: dict, heads: int) -> torch.Tensor:
    """A head-only expression (softcap, a recurrence's constant decay) as float64 ``[heads]``."""
    env = {sym: int(v) for sym, v in subs.items()}
    env[S.H] = torch.arange(heads)
    value = Evaluator(env, {}, set(), None)(expr.subs(subs) if expr.free_symbols else expr)
    return as_tensor(value, FLOAT).expand(heads).clone() if as_tensor(value).dim() == 0 else as_tensor(value, FLOAT)
