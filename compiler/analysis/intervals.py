"""Sound interval evaluation of IR expressions over boxes of (query, key)
positions, vectorised over many boxes at once.

A number is bounded by ``Num``: ``(lo, hi)`` float64 tensors bounding every
value that is not NaN (``lo > hi``: none is), ``nan`` (bool tensor: may a
value be NaN) and ``dtype`` (None for an int64 value, else the float dtype
the exact evaluator computes it in). A bool is bounded by ``(may_true,
may_false)`` bool tensors. Every rule over-approximates what
``compiler.analysis.evaluate`` computes: if some point of the box gives a value, the
bounds contain it, and a NaN anywhere below a comparison makes it possibly
False (NaN compares false; ``!=`` true).

Exactness w.r.t. the evaluator's arithmetic, not just the real numbers:

- integers are int64 and wrap around: bounds above 2**53 are rounded
  outwards, and bounds beyond 2**63 give the whole int64 range;
- float64 operations are computed on the bounds in the evaluator's order
  (``q/3 - k/3`` as one division, as ``evaluate.ratio_parts`` says);
  correctly rounded operations are monotone, so corners bound them, and
  transcendental functions are widened by two ulps;
- values the evaluator computes in a narrower float dtype (a float32 input)
  are widened by that dtype's rounding after every operation and comparison.

Affine terms, comparisons and NATTEN windows are exact on boxes, which is
what makes tile classification of bands and neighborhoods exact.
"""

from __future__ import annotations

import math

import sympy
import torch

from ...core import symbols as S
from ...core.errors import SpecError
from .evaluate import ratio_parts, window_range

F = torch.float64
INF = math.inf
#: Integers are exact in float64 below this.
EXACT = 2.0**53
#: int64 wraps around at this magnitude.
WRAP = 2.0**63


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=F if not isinstance(x, bool) else torch.bool)


_FALSE = torch.tensor(False)
_TRUE = torch.tensor(True)


class Num:
    """Bounds of a number; see the module docstring."""

    __slots__ = ("lo", "hi", "nan", "dtype")

    def __init__(self, lo, hi, nan=None, dtype: torch.dtype | None = None):
        self.lo, self.hi = _t(lo), _t(hi)
        self.nan = _FALSE if nan is None else _t(nan)
        self.dtype = dtype

    @property
    def is_float(self) -> bool:
        return self.dtype is not None

    @property
    def empty(self) -> torch.Tensor:
        """No value of the box is a number (all NaN)."""
        return self.lo > self.hi


class Bool:
    __slots__ = ("t", "f")

    def __init__(self, may_true, may_false):
        self.t, self.f = may_true, may_false


def point(x) -> Num:
    """A known value: a Python int (int64), a float, or a tensor of either."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point:
            v = x.to(F)
            return _make(v, v, torch.isnan(v), x.dtype)
        v = x.to(F)
        return _int_num(v, v)
    if isinstance(x, bool | int):
        return _int_num(_t(float(x)), _t(float(x)))
    v = _t(float(x))
    return _make(v, v, torch.isnan(v), F)


def _nan_to(x: torch.Tensor, value: float) -> torch.Tensor:
    """NaN replaced by ``value``, infinities kept (torch's nan_to_num would clip them)."""
    return torch.where(torch.isnan(x), _t(value), x)


def _nan0(x: torch.Tensor) -> torch.Tensor:
    return _nan_to(x, 0.0)


def _make(lo, hi, nan, dtype, *args: Num) -> Num:
    """A result: NaN bounds made infinite, NaN propagated from the operands, an
    operand with no number gives none, narrow float dtypes widened."""
    lo, hi = _nan_to(_t(lo), -INF), _nan_to(_t(hi), INF)
    nan = _t(nan)
    for a in args:
        nan = nan | a.nan
        lo = torch.where(a.empty, _t(INF), lo)
        hi = torch.where(a.empty, _t(-INF), hi)
    if dtype is not None and dtype != F:
        lo, hi = _widen_narrow(lo, hi, dtype)
    return Num(lo, hi, nan, dtype)


def _widen_narrow(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cover one rounding to a narrower float dtype (and its overflow to inf)."""
    info = torch.finfo(dtype)
    eps = 2 * info.eps
    # an infinite bound rounds to itself (+inf - inf * eps would be NaN: a bound of no number)
    wlo = torch.where(lo < -info.max, _t(-INF), torch.where(lo == INF, lo, lo - lo.abs() * eps - info.tiny))
    whi = torch.where(hi > info.max, _t(INF), torch.where(hi == -INF, hi, hi + hi.abs() * eps + info.tiny))
    keep = lo > hi  # no number: stays empty
    return torch.where(keep, lo, wlo), torch.where(keep, hi, whi)


def _int_num(lo, hi) -> Num:
    """An int64 result: bounds rounded outwards above 2**53; beyond 2**63 the
    evaluator wraps around, so any int64 is possible."""
    lo, hi = _nan_to(_t(lo), -INF), _nan_to(_t(hi), INF)
    lo = torch.where(lo.abs() > EXACT, torch.nextafter(lo, torch.full_like(lo, -INF)), lo)
    hi = torch.where(hi.abs() > EXACT, torch.nextafter(hi, torch.full_like(hi, INF)), hi)
    wrap = (lo < -WRAP) | (hi >= WRAP)
    lo = torch.where(wrap, _t(-WRAP), lo)
    hi = torch.where(wrap, _t(WRAP), hi)
    return Num(lo, hi, None, None)


def _result_dtype(*args: Num) -> torch.dtype | None:
    """The evaluator's promotion: any float makes a float; the narrowest float
    dtype among the operands bounds the rounding (a conservative choice)."""
    floats = [a.dtype for a in args if a.is_float]
    if not floats:
        return None
    return max(floats, key=lambda d: torch.finfo(d).eps)


def _ulps(lo: torch.Tensor, hi: torch.Tensor, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen by ``n`` ulps: libm functions are faithfully, not correctly, rounded."""
    for _ in range(n):
        lo, hi = torch.nextafter(lo, torch.full_like(lo, -INF)), torch.nextafter(hi, torch.full_like(hi, INF))
    return lo, hi


def _corners(fn, a: Num, b: Num) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.stack(torch.broadcast_tensors(_nan0(fn(a.lo, b.lo)), _nan0(fn(a.lo, b.hi)),
                                               _nan0(fn(a.hi, b.lo)), _nan0(fn(a.hi, b.hi))))
    return vals.min(0).values, vals.max(0).values


def _has(x: Num, v: float) -> torch.Tensor:
    return (x.lo <= v) & (v <= x.hi)


def _has_inf(x: Num) -> torch.Tensor:
    return (x.lo == -INF) | (x.hi == INF)


class WindowBounds:
    """Per-axis arrays of NATTEN's window (first and last key of each query's
    window, in axis coordinates), for exact interval rules."""

    def __init__(self, L: int, size: int, dilation: int, stride: int, causal: bool):
        self.L, self.size, self.d, self.causal = L, size, dilation, causal
        first, last = window_range(torch.arange(L), L, size, dilation, stride, causal)
        self.lo_flat = first.to(F)  # first key of query i's window
        self.hi_flat = last.to(F)  # last key
        # Range minimum of lo / maximum of hi over query intervals: both are
        # non-decreasing within a dilation group, so per group the extreme is
        # at the group's first / last member inside the interval.

    def range_lo_min(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._extreme(self.lo_flat, a, b, first=True)

    def range_hi_max(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._extreme(self.hi_flat, a, b, first=False)

    def _extreme(self, arr, a, b, first: bool):
        d = self.d
        a = a.clamp(0, self.L - 1).to(torch.int64)
        b = b.clamp(0, self.L - 1).to(torch.int64)
        if d == 1:
            return arr[a] if first else arr[b]
        out = None
        for g in range(d):
            # first member >= a in group g, last member <= b in group g
            f = a + (g - a) % d
            last = b - (b - g) % d
            has = f <= last
            idx = (f if first else last).clamp(0, self.L - 1)
            val = torch.where(has, arr[idx], torch.full_like(arr[idx], INF if first else -INF))
            out = val if out is None else (torch.minimum(out, val) if first else torch.maximum(out, val))
        return out

    def classify(self, qa: Num, ka: Num) -> Bool:
        q0, q1, k0, k1 = (_t(x).to(F) for x in (qa.lo, qa.hi, ka.lo, ka.hi))
        q0, q1, k0, k1 = torch.broadcast_tensors(q0, q1, k0, k1)
        lo_min = self.range_lo_min(q0, q1)
        hi_max = self.range_hi_max(q0, q1)
        may_true = (k1 >= lo_min) & (k0 <= hi_max)
        if self.d == 1:
            lo_max = self.lo_flat[q1.clamp(0, self.L - 1).to(torch.int64)]
            hi_min = self.hi_flat[q0.clamp(0, self.L - 1).to(torch.int64)]
            all_true = (lo_max <= k0) & (k1 <= hi_min)
        else:
            # a dilated window is FULL on a box only for a single (query, key)
            qi = q0.clamp(0, self.L - 1).to(torch.int64)
            single = (q0 == q1) & (k0 == k1)
            same_group = (k0.to(torch.int64) - qi) % self.d == 0
            all_true = single & same_group & (self.lo_flat[qi] <= k0) & (k0 <= self.hi_flat[qi])
            # a single query sees only its group: no key of the group in range -> EMPTY
            q_single = q0 == q1
            g = qi % self.d
            first_in_group = k0.to(torch.int64) + (g - k0.to(torch.int64)) % self.d
            may_true = may_true & ~(q_single & (first_in_group > k1.to(torch.int64)))
        return Bool(may_true, ~all_true)


def window_envelope(qa: Num, ka: Num, size: int, dilation: int, stride: int, causal: bool) -> Bool:
    """NATTEN's window (``WindowBounds``) on an axis whose length is not one number (a paged batch's rows, each its
    own): whatever the length, a query's window lies within ``(size + stride) * dilation`` of it (its centre is the
    query's stride leader, at most ``stride`` away in its dilation group, moved inward by at most ``size`` at the
    axis's ends), and never after it where causal. Keys that near may be in it; no box is sure to be (the kernels
    evaluate the window there, at the row's length)."""
    reach = (size + stride) * dilation
    q0, q1, k0, k1 = (_t(x).to(F) for x in (qa.lo, qa.hi, ka.lo, ka.hi))
    may = (k1 >= q0 - reach) & (k0 <= q1 + (0 if causal else reach))
    return Bool(may, torch.ones_like(may))


class IntervalEvaluator:
    """Bounds of IR expressions given bounds of the symbols.

    ``env`` maps symbols to ``Num`` (or plain numbers: a Python int is an
    int64, a float a float64); ``inputs`` maps input names to tensors
    (bounded by min/max over the index box); ``windows`` caches
    ``WindowBounds`` per window node."""

    def __init__(self, env: dict, inputs: dict[str, torch.Tensor] | None = None):
        self.env = {k: (v if isinstance(v, Num) else point(v)) for k, v in env.items()}
        self.inputs = inputs or {}
        self.windows: dict = {}
        self._cache: dict = {}

    def __call__(self, e: sympy.Basic):
        if e in self._cache:
            return self._cache[e]
        out = self._eval(e)
        self._cache[e] = out
        return out

    def boolean(self, e: sympy.Basic) -> Bool:
        v = self(e)
        if not isinstance(v, Bool):
            raise SpecError("expected a bool expression", where="tile classification")
        return v

    def number(self, e: sympy.Basic) -> Num:
        v = self(e)
        if not isinstance(v, Num):
            raise SpecError("expected a number", where="tile classification")
        return v

    def _eval(self, e: sympy.Basic):
        if e is sympy.true:
            return Bool(_TRUE, _FALSE)
        if e is sympy.false:
            return Bool(_FALSE, _TRUE)
        if isinstance(e, sympy.Integer):
            return point(int(e))
        if e.is_Number or isinstance(e, sympy.NumberSymbol):
            return point(float(e.evalf(30)) if isinstance(e, sympy.NumberSymbol) else float(e))
        if isinstance(e, sympy.Symbol):
            if e not in self.env:
                raise SpecError(f"'{e}' has no value", where="tile classification")
            return self.env[e]
        if isinstance(e, sympy.Add | sympy.Mul):
            return self._add_mul(e)
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if isinstance(e, S.FloorDiv):
            return _floordiv(self.number(e.args[0]), self.number(e.args[1]))
        if isinstance(e, sympy.Mod):
            return _mod(self.number(e.args[0]), self.number(e.args[1]))
        if isinstance(e, sympy.Min | sympy.Max | sympy.Abs | sympy.floor | sympy.ceiling):
            return self._monotone(e)
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e)
        if isinstance(e, sympy.core.relational.Relational):
            return self._relational(e)
        if isinstance(e, sympy.And | sympy.Or | sympy.Not | sympy.Xor | sympy.Equivalent | sympy.ITE):
            return self._logic(e)
        if isinstance(e, sympy.exp | sympy.tanh | S.Log | S.Sqrt):
            return _transcendental(type(e), self.number(e.args[0]))
        if isinstance(e, S.IsPow2):
            return self._is_pow2(e)
        if isinstance(e, S.BitLength | S.Log2Floor):
            return self._bit_count(e)
        if isinstance(e, S.ShiftLeft | S.ShiftRight):
            return self._shift(e)
        if isinstance(e, S.BitAnd | S.BitOr | S.BitXor | S.BitNot):
            return self._bits(e)
        if isinstance(e, S.Window):
            return self._window(e)
        name = S.input_name(e.func)
        if name is not None:
            return self._input(name, e.args)
        raise SpecError(f"no interval rule for {type(e).__name__}", where="tile classification")

    def _add_mul(self, e) -> Num:
        parts = ratio_parts(e)
        if parts is not None:
            num, den = self.number(parts[0]), self.number(parts[1])
            if not num.is_float and not den.is_float:  # one division of integers, as evaluated
                return _divide(num, den)
        vals = [self.number(a) for a in e.args]
        out = vals[0]
        for v in vals[1:]:
            out = _add(out, v) if isinstance(e, sympy.Add) else _mul(out, v)
        return out

    def _monotone(self, e) -> Num:
        """``min``, ``max``, ``abs``, ``floor``, ``ceiling``: from the operands' ends."""
        if isinstance(e, sympy.Min | sympy.Max):
            vals = [self.number(a) for a in e.args]
            fn = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
            lo, hi = vals[0].lo, vals[0].hi
            for v in vals[1:]:
                lo, hi = fn(lo, v.lo), fn(hi, v.hi)
            return self._typed(lo, hi, _FALSE, vals)  # torch.minimum/maximum propagate NaN
        a = self.number(e.args[0])
        lo, hi = a.lo, a.hi
        if isinstance(e, sympy.Abs):
            return self._typed(torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, _t(0.0))),
                               torch.maximum(lo.abs(), hi.abs()), _FALSE, [a])
        fn = torch.floor if isinstance(e, sympy.floor) else torch.ceil
        return self._typed(fn(lo), fn(hi), _FALSE, [a])

    def _logic(self, e) -> Bool:
        """``and``, ``or``, ``not``, ``xor``, equivalence and ``if`` of bools: may be True, may be False."""
        if isinstance(e, sympy.Not):
            v = self.boolean(e.args[0])
            return Bool(v.f, v.t)
        if isinstance(e, sympy.ITE):
            c, a, b = (self.boolean(x) for x in e.args)
            return Bool((c.t & a.t) | (c.f & b.t), (c.t & a.f) | (c.f & b.f))
        vals = [self.boolean(a) for a in e.args]
        t, f = vals[0].t, vals[0].f
        if isinstance(e, sympy.Equivalent):
            all_t, all_f = t, f
            any_t, any_f = t, f
            for v in vals[1:]:
                all_t, all_f = all_t & v.t, all_f & v.f
                any_t, any_f = any_t | v.t, any_f | v.f
            return Bool(all_t | all_f, any_t & any_f)
        for v in vals[1:]:
            if isinstance(e, sympy.And):
                t, f = t & v.t, f | v.f
            elif isinstance(e, sympy.Or):
                t, f = t | v.t, f & v.f
            else:  # Xor
                t, f = (t & v.f) | (f & v.t), (t & v.t) | (f & v.f)
        return Bool(t, f)

    def _is_pow2(self, e) -> Bool:
        a = self.number(e.args[0])
        lo, hi = a.lo, a.hi
        top = torch.exp2(torch.floor(torch.log2(hi.clamp(min=1))))
        may_true = (hi >= 1) & (top >= lo)
        point_pow2 = (lo == hi) & (lo >= 1) & (torch.exp2(torch.floor(torch.log2(lo.clamp(min=1)))) == lo)
        all_pow2 = point_pow2 | ((lo == 1) & (hi == 2))
        return Bool(may_true, ~all_pow2)

    def _bit_count(self, e) -> Num:
        """``bit_length(x)`` and ``log2(x)`` (floored; -1 below 1)."""
        a = self.number(e.args[0])
        lo, hi = a.lo, a.hi
        if isinstance(e, S.BitLength):
            alo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, _t(0.0)))
            ahi = torch.maximum(lo.abs(), hi.abs())
            bl = lambda x: torch.where(x >= 1, torch.floor(torch.log2(x.clamp(min=1))) + 1, _t(0.0))  # noqa: E731
            return _int_num(bl(alo), bl(ahi).clamp(max=64.0))
        lf = lambda x: torch.where(x >= 1, torch.floor(torch.log2(x.clamp(min=1))), _t(-1.0))  # noqa: E731
        return _int_num(lf(lo), lf(hi))

    def _shift(self, e) -> Num:
        a, s = self.number(e.args[0]), self.number(e.args[1])
        in_range = (s.lo >= 0) & (s.hi <= 62)  # wider shifts: whatever int64 gives
        scale = Num(torch.exp2(s.lo.clamp(0, 62)), torch.exp2(s.hi.clamp(0, 62)))
        if isinstance(e, S.ShiftLeft):
            lo, hi = _corners(torch.mul, a, scale)
        else:
            lo, hi = _corners(torch.div, a, scale)
            lo, hi = torch.floor(lo), torch.floor(hi)
        return _int_num(torch.where(in_range, lo, _t(-WRAP)), torch.where(in_range, hi, _t(WRAP)))

    @staticmethod
    def _typed(lo, hi, nan, args: list[Num]) -> Num:
        """A result of the operands' promoted type, computed exactly (no rounding)."""
        dtype = _result_dtype(*args)
        if dtype is None:
            return _int_num(lo, hi)
        return _make(lo, hi, nan, dtype, *args)

    def _pow(self, e: sympy.Pow) -> Num:
        base, exp = self.number(e.base), self.number(e.exp)
        if not base.is_float and not exp.is_float and e.exp.is_nonnegative:
            # int64 power (wraps around, which _int_num covers)
            if e.exp.is_Integer:
                return _int_num(*_integral(*_even_odd_pow(base, int(e.exp))))
            positive = base.lo >= 0
            lo, hi = _integral(*_corners(torch.pow, base, exp))
            return _int_num(torch.where(positive, lo, _t(-INF)), torch.where(positive, hi, _t(INF)))
        # float64 power (torch.pow), faithfully rounded
        dtype = _result_dtype(base, exp) or F
        blo, bhi = base.lo, base.hi
        nan = _FALSE
        if e.exp.is_Integer:
            n = int(e.exp)
            if n >= 0:
                lo, hi = _even_odd_pow(base, n)
            else:
                straddle = (blo <= 0) & (bhi >= 0)  # x ** -n: 0 gives +-inf
                lo, hi = _corners(torch.pow, base, exp)
                lo, hi = torch.where(straddle, _t(-INF), lo), torch.where(straddle, _t(INF), hi)
        else:
            positive = blo >= 0
            lo, hi = _corners(torch.pow, base, exp)
            # a negative base: NaN for a non-integer exponent, anything for an integer one
            nan = ~positive
            # a zero base is -0.0 or 0.0 whatever its bounds' signs: a negative exponent gives -inf
            # (-0.0 ** -0.5 is rsqrt's, -0.0 ** -1.0 odd) or inf
            any_inf = ~positive | (_has(base, 0.0) & (exp.lo < 0))
            lo, hi = torch.where(any_inf, _t(-INF), lo), torch.where(any_inf, _t(INF), hi)
        lo, hi = _ulps(lo, hi)
        out = _make(lo, hi, nan, dtype, base, exp)
        # torch.pow(nan, 0) == torch.pow(1, nan) == 1
        one = (base.nan & _has(exp, 0.0)) | (exp.nan & _has(base, 1.0))
        return Num(torch.where(one, torch.minimum(out.lo, _t(1.0)), out.lo),
                   torch.where(one, torch.maximum(out.hi, _t(1.0)), out.hi), out.nan, out.dtype)

    def _piecewise(self, e: sympy.Piecewise) -> Num:
        reach = None  # may every earlier condition be false?
        lo = hi = None
        nan = _FALSE
        branches = []
        for value, cond in e.args:
            c = self.boolean(cond) if cond is not sympy.true else Bool(_TRUE, _FALSE)
            possible = c.t if reach is None else (reach & c.t)
            v = self(value)
            if isinstance(v, Bool):
                raise SpecError("bool-valued Piecewise", where="tile classification")
            branches.append(v)
            vlo = torch.where(possible, v.lo, _t(INF))
            vhi = torch.where(possible, v.hi, _t(-INF))
            lo = vlo if lo is None else torch.minimum(lo, vlo)
            hi = vhi if hi is None else torch.maximum(hi, vhi)
            nan = nan | (possible & v.nan)
            reach = c.f if reach is None else (reach & c.f)
        dtype = _result_dtype(*branches)
        if dtype is None:
            return _int_num(lo, hi)
        # no branch reachable with a number (all NaN) leaves lo > hi: empty, as wanted
        return _make(lo, hi, nan, dtype)

    def _relational(self, e) -> Bool:
        a, b = self(e.lhs), self(e.rhs)
        if isinstance(a, Bool) or isinstance(b, Bool):
            raise SpecError("comparison of bools", where="tile classification")
        alo, ahi, blo, bhi = a.lo, a.hi, b.lo, b.hi
        dtype = _result_dtype(a, b)
        if dtype is not None and dtype != F:
            # the evaluator compares in the narrow dtype: a constant is rounded to it too
            alo, ahi = _widen_narrow(alo, ahi, dtype)
            blo, bhi = _widen_narrow(blo, bhi, dtype)
        real = (alo <= ahi) & (blo <= bhi)  # both sides hold a number somewhere
        nan = a.nan | b.nan
        op = e.rel_op
        if op == "<":
            t, f = alo < bhi, ahi >= blo
        elif op == "<=":
            t, f = alo <= bhi, ahi > blo
        elif op == ">":
            t, f = ahi > blo, alo <= bhi
        elif op == ">=":
            t, f = ahi >= blo, alo < bhi
        else:
            overlap = (alo <= bhi) & (blo <= ahi)
            same_point = (alo == ahi) & (blo == bhi) & (alo == blo)
            t, f = (overlap, ~same_point) if op == "==" else (~same_point, overlap)
            if op == "!=":  # NaN != x is true
                return Bool(t | nan | ~real, f & real)
        return Bool(t & real, f | nan | ~real)

    def _bits(self, e) -> Num:
        vals = [self.number(a) for a in e.args]
        if isinstance(e, S.BitNot):
            a = vals[0]
            return _int_num(-a.hi - 1, -a.lo - 1)
        a, b = vals
        alo, ahi, blo, bhi = a.lo, a.hi, b.lo, b.hi
        nonneg = (alo >= 0) & (blo >= 0)
        top = torch.exp2(torch.ceil(torch.log2(torch.maximum(ahi, bhi).clamp(min=0) + 1))) - 1
        if isinstance(e, S.BitAnd):
            lo, hi = _t(0.0), torch.minimum(ahi, bhi)
        elif isinstance(e, S.BitOr):
            lo, hi = torch.maximum(alo, blo), top
        else:
            lo, hi = _t(0.0), top
        return _int_num(torch.where(nonneg, lo, _t(-WRAP)), torch.where(nonneg, hi, _t(WRAP)))

    def _window(self, e) -> Bool:
        qa, ka, L, size, dil, stride, causal = e.args
        if not isinstance(L, sympy.Integer):  # a length read at run time (a paged row's)
            return window_envelope(self.number(qa), self.number(ka), int(size), int(dil), int(stride), bool(causal))
        key = (int(L), int(size), int(dil), int(stride), bool(causal))
        if key not in self.windows:
            self.windows[key] = WindowBounds(*key)
        return self.windows[key].classify(self.number(qa), self.number(ka))

    def _input(self, name: str, args) -> Num:
        raw = self.inputs[name]
        t = raw.to(F)
        idx = [self.number(a) for a in args]
        lows = [i.lo for i in idx]
        highs = [i.hi for i in idx]
        shape = torch.broadcast_shapes(*(x.shape for x in lows + highs))
        varying = [d for d in range(len(idx)) if not bool(torch.equal(*torch.broadcast_tensors(lows[d], highs[d])))]
        if len(varying) == 0:
            ix = tuple(lows[d].expand(shape).to(torch.int64).clamp(0, t.shape[d] - 1) for d in range(len(idx)))
            v = t[ix]
            isnan = torch.isnan(v)
            lo, hi = torch.where(isnan, _t(INF), v), torch.where(isnan, _t(-INF), v)
        elif len(varying) == 1:
            d = varying[0]
            table = self._range_table(name, t, d)
            ix = [lows[j].expand(shape).to(torch.int64).clamp(0, t.shape[j] - 1) for j in range(len(idx))]
            a = lows[d].expand(shape).clamp(0, t.shape[d] - 1).to(torch.int64)
            b = highs[d].expand(shape).clamp(0, t.shape[d] - 1).to(torch.int64)
            lo, hi, isnan = table.query(ix, d, a, b)
        else:
            isnan_all = torch.isnan(t)
            lo = torch.where(isnan_all, _t(INF), t).min().expand(shape)
            hi = torch.where(isnan_all, _t(-INF), t).max().expand(shape)
            isnan = isnan_all.any().expand(shape)
        if not raw.dtype.is_floating_point:
            return _int_num(lo, hi)
        return Num(lo, hi, isnan, raw.dtype)

    def _range_table(self, name, t, dim):
        key = (name, dim)
        if key not in self.windows:
            self.windows[key] = _RangeTable(t, dim)
        return self.windows[key]


# ----------------------------------------------------------------- arithmetic rules
def _add(a: Num, b: Num) -> Num:
    dtype = _result_dtype(a, b)
    if dtype is None:
        return _int_num(a.lo + b.lo, a.hi + b.hi)
    # inf + -inf is NaN
    nan = ((a.hi == INF) & (b.lo == -INF)) | ((a.lo == -INF) & (b.hi == INF))
    return _make(a.lo + b.lo, a.hi + b.hi, nan, dtype, a, b)


def _mul(a: Num, b: Num) -> Num:
    dtype = _result_dtype(a, b)
    lo, hi = _corners(torch.mul, a, b)
    if dtype is None:
        return _int_num(lo, hi)
    nan = (_has(a, 0.0) & _has_inf(b)) | (_has_inf(a) & _has(b, 0.0))  # 0 * inf is NaN
    return _make(lo, hi, nan, dtype, a, b)


def _divide(a: Num, b: Num) -> Num:
    """float64 a / b of two ints (the evaluator's exact ratio): x / 0 is +-inf, 0 / 0 NaN."""
    nonzero = (b.lo > 0) | (b.hi < 0)
    lo, hi = _corners(torch.div, a, b)
    lo, hi = torch.where(nonzero, lo, _t(-INF)), torch.where(nonzero, hi, _t(INF))
    return _make(lo, hi, ~nonzero & _has(a, 0.0), F, a, b)


def _floordiv(a: Num, b: Num) -> Num:
    dtype = _result_dtype(a, b)
    nonzero = (b.lo > 0) | (b.hi < 0)
    if dtype is None:
        finite = torch.isfinite(a.lo) & torch.isfinite(a.hi) & torch.isfinite(b.lo) & torch.isfinite(b.hi)
        small = finite & (torch.maximum(a.lo.abs(), a.hi.abs()) < 2.0**62) & (torch.maximum(b.lo.abs(), b.hi.abs()) < 2.0**62)
        # exact int64 floor division at the corners (monotone on a divisor of one sign)
        safe = lambda x: torch.where(small, x, _t(1.0)).to(torch.int64)  # noqa: E731
        sb = lambda x: torch.where(x == 0, torch.ones_like(x), x)  # noqa: E731
        corners = [torch.div(safe(x), sb(safe(y)), rounding_mode="floor") for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        c = torch.stack(torch.broadcast_tensors(*corners)).to(F)
        qlo, qhi = _corners(torch.div, a, b)
        lo = torch.where(small, c.min(0).values, torch.floor(qlo) - 1)
        hi = torch.where(small, c.max(0).values, torch.floor(qhi) + 1)
        # x // 0 is 0: a divisor interval holding 0 is unbounded (0 included)
        return _int_num(torch.where(nonzero, lo, _t(-INF)), torch.where(nonzero, hi, _t(INF)))
    # floats (torch.div(..., rounding_mode="floor")): 0 // 0 and inf // y are NaN, x // 0 is +-inf
    qlo, qhi = _corners(torch.div, a, b)
    lo = torch.where(nonzero, torch.floor(qlo) - 1, _t(-INF))
    hi = torch.where(nonzero, torch.floor(qhi) + 1, _t(INF))
    nan = (_has(a, 0.0) & _has(b, 0.0)) | _has_inf(a)
    return _make(lo, hi, nan, dtype, a, b)


def _mod(a: Num, b: Num) -> Num:
    dtype = _result_dtype(a, b)
    alo, ahi, blo, bhi = a.lo, a.hi, b.lo, b.hi
    integer = dtype is None
    unit = 1.0 if integer else 0.0  # a float remainder may round up to the divisor itself
    general_lo = torch.where(blo > 0, _t(0.0), torch.where(bhi < 0, blo + unit, -torch.maximum(blo.abs(), bhi.abs())))
    general_hi = torch.where(blo > 0, bhi - unit, torch.where(bhi < 0, _t(0.0), torch.maximum(blo.abs(), bhi.abs())))
    zero_in = (blo <= 0) & (bhi >= 0)
    if integer:
        # x % 0 == x for ints: a divisor interval holding 0 also admits a itself
        general_lo = torch.where(zero_in, torch.minimum(general_lo, alo), general_lo)
        general_hi = torch.where(zero_in, torch.maximum(general_hi, ahi), general_hi)
        # a point divisor and a within one period: the remainder is a - c * period, exactly
        point_b = (blo == bhi) & (blo != 0)
        safe_c = torch.where(point_b, blo, _t(1.0))
        small = (torch.maximum(alo.abs(), ahi.abs()) < 2.0**52) & (safe_c.abs() < 2.0**52)
        same_period = point_b & small & (torch.floor(alo / safe_c) == torch.floor(ahi / safe_c))
        r_lo = alo - torch.floor(alo / safe_c) * safe_c
        r_hi = ahi - torch.floor(ahi / safe_c) * safe_c
        return _int_num(torch.where(same_period, r_lo, general_lo), torch.where(same_period, r_hi, general_hi))
    # floats (torch.remainder): x % 0.0 and inf % y are NaN; x % +-inf may be +-inf
    both_points = (alo == ahi) & (blo == bhi)
    exact = S.float_remainder(alo, blo)
    lo = torch.where(both_points, exact, general_lo)
    hi = torch.where(both_points, exact, general_hi)
    nan = zero_in | _has_inf(a) | (both_points & torch.isnan(exact))
    # a point divisor 0.0, or a = +-inf only: no number at all
    none = ((blo == 0) & (bhi == 0)) | ((alo == ahi) & torch.isinf(alo)) | (both_points & torch.isnan(exact))
    lo, hi = torch.where(none, _t(INF), lo), torch.where(none, _t(-INF), hi)
    return _make(lo, hi, nan, dtype, a, b)


def _even_odd_pow(base: Num, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of x ** n for a non-negative integer n."""
    blo, bhi = base.lo, base.hi
    lo_p, hi_p = _nan0(blo**n), _nan0(bhi**n)
    if n % 2 == 1:
        return lo_p, hi_p
    straddle = (blo < 0) & (bhi > 0)
    return torch.where(straddle, _t(0.0), torch.minimum(lo_p, hi_p)), torch.maximum(lo_p, hi_p)


def _integral(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of an int64 power from float64 ``pow`` at the corners, which is faithfully rounded:
    the integer it approximates where an ulp is small, two ulps wider above."""
    wlo, whi = _ulps(lo, hi)
    small = 2.0**48
    return torch.where(lo.abs() < small, torch.round(lo), wlo), torch.where(hi.abs() < small, torch.round(hi), whi)


def _transcendental(fn_type, a: Num) -> Num:
    """exp, tanh (monotone, total), log (NaN below 0, -inf at 0) and sqrt (NaN below 0), in float64."""
    fn = {sympy.exp: torch.exp, sympy.tanh: torch.tanh, S.Log: torch.log, S.Sqrt: torch.sqrt}[fn_type]
    dtype = F if a.dtype is None else _result_dtype(a)
    lo, hi = a.lo, a.hi
    nan = _FALSE
    if fn_type in (S.Log, S.Sqrt):
        nan = lo < 0
        none = hi < 0  # every value negative: NaN everywhere
        lo = lo.clamp(min=0.0)
        olo, ohi = _ulps(fn(lo), fn(hi))
        olo, ohi = torch.where(none, _t(INF), olo), torch.where(none, _t(-INF), ohi)
    else:
        olo, ohi = _ulps(fn(lo), fn(hi))
    if fn_type is sympy.tanh:
        olo, ohi = olo.clamp(min=-1.0), ohi.clamp(max=1.0)
    return _make(olo, ohi, nan, dtype, a)


class _RangeTable:
    """Min/max (over numbers) and whether any NaN, of a tensor over index ranges
    along one dimension (sparse tables)."""

    def __init__(self, t: torch.Tensor, dim: int):
        x = t.movedim(dim, -1)
        isnan = torch.isnan(x)
        lo = torch.where(isnan, _t(INF), x)
        hi = torch.where(isnan, _t(-INF), x)
        self.mins, self.maxs, self.nans = [lo], [hi], [isnan]
        step = 1
        while 2 * step <= x.shape[-1]:
            a, b, c = self.mins[-1], self.maxs[-1], self.nans[-1]
            self.mins.append(torch.minimum(a[..., :-step], a[..., step:]))
            self.maxs.append(torch.maximum(b[..., :-step], b[..., step:]))
            self.nans.append(c[..., :-step] | c[..., step:])
            step *= 2
        self.dim = dim

    def query(self, ix: list[torch.Tensor], d: int, a: torch.Tensor, b: torch.Tensor):
        """(min, max, any NaN) over [a, b] along dimension d, the others at ``ix``."""
        length = (b - a + 1).clamp(min=1)
        level = torch.floor(torch.log2(length.to(F))).to(torch.int64)
        lo = torch.full(a.shape, INF, dtype=F)
        hi = torch.full(a.shape, -INF, dtype=F)
        nan = torch.zeros(a.shape, dtype=torch.bool)
        others = [ix[j] for j in range(len(ix)) if j != d]
        for k in torch.unique(level).tolist():
            sel = level == k
            aa, bb = a[sel], b[sel] - (1 << k) + 1
            o = [x[sel] for x in others]
            lo[sel] = torch.minimum(self.mins[k][(*o, aa)], self.mins[k][(*o, bb)])
            hi[sel] = torch.maximum(self.maxs[k][(*o, aa)], self.maxs[k][(*o, bb)])
            nan[sel] = self.nans[k][(*o, aa)] | self.nans[k][(*o, bb)]
        return lo, hi, nan
