"""Sound interval evaluation of IR expressions over boxes of (query, key)
positions, vectorised over many boxes at once.

A number is bounded by ``(lo, hi)`` float64 tensors (exact for integers
below 2**53; infinities for unknown bounds); a bool by ``(may_true,
may_false)`` bool tensors. Every rule over-approximates: if some point of
the box gives a value, the bounds contain it. Affine terms, comparisons and
NATTEN windows are exact on boxes, which is what makes tile classification
of bands and neighborhoods exact.
"""

from __future__ import annotations

import math

import sympy
import torch

from ..spec.errors import SpecError
from . import symbols as S
from .evaluate import window_range

F = torch.float64
INF = math.inf


class Num:
    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi


class Bool:
    __slots__ = ("t", "f")

    def __init__(self, may_true, may_false):
        self.t, self.f = may_true, may_false


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=F if not isinstance(x, bool) else torch.bool)


def point(x) -> Num:
    v = _t(float(x)) if not isinstance(x, torch.Tensor) else x.to(F)
    return Num(v, v)


def _nan0(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=INF, neginf=-INF)


def _corners(fn, a: Num, b: Num) -> Num:
    vals = torch.stack(torch.broadcast_tensors(_nan0(fn(_t(a.lo), _t(b.lo))), _nan0(fn(_t(a.lo), _t(b.hi))),
                                               _nan0(fn(_t(a.hi), _t(b.lo))), _nan0(fn(_t(a.hi), _t(b.hi)))))
    return Num(vals.min(0).values, vals.max(0).values)


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


class IntervalEvaluator:
    """Bounds of IR expressions given bounds of the symbols.

    ``env`` maps symbols to ``Num`` (or plain numbers); ``inputs`` maps input
    names to tensors (bounded by min/max over the index box); ``windows``
    caches ``WindowBounds`` per window node."""

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

    def _eval(self, e: sympy.Basic):
        if e is sympy.true:
            return Bool(_t(True), _t(False))
        if e is sympy.false:
            return Bool(_t(False), _t(True))
        if e.is_Number or isinstance(e, sympy.NumberSymbol):
            return point(float(e))
        if isinstance(e, sympy.Symbol):
            if e not in self.env:
                raise SpecError(f"'{e}' has no value", where="tile classification")
            return self.env[e]
        if isinstance(e, sympy.Add):
            vals = [self(a) for a in e.args]
            return Num(sum(_t(v.lo) for v in vals), sum(_t(v.hi) for v in vals))
        if isinstance(e, sympy.Mul):
            out = self(e.args[0])
            for a in e.args[1:]:
                out = _corners(torch.mul, out, self(a))
            return out
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if isinstance(e, S.FloorDiv):
            a, b = self(e.args[0]), self(e.args[1])
            nonzero = (_t(b.lo) > 0) | (_t(b.hi) < 0)  # a divisor interval holding 0: unbounded
            q = _corners(torch.div, a, b)
            return Num(torch.where(nonzero, torch.floor(q.lo), _t(-INF)), torch.where(nonzero, torch.floor(q.hi), _t(INF)))
        if isinstance(e, sympy.Mod):
            return self._mod(e)
        if isinstance(e, sympy.Min | sympy.Max):
            vals = [self(a) for a in e.args]
            fn = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
            lo, hi = _t(vals[0].lo), _t(vals[0].hi)
            for v in vals[1:]:
                lo, hi = fn(lo, _t(v.lo)), fn(hi, _t(v.hi))
            return Num(lo, hi)
        if isinstance(e, sympy.Abs):
            a = self(e.args[0])
            lo, hi = _t(a.lo), _t(a.hi)
            return Num(torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, _t(0.0))), torch.maximum(lo.abs(), hi.abs()))
        if isinstance(e, sympy.floor | sympy.ceiling):
            a = self(e.args[0])
            fn = torch.floor if isinstance(e, sympy.floor) else torch.ceil
            return Num(fn(_t(a.lo)), fn(_t(a.hi)))
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e)
        if isinstance(e, sympy.core.relational.Relational):
            return self._relational(e)
        if isinstance(e, sympy.And | sympy.Or):
            vals = [self.boolean(a) for a in e.args]
            t, f = vals[0].t, vals[0].f
            for v in vals[1:]:
                if isinstance(e, sympy.And):
                    t, f = t & v.t, f | v.f
                else:
                    t, f = t | v.t, f & v.f
            return Bool(t, f)
        if isinstance(e, sympy.Not):
            v = self.boolean(e.args[0])
            return Bool(v.f, v.t)
        if isinstance(e, sympy.Xor):
            vals = [self.boolean(a) for a in e.args]
            t, f = vals[0].t, vals[0].f
            for v in vals[1:]:
                t, f = (t & v.f) | (f & v.t), (t & v.t) | (f & v.f)
            return Bool(t, f)
        if isinstance(e, sympy.Equivalent):
            vals = [self.boolean(a) for a in e.args]
            all_t = vals[0].t
            all_f = vals[0].f
            any_t, any_f = vals[0].t, vals[0].f
            for v in vals[1:]:
                all_t, all_f = all_t & v.t, all_f & v.f
                any_t, any_f = any_t | v.t, any_f | v.f
            return Bool(all_t | all_f, any_t & any_f)
        if isinstance(e, sympy.ITE):
            c, a, b = (self.boolean(x) for x in e.args)
            return Bool((c.t & a.t) | (c.f & b.t), (c.t & a.f) | (c.f & b.f))
        if isinstance(e, sympy.exp | sympy.tanh | sympy.log):
            a = self(e.args[0])
            fn = {sympy.exp: torch.exp, sympy.tanh: torch.tanh, sympy.log: torch.log}[type(e)]
            lo, hi = fn(_t(a.lo)), fn(_t(a.hi))
            return Num(torch.nan_to_num(lo, nan=-INF), torch.nan_to_num(hi, nan=-INF))
        if isinstance(e, S.IsPow2):
            a = self(e.args[0])
            lo, hi = _t(a.lo), _t(a.hi)
            top = torch.exp2(torch.floor(torch.log2(hi.clamp(min=1))))
            may_true = (hi >= 1) & (top >= lo)
            point_pow2 = (lo == hi) & (lo >= 1) & (torch.exp2(torch.floor(torch.log2(lo.clamp(min=1)))) == lo)
            all_pow2 = point_pow2 | ((lo == 1) & (hi == 2))
            return Bool(may_true, ~all_pow2)
        if isinstance(e, S.BitLength | S.Log2Floor):
            a = self(e.args[0])
            lo, hi = _t(a.lo), _t(a.hi)
            if isinstance(e, S.BitLength):
                alo = torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, _t(0.0)))
                ahi = torch.maximum(lo.abs(), hi.abs())
                bl = lambda x: torch.where(x >= 1, torch.floor(torch.log2(x.clamp(min=1))) + 1, _t(0.0))  # noqa: E731
                return Num(bl(alo), bl(ahi))
            lf = lambda x: torch.where(x >= 1, torch.floor(torch.log2(x.clamp(min=1))), _t(-1.0))  # noqa: E731
            return Num(lf(lo), lf(hi))
        if isinstance(e, S.ShiftLeft | S.ShiftRight):
            a, s = self(e.args[0]), self(e.args[1])
            scale = Num(torch.exp2(_t(s.lo)), torch.exp2(_t(s.hi)))
            if isinstance(e, S.ShiftLeft):
                return _corners(torch.mul, a, scale)
            q = _corners(torch.div, a, scale)
            return Num(torch.floor(q.lo), torch.floor(q.hi))
        if isinstance(e, S.BitAnd | S.BitOr | S.BitXor | S.BitNot):
            return self._bits(e)
        if isinstance(e, S.Window):
            return self._window(e)
        name = S.input_name(e.func)
        if name is not None:
            return self._input(name, e.args)
        raise SpecError(f"no interval rule for {type(e).__name__}", where="tile classification")

    def _pow(self, e: sympy.Pow) -> Num:
        base, exp = self(e.base), self(e.exp)
        blo, bhi = _t(base.lo), _t(base.hi)
        if e.exp.is_Integer:
            n = int(e.exp)
            if n >= 0:
                lo_p, hi_p = blo**n, bhi**n
                if n % 2 == 1:
                    return Num(lo_p, hi_p)
                straddle = (blo < 0) & (bhi > 0)
                return Num(torch.where(straddle, _t(0.0), torch.minimum(lo_p, hi_p)), torch.maximum(lo_p, hi_p))
            straddle = (blo <= 0) & (bhi >= 0)
            c = _corners(torch.pow, base, exp)
            return Num(torch.where(straddle, _t(-INF), c.lo), torch.where(straddle, _t(INF), c.hi))
        positive = blo > 0
        c = _corners(torch.pow, base, exp)
        return Num(torch.where(positive, c.lo, _t(-INF)), torch.where(positive, c.hi, _t(INF)))

    def _mod(self, e) -> Num:
        a, b = self(e.args[0]), self(e.args[1])
        alo, ahi, blo, bhi = _t(a.lo), _t(a.hi), _t(b.lo), _t(b.hi)
        integer = bool(e.is_integer)
        unit = 1.0 if integer else 0.0
        c = blo
        point_b = (blo == bhi) & (blo != 0)
        safe_c = torch.where(point_b, c, _t(1.0))
        same_period = point_b & (torch.floor(alo / safe_c) == torch.floor(ahi / safe_c)) & torch.isfinite(alo) & torch.isfinite(ahi)
        r_lo = alo - torch.floor(alo / safe_c) * safe_c
        r_hi = ahi - torch.floor(ahi / safe_c) * safe_c
        general_lo = torch.where(blo > 0, _t(0.0), torch.where(bhi < 0, blo + unit, -torch.maximum(blo.abs(), bhi.abs())))
        general_hi = torch.where(blo > 0, bhi - unit, torch.where(bhi < 0, _t(0.0), torch.maximum(blo.abs(), bhi.abs())))
        # x % 0 == x: a divisor interval holding 0 also admits a itself
        zero_in = (blo <= 0) & (bhi >= 0)
        general_lo = torch.where(zero_in, torch.minimum(general_lo, alo), general_lo)
        general_hi = torch.where(zero_in, torch.maximum(general_hi, ahi), general_hi)
        lo = torch.where(same_period, r_lo, general_lo)
        hi = torch.where(same_period, r_hi, general_hi)
        return Num(lo, hi)

    def _piecewise(self, e: sympy.Piecewise) -> Num | Bool:
        reach = None  # may every earlier condition be false?
        lo = hi = None
        for value, cond in e.args:
            c = self.boolean(cond) if cond is not sympy.true else Bool(_t(True), _t(False))
            possible = c.t if reach is None else (reach & c.t)
            v = self(value)
            if isinstance(v, Bool):
                raise SpecError("bool-valued Piecewise", where="tile classification")
            vlo = torch.where(possible, _t(v.lo), _t(INF))
            vhi = torch.where(possible, _t(v.hi), _t(-INF))
            lo = vlo if lo is None else torch.minimum(lo, vlo)
            hi = vhi if hi is None else torch.maximum(hi, vhi)
            reach = c.f if reach is None else (reach & c.f)
        return Num(lo, hi)

    def _relational(self, e) -> Bool:
        a, b = self(e.lhs), self(e.rhs)
        if isinstance(a, Bool) or isinstance(b, Bool):
            raise SpecError("comparison of bools", where="tile classification")
        alo, ahi, blo, bhi = _t(a.lo), _t(a.hi), _t(b.lo), _t(b.hi)
        op = e.rel_op
        if op == "<":
            return Bool(alo < bhi, ahi >= blo)
        if op == "<=":
            return Bool(alo <= bhi, ahi > blo)
        if op == ">":
            return Bool(ahi > blo, alo <= bhi)
        if op == ">=":
            return Bool(ahi >= blo, alo < bhi)
        overlap = (alo <= bhi) & (blo <= ahi)
        same_point = (alo == ahi) & (blo == bhi) & (alo == blo)
        if op == "==":
            return Bool(overlap, ~same_point)
        return Bool(~same_point, overlap)

    def _bits(self, e) -> Num:
        vals = [self(a) for a in e.args]
        if isinstance(e, S.BitNot):
            a = vals[0]
            return Num(-_t(a.hi) - 1, -_t(a.lo) - 1)
        a, b = vals
        alo, ahi, blo, bhi = _t(a.lo), _t(a.hi), _t(b.lo), _t(b.hi)
        nonneg = (alo >= 0) & (blo >= 0)
        top = torch.exp2(torch.ceil(torch.log2(torch.maximum(ahi, bhi).clamp(min=0) + 1))) - 1
        if isinstance(e, S.BitAnd):
            lo, hi = _t(0.0), torch.minimum(ahi, bhi)
        elif isinstance(e, S.BitOr):
            lo, hi = torch.maximum(alo, blo), top
        else:
            lo, hi = _t(0.0), top
        return Num(torch.where(nonneg, lo, _t(-INF)), torch.where(nonneg, hi, _t(INF)))

    def _window(self, e) -> Bool:
        qa, ka, L, size, dil, stride, causal = e.args
        key = (int(L), int(size), int(dil), int(stride), bool(causal))
        if key not in self.windows:
            self.windows[key] = WindowBounds(*key)
        return self.windows[key].classify(self(qa), self(ka))

    def _input(self, name: str, args) -> Num:
        t = self.inputs[name].to(F)
        idx = [self(a) for a in args]
        lows = [_t(i.lo) for i in idx]
        highs = [_t(i.hi) for i in idx]
        shape = torch.broadcast_shapes(*(x.shape for x in lows + highs))
        varying = [d for d in range(len(idx)) if not bool(torch.equal(*torch.broadcast_tensors(lows[d], highs[d])))]
        if len(varying) == 0:
            ix = tuple(lows[d].expand(shape).to(torch.int64).clamp(0, t.shape[d] - 1) for d in range(len(idx)))
            v = t[ix]
            return Num(v, v)
        if len(varying) == 1:
            d = varying[0]
            table = self._range_table(name, t, d)
            ix = [lows[j].expand(shape).to(torch.int64).clamp(0, t.shape[j] - 1) for j in range(len(idx))]
            a = lows[d].expand(shape).clamp(0, t.shape[d] - 1).to(torch.int64)
            b = highs[d].expand(shape).clamp(0, t.shape[d] - 1).to(torch.int64)
            return table.query(ix, d, a, b)
        return Num(t.min().expand(shape), t.max().expand(shape))

    def _range_table(self, name, t, dim):
        key = (name, dim)
        if key not in self.windows:
            self.windows[key] = _RangeTable(t, dim)
        return self.windows[key]


class _RangeTable:
    """Min/max of a tensor over index ranges along one dimension (sparse table)."""

    def __init__(self, t: torch.Tensor, dim: int):
        x = t.movedim(dim, -1)
        self.mins, self.maxs = [x], [x]
        step = 1
        while 2 * step <= x.shape[-1]:
            a, b = self.mins[-1], self.maxs[-1]
            self.mins.append(torch.minimum(a[..., :-step], a[..., step:]))
            self.maxs.append(torch.maximum(b[..., :-step], b[..., step:]))
            step *= 2
        self.dim = dim

    def query(self, ix: list[torch.Tensor], d: int, a: torch.Tensor, b: torch.Tensor) -> Num:
        length = (b - a + 1).clamp(min=1)
        level = torch.floor(torch.log2(length.to(F))).to(torch.int64)
        lo = torch.full(a.shape, INF, dtype=F)
        hi = torch.full(a.shape, -INF, dtype=F)
        others = [ix[j] for j in range(len(ix)) if j != d]
        for k in torch.unique(level).tolist():
            sel = level == k
            aa, bb = a[sel], b[sel] - (1 << k) + 1
            o = [x[sel] for x in others]
            m = torch.minimum(self.mins[k][(*o, aa)], self.mins[k][(*o, bb)])
            M = torch.maximum(self.maxs[k][(*o, aa)], self.maxs[k][(*o, bb)])
            lo[sel], hi[sel] = m, M
        return Num(lo, hi)
