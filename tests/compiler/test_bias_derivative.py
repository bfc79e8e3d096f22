"""``compiler.codegen.triton.bias.derivative``: d bias / d (an input's value read), as the dQ kernel's gradient pass
prints it, equals torch autograd's in float64 (min/max split evenly on a tie, ``%`` as ``a - b * floor(a / b)``),
for biases of nested clamps around a float input (a differential fuzz case whose sympy Piecewise of Piecewise
conditions took minutes and then failed)."""

from __future__ import annotations

import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.compiler.codegen.triton.bias import derivative

U = sympy.Symbol("u", real=True)


def _clamp(x, lo, hi):
    return sympy.Min(sympy.Max(x, lo), hi)


def _torch_clamp(x, lo, hi):
    return torch.minimum(torch.maximum(x, torch.tensor(lo, dtype=x.dtype)), torch.tensor(hi, dtype=x.dtype))


#: (sympy, torch) pairs of the same bias of u (c = 0.5, n = 19: the fuzz case's outer clamp and two wider ones)
CASES = {
    "fuzz": (lambda u: _clamp(sympy.Mod(19, sympy.Rational(1, 2) + sympy.Abs(_clamp(sympy.Min(sympy.Rational(1, 2), u)
                                                                                 ** 3, -27, 27))), -1, 1),
             lambda u: _torch_clamp(torch.remainder(torch.tensor(19.0, dtype=u.dtype), 0.5 + torch.abs(_torch_clamp(
                 torch.minimum(torch.tensor(0.5, dtype=u.dtype), u) ** 3, -27.0, 27.0))), -1.0, 1.0)),
    "wide": (lambda u: _clamp(sympy.Mod(19, sympy.Rational(1, 2) + sympy.Abs(_clamp(u ** 3, -27, 27))), -5, 5),
             lambda u: _torch_clamp(torch.remainder(torch.tensor(19.0, dtype=u.dtype),
                                                    0.5 + torch.abs(_torch_clamp(u ** 3, -27.0, 27.0))), -5.0, 5.0)),
    "nested": (lambda u: _clamp(_clamp(sympy.tanh(u), u + 1, u * u), -1, 1),
               lambda u: _torch_clamp(torch.minimum(torch.maximum(torch.tanh(u), u + 1), u * u), -1.0, 1.0)),
}
DERIVATIVES = {name: derivative(sym(U), U) for name, (sym, _) in CASES.items()}


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(CASES)),
       value=st.one_of(st.floats(-4.0, 4.0, allow_nan=False), st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 3.0])))
def test_the_derivative_of_nested_clamps_is_torch_autograds(name, value):
    u = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    CASES[name][1](u).backward()
    ours = float(DERIVATIVES[name].subs(U, sympy.Float(value, 53)))
    assert abs(ours - float(u.grad)) <= 1e-9 * max(1.0, abs(float(u.grad))), (name, value, ours, float(u.grad))


def test_an_if_inside_nested_clamps_differentiates():
    """``if`` (the IR's unfolded Piecewise) inside clamps inside an ``if``: sympy's own Piecewise folded the ``if`` of a
    condition put back after differentiating and failed (an AssertionError in ``piecewise_fold``)."""
    from attnc.core import symbols as S

    x = _clamp(S.Piecewise((2 * U, U > 0), (-U, True)), -3, 3)
    x = _clamp(S.Piecewise((2 * x + U, x > 0), (x - U, True)), -3, 3)
    d = derivative(x, U)
    assert not any(isinstance(s, sympy.Dummy) for s in d.free_symbols)
    for value in (-2.0, -0.7, 0.3, 0.6, 1.4, 2.5):  # away from the kinks: central differences of the bias
        h = 1e-6
        f = lambda v: float(x.subs(U, v))  # noqa: E731
        assert abs(float(d.subs(U, value)) - (f(value + h) - f(value - h)) / (2 * h)) < 1e-5, value
