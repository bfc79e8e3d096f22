"""Interval numbers (the seam: the bounds and the sound rule of each operation on them, apart from the walk over
an expression in ``intervals``).

Sound interval evaluation of IR expressions over boxes of (query, key)
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

F = torch.float64
INF = math.inf
#: Integers are exact in float64 below this.
EXACT = 2.0**53
#: int64 wraps around at this magnitude.
WRAP = 2.0**63


def as_t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=F if not isinstance(x, bool) else torch.bool)


FALSE = torch.tensor(False)
TRUE = torch.tensor(True)


class Num:
    """Bounds of a number; see the module docstring."""

    __slots__ = ("lo", "hi", "nan", "dtype")

    def __init__(self, lo, hi, nan=None, dtype: torch.dtype | None = None):
        self.lo, self.hi = as_t(lo), as_t(hi)
        self.nan = FALSE if nan is None else as_t(nan)
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
            return make(v, v, torch.isnan(v), x.dtype)
        v = x.to(F)
        return int_num(v, v)
    if isinstance(x, bool | int):
        return int_num(as_t(float(x)), as_t(float(x)))
    v = as_t(float(x))
    return make(v, v, torch.isnan(v), F)


def nan_to(x: torch.Tensor, value: float) -> torch.Tensor:
    """NaN replaced by ``value``, infinities kept (torch's nan_to_num would clip them)."""
    return torch.where(torch.isnan(x), as_t(value), x)


def nan0(x: torch.Tensor) -> torch.Tensor:
    return nan_to(x, 0.0)


def make(lo, hi, nan, dtype, *args: Num) -> Num:
    """A result: NaN bounds made infinite, NaN propagated from the operands, an
    operand with no number gives none, narrow float dtypes widened."""
    lo, hi = nan_to(as_t(lo), -INF), nan_to(as_t(hi), INF)
    nan = as_t(nan)
    for a in args:
        nan = nan | a.nan
        lo = torch.where(a.empty, as_t(INF), lo)
        hi = torch.where(a.empty, as_t(-INF), hi)
    if dtype is not None and dtype != F:
        lo, hi = widen_narrow(lo, hi, dtype)
    return Num(lo, hi, nan, dtype)


def widen_narrow(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cover one rounding to a narrower float dtype (and its overflow to inf)."""
    info = torch.finfo(dtype)
    eps = 2 * info.eps
    # an infinite bound rounds to itself (+inf - inf * eps would be NaN: a bound of no number)
    wlo = torch.where(lo < -info.max, as_t(-INF), torch.where(lo == INF, lo, lo - lo.abs() * eps - info.tiny))
    whi = torch.where(hi > info.max, as_t(INF), torch.where(hi == -INF, hi, hi + hi.abs() * eps + info.tiny))
    keep = lo > hi  # no number: stays empty
    return torch.where(keep, lo, wlo), torch.where(keep, hi, whi)


def int_num(lo, hi) -> Num:
    """An int64 result: bounds rounded outwards above 2**53; beyond 2**63 the
    evaluator wraps around, so any int64 is possible."""
    lo, hi = nan_to(as_t(lo), -INF), nan_to(as_t(hi), INF)
    lo = torch.where(lo.abs() > EXACT, torch.nextafter(lo, torch.full_like(lo, -INF)), lo)
    hi = torch.where(hi.abs() > EXACT, torch.nextafter(hi, torch.full_like(hi, INF)), hi)
    wrap = (lo < -WRAP) | (hi >= WRAP)
    lo = torch.where(wrap, as_t(-WRAP), lo)
    hi = torch.where(wrap, as_t(WRAP), hi)
    return Num(lo, hi, None, None)


def result_dtype(*args: Num) -> torch.dtype | None:
    """The evaluator's promotion: any float makes a float; the narrowest float
    dtype among the operands bounds the rounding (a conservative choice)."""
    floats = [a.dtype for a in args if a.is_float]
    if not floats:
        return None
    return max(floats, key=lambda d: torch.finfo(d).eps)


def ulps(lo: torch.Tensor, hi: torch.Tensor, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen by ``n`` ulps: libm functions are faithfully, not correctly, rounded."""
    for _ in range(n):
        lo, hi = torch.nextafter(lo, torch.full_like(lo, -INF)), torch.nextafter(hi, torch.full_like(hi, INF))
    return lo, hi


def corners(fn, a: Num, b: Num) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.stack(torch.broadcast_tensors(nan0(fn(a.lo, b.lo)), nan0(fn(a.lo, b.hi)),
                                               nan0(fn(a.hi, b.lo)), nan0(fn(a.hi, b.hi))))
    return vals.min(0).values, vals.max(0).values


def has(x: Num, v: float) -> torch.Tensor:
    return (x.lo <= v) & (v <= x.hi)


def has_inf(x: Num) -> torch.Tensor:
    return (x.lo == -INF) | (x.hi == INF)



# ----------------------------------------------------------------- arithmetic rules
def add(a: Num, b: Num) -> Num:
    dtype = result_dtype(a, b)
    if dtype is None:
        return int_num(a.lo + b.lo, a.hi + b.hi)
    # inf + -inf is NaN
    nan = ((a.hi == INF) & (b.lo == -INF)) | ((a.lo == -INF) & (b.hi == INF))
    return make(a.lo + b.lo, a.hi + b.hi, nan, dtype, a, b)


def mul(a: Num, b: Num) -> Num:
    dtype = result_dtype(a, b)
    lo, hi = corners(torch.mul, a, b)
    if dtype is None:
        return int_num(lo, hi)
    nan = (has(a, 0.0) & has_inf(b)) | (has_inf(a) & has(b, 0.0))  # 0 * inf is NaN
    return make(lo, hi, nan, dtype, a, b)


def divide(a: Num, b: Num) -> Num:
    """float64 a / b of two ints (the evaluator's exact ratio): x / 0 is +-inf, 0 / 0 NaN."""
    nonzero = (b.lo > 0) | (b.hi < 0)
    lo, hi = corners(torch.div, a, b)
    lo, hi = torch.where(nonzero, lo, as_t(-INF)), torch.where(nonzero, hi, as_t(INF))
    return make(lo, hi, ~nonzero & has(a, 0.0), F, a, b)


def floordiv(a: Num, b: Num) -> Num:
    dtype = result_dtype(a, b)
    nonzero = (b.lo > 0) | (b.hi < 0)
    if dtype is None:
        finite = torch.isfinite(a.lo) & torch.isfinite(a.hi) & torch.isfinite(b.lo) & torch.isfinite(b.hi)
        small = finite & (torch.maximum(a.lo.abs(), a.hi.abs()) < 2.0**62) & (torch.maximum(b.lo.abs(), b.hi.abs()) < 2.0**62)
        # exact int64 floor division at the corners (monotone on a divisor of one sign)
        safe = lambda x: torch.where(small, x, as_t(1.0)).to(torch.int64)  # noqa: E731
        sb = lambda x: torch.where(x == 0, torch.ones_like(x), x)  # noqa: E731
        floors = [torch.div(safe(x), sb(safe(y)), rounding_mode="floor") for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
        c = torch.stack(torch.broadcast_tensors(*floors)).to(F)
        qlo, qhi = corners(torch.div, a, b)
        lo = torch.where(small, c.min(0).values, torch.floor(qlo) - 1)
        hi = torch.where(small, c.max(0).values, torch.floor(qhi) + 1)
        # x // 0 is 0: a divisor interval holding 0 is unbounded (0 included)
        return int_num(torch.where(nonzero, lo, as_t(-INF)), torch.where(nonzero, hi, as_t(INF)))
    # floats (torch.div(..., rounding_mode="floor")): 0 // 0 and inf // y are NaN, x // 0 is +-inf
    qlo, qhi = corners(torch.div, a, b)
    lo = torch.where(nonzero, torch.floor(qlo) - 1, as_t(-INF))
    hi = torch.where(nonzero, torch.floor(qhi) + 1, as_t(INF))
    nan = (has(a, 0.0) & has(b, 0.0)) | has_inf(a)
    return make(lo, hi, nan, dtype, a, b)


def mod(a: Num, b: Num) -> Num:
    dtype = result_dtype(a, b)
    alo, ahi, blo, bhi = a.lo, a.hi, b.lo, b.hi
    integer = dtype is None
    unit = 1.0 if integer else 0.0  # a float remainder may round up to the divisor itself
    general_lo = torch.where(blo > 0, as_t(0.0), torch.where(bhi < 0, blo + unit, -torch.maximum(blo.abs(), bhi.abs())))
    general_hi = torch.where(blo > 0, bhi - unit, torch.where(bhi < 0, as_t(0.0), torch.maximum(blo.abs(), bhi.abs())))
    zero_in = (blo <= 0) & (bhi >= 0)
    if integer:
        # x % 0 == x for ints: a divisor interval holding 0 also admits a itself
        general_lo = torch.where(zero_in, torch.minimum(general_lo, alo), general_lo)
        general_hi = torch.where(zero_in, torch.maximum(general_hi, ahi), general_hi)
        # a point divisor and a within one period: the remainder is a - c * period, exactly
        point_b = (blo == bhi) & (blo != 0)
        safe_c = torch.where(point_b, blo, as_t(1.0))
        small = (torch.maximum(alo.abs(), ahi.abs()) < 2.0**52) & (safe_c.abs() < 2.0**52)
        same_period = point_b & small & (torch.floor(alo / safe_c) == torch.floor(ahi / safe_c))
        r_lo = alo - torch.floor(alo / safe_c) * safe_c
        r_hi = ahi - torch.floor(ahi / safe_c) * safe_c
        return int_num(torch.where(same_period, r_lo, general_lo), torch.where(same_period, r_hi, general_hi))
    # floats (torch.remainder): x % 0.0 and inf % y are NaN; x % +-inf may be +-inf
    both_points = (alo == ahi) & (blo == bhi)
    exact = S.float_remainder(alo, blo)
    lo = torch.where(both_points, exact, general_lo)
    hi = torch.where(both_points, exact, general_hi)
    nan = zero_in | has_inf(a) | (both_points & torch.isnan(exact))
    # a point divisor 0.0, or a = +-inf only: no number at all
    none = ((blo == 0) & (bhi == 0)) | ((alo == ahi) & torch.isinf(alo)) | (both_points & torch.isnan(exact))
    lo, hi = torch.where(none, as_t(INF), lo), torch.where(none, as_t(-INF), hi)
    return make(lo, hi, nan, dtype, a, b)


def even_odd_pow(base: Num, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of x ** n for a non-negative integer n."""
    blo, bhi = base.lo, base.hi
    lo_p, hi_p = nan0(blo**n), nan0(bhi**n)
    if n % 2 == 1:
        return lo_p, hi_p
    straddle = (blo < 0) & (bhi > 0)
    return torch.where(straddle, as_t(0.0), torch.minimum(lo_p, hi_p)), torch.maximum(lo_p, hi_p)


def integral(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of an int64 power from float64 ``pow`` at the corners, which is faithfully rounded:
    the integer it approximates where an ulp is small, two ulps wider above."""
    wlo, whi = ulps(lo, hi)
    small = 2.0**48
    return torch.where(lo.abs() < small, torch.round(lo), wlo), torch.where(hi.abs() < small, torch.round(hi), whi)


def transcendental(fn_type, a: Num) -> Num:
    """exp, tanh (monotone, total), log (NaN below 0, -inf at 0) and sqrt (NaN below 0), in float64."""
    fn = {sympy.exp: torch.exp, sympy.tanh: torch.tanh, S.Log: torch.log, S.Sqrt: torch.sqrt}[fn_type]
    dtype = F if a.dtype is None else result_dtype(a)
    lo, hi = a.lo, a.hi
    nan = FALSE
    if fn_type in (S.Log, S.Sqrt):
        nan = lo < 0
        none = hi < 0  # every value negative: NaN everywhere
        lo = lo.clamp(min=0.0)
        olo, ohi = ulps(fn(lo), fn(hi))
        olo, ohi = torch.where(none, as_t(INF), olo), torch.where(none, as_t(-INF), ohi)
    else:
        olo, ohi = ulps(fn(lo), fn(hi))
    if fn_type is sympy.tanh:
        olo, ohi = olo.clamp(min=-1.0), ohi.clamp(max=1.0)
    return make(olo, ohi, nan, dtype, a)
