"""Sound interval evaluation of IR expressions over boxes of (query, key) positions, vectorised over many boxes at
once (the seam: the walk over an expression; the bounds and each operation's rule are ``interval_numbers``', NATTEN's
window rule ``window_intervals``').

Affine terms, comparisons and NATTEN windows are exact on boxes, which is what makes tile classification of bands
and neighborhoods exact.
"""

from __future__ import annotations

import sympy
import torch

from ...core import symbols as S
from ...core.errors import SpecError
from . import interval_numbers as I
from .evaluate import ratio_parts
from .interval_numbers import INF, WRAP, Bool, F, Num, point
from .window_intervals import WindowBounds, window_envelope


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
            return Bool(I.TRUE, I.FALSE)
        if e is sympy.false:
            return Bool(I.FALSE, I.TRUE)
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
            return I.floordiv(self.number(e.args[0]), self.number(e.args[1]))
        if isinstance(e, sympy.Mod):
            return I.mod(self.number(e.args[0]), self.number(e.args[1]))
        if isinstance(e, sympy.Min | sympy.Max | sympy.Abs | sympy.floor | sympy.ceiling):
            return self._monotone(e)
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e)
        if isinstance(e, sympy.core.relational.Relational):
            return self._relational(e)
        if isinstance(e, sympy.And | sympy.Or | sympy.Not | sympy.Xor | sympy.Equivalent | sympy.ITE):
            return self._logic(e)
        if isinstance(e, sympy.exp | sympy.tanh | S.Log | S.Sqrt):
            return I.transcendental(type(e), self.number(e.args[0]))
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
                return I.divide(num, den)
        terms = S.float_factored(e.args) if isinstance(e, sympy.Add) else e.args  # as the evaluator folds them
        vals = [self.number(a) for a in terms]
        out = vals[0]
        for v in vals[1:]:
            out = I.add(out, v) if isinstance(e, sympy.Add) else I.mul(out, v)
        return out

    def _monotone(self, e) -> Num:
        """``min``, ``max``, ``abs``, ``floor``, ``ceiling``: from the operands' ends."""
        if isinstance(e, sympy.Min | sympy.Max):
            vals = [self.number(a) for a in e.args]
            fn = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
            lo, hi = vals[0].lo, vals[0].hi
            for v in vals[1:]:
                lo, hi = fn(lo, v.lo), fn(hi, v.hi)
            return self._typed(lo, hi, I.FALSE, vals)  # torch.minimum/maximum propagate NaN
        a = self.number(e.args[0])
        lo, hi = a.lo, a.hi
        if isinstance(e, sympy.Abs):
            return self._typed(torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, I.as_t(0.0))),
                               torch.maximum(lo.abs(), hi.abs()), I.FALSE, [a])
        fn = torch.floor if isinstance(e, sympy.floor) else torch.ceil
        return self._typed(fn(lo), fn(hi), I.FALSE, [a])

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
            alo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, I.as_t(0.0)))
            ahi = torch.maximum(lo.abs(), hi.abs())
            bl = lambda x: torch.where(x >= 1, torch.floor(torch.log2(x.clamp(min=1))) + 1, I.as_t(0.0))  # noqa: E731
            return I.int_num(bl(alo), bl(ahi).clamp(max=64.0))
        lf = lambda x: torch.where(x >= 1, torch.floor(torch.log2(x.clamp(min=1))), I.as_t(-1.0))  # noqa: E731
        return I.int_num(lf(lo), lf(hi))

    def _shift(self, e) -> Num:
        a, s = self.number(e.args[0]), self.number(e.args[1])
        in_range = (s.lo >= 0) & (s.hi <= 62)  # wider shifts: whatever int64 gives
        scale = Num(torch.exp2(s.lo.clamp(0, 62)), torch.exp2(s.hi.clamp(0, 62)))
        if isinstance(e, S.ShiftLeft):
            lo, hi = I.corners(torch.mul, a, scale)
        else:
            lo, hi = I.corners(torch.div, a, scale)
            lo, hi = torch.floor(lo), torch.floor(hi)
        return I.int_num(torch.where(in_range, lo, I.as_t(-WRAP)), torch.where(in_range, hi, I.as_t(WRAP)))

    @staticmethod
    def _typed(lo, hi, nan, args: list[Num]) -> Num:
        """A result of the operands' promoted type, computed exactly (no rounding)."""
        dtype = I.result_dtype(*args)
        if dtype is None:
            return I.int_num(lo, hi)
        return I.make(lo, hi, nan, dtype, *args)

    def _pow(self, e: sympy.Pow) -> Num:
        base, exp = self.number(e.base), self.number(e.exp)
        if not base.is_float and not exp.is_float and e.exp.is_nonnegative:
            # int64 power (wraps around, which I.int_num covers)
            if e.exp.is_Integer:
                return I.int_num(*I.integral(*I.even_odd_pow(base, int(e.exp))))
            positive = base.lo >= 0
            lo, hi = I.integral(*I.corners(torch.pow, base, exp))
            return I.int_num(torch.where(positive, lo, I.as_t(-INF)), torch.where(positive, hi, I.as_t(INF)))
        # float64 power (torch.pow), faithfully rounded
        dtype = I.result_dtype(base, exp) or F
        blo, bhi = base.lo, base.hi
        nan = I.FALSE
        if e.exp.is_Integer:
            n = int(e.exp)
            if n >= 0:
                lo, hi = I.even_odd_pow(base, n)
            else:
                straddle = (blo <= 0) & (bhi >= 0)  # x ** -n: 0 gives +-inf
                lo, hi = I.corners(torch.pow, base, exp)
                lo, hi = torch.where(straddle, I.as_t(-INF), lo), torch.where(straddle, I.as_t(INF), hi)
        else:
            positive = blo >= 0
            lo, hi = I.corners(torch.pow, base, exp)
            # a negative base: NaN for a non-integer exponent, anything for an integer one
            nan = ~positive
            # a zero base is -0.0 or 0.0 whatever its bounds' signs: a negative exponent gives -inf
            # (-0.0 ** -0.5 is rsqrt's, -0.0 ** -1.0 odd) or inf
            any_inf = ~positive | (I.has(base, 0.0) & (exp.lo < 0))
            lo, hi = torch.where(any_inf, I.as_t(-INF), lo), torch.where(any_inf, I.as_t(INF), hi)
        lo, hi = I.ulps(lo, hi)
        out = I.make(lo, hi, nan, dtype, base, exp)
        # torch.pow(nan, 0) == torch.pow(1, nan) == 1
        one = (base.nan & I.has(exp, 0.0)) | (exp.nan & I.has(base, 1.0))
        return Num(torch.where(one, torch.minimum(out.lo, I.as_t(1.0)), out.lo),
                   torch.where(one, torch.maximum(out.hi, I.as_t(1.0)), out.hi), out.nan, out.dtype)

    def _piecewise(self, e: sympy.Piecewise) -> Num:
        reach = None  # may every earlier condition be false?
        lo = hi = None
        nan = I.FALSE
        branches = []
        for value, cond in e.args:
            c = self.boolean(cond) if cond is not sympy.true else Bool(I.TRUE, I.FALSE)
            possible = c.t if reach is None else (reach & c.t)
            v = self(value)
            if isinstance(v, Bool):
                raise SpecError("bool-valued Piecewise", where="tile classification")
            branches.append(v)
            vlo = torch.where(possible, v.lo, I.as_t(INF))
            vhi = torch.where(possible, v.hi, I.as_t(-INF))
            lo = vlo if lo is None else torch.minimum(lo, vlo)
            hi = vhi if hi is None else torch.maximum(hi, vhi)
            nan = nan | (possible & v.nan)
            reach = c.f if reach is None else (reach & c.f)
        dtype = I.result_dtype(*branches)
        if dtype is None:
            return I.int_num(lo, hi)
        # no branch reachable with a number (all NaN) leaves lo > hi: empty, as wanted
        return I.make(lo, hi, nan, dtype)

    def _relational(self, e) -> Bool:
        a, b = self(e.lhs), self(e.rhs)
        if isinstance(a, Bool) or isinstance(b, Bool):
            raise SpecError("comparison of bools", where="tile classification")
        alo, ahi, blo, bhi = a.lo, a.hi, b.lo, b.hi
        dtype = I.result_dtype(a, b)
        if dtype is not None and dtype != F:
            # the evaluator compares in the narrow dtype: a constant is rounded to it too
            alo, ahi = I.widen_narrow(alo, ahi, dtype)
            blo, bhi = I.widen_narrow(blo, bhi, dtype)
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
            return I.int_num(-a.hi - 1, -a.lo - 1)
        a, b = vals
        alo, ahi, blo, bhi = a.lo, a.hi, b.lo, b.hi
        nonneg = (alo >= 0) & (blo >= 0)
        top = torch.exp2(torch.ceil(torch.log2(torch.maximum(ahi, bhi).clamp(min=0) + 1))) - 1
        if isinstance(e, S.BitAnd):
            lo, hi = I.as_t(0.0), torch.minimum(ahi, bhi)
        elif isinstance(e, S.BitOr):
            lo, hi = torch.maximum(alo, blo), top
        else:
            lo, hi = I.as_t(0.0), top
        return I.int_num(torch.where(nonneg, lo, I.as_t(-WRAP)), torch.where(nonneg, hi, I.as_t(WRAP)))

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
            lo, hi = torch.where(isnan, I.as_t(INF), v), torch.where(isnan, I.as_t(-INF), v)
        elif len(varying) == 1:
            d = varying[0]
            table = self._range_table(name, t, d)
            ix = [lows[j].expand(shape).to(torch.int64).clamp(0, t.shape[j] - 1) for j in range(len(idx))]
            a = lows[d].expand(shape).clamp(0, t.shape[d] - 1).to(torch.int64)
            b = highs[d].expand(shape).clamp(0, t.shape[d] - 1).to(torch.int64)
            lo, hi, isnan = table.query(ix, d, a, b)
        else:
            isnan_all = torch.isnan(t)
            lo = torch.where(isnan_all, I.as_t(INF), t).min().expand(shape)
            hi = torch.where(isnan_all, I.as_t(-INF), t).max().expand(shape)
            isnan = isnan_all.any().expand(shape)
        if not raw.dtype.is_floating_point:
            return I.int_num(lo, hi)
        return Num(lo, hi, isnan, raw.dtype)

    def _range_table(self, name, t, dim):
        key = (name, dim)
        if key not in self.windows:
            self.windows[key] = _RangeTable(t, dim)
        return self.windows[key]



class _RangeTable:
    """Min/max (over numbers) and whether any NaN, of a tensor over index ranges
    along one dimension (sparse tables)."""

    def __init__(self, t: torch.Tensor, dim: int):
        x = t.movedim(dim, -1)
        isnan = torch.isnan(x)
        lo = torch.where(isnan, I.as_t(INF), x)
        hi = torch.where(isnan, I.as_t(-INF), x)
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
