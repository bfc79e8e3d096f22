"""Float division by zero (constant folding agrees with the evaluator) and nested
lets staying linear (the IR shares sub-expressions; nothing walks the expanded tree)."""

from __future__ import annotations

import math
import random
import signal

import pytest
import sympy
import torch

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.core import symbols as S

# ----------------------------------------------------------------- float division by zero


@pytest.mark.parametrize("src, col", [
    ("pattern p mask q - k < 1.0 % 0.0", 30),
    ("pattern p(z = 0.0) bias 2.5 // z", 32),
    ("pattern p(z = 0.0) bias q % z", 29),
    ("pattern p(z = 0.0) bias 2.5 / z", 31),
    ("pattern p(z = 1.5) bias q // (z - 1.5)", 31),
])
def test_constant_float_zero_divisor_is_a_located_error(src, col):
    with pytest.raises(attnc.SpecError) as info:
        attnc.load(src)
    assert info.value.message == "division by zero"
    assert (info.value.pos.line, info.value.pos.col) == (1, col)


def _float_pairs():
    rng = random.Random(7)
    # (no subnormal divisors and no overflowing quotients: torch itself differs there between
    # its scalar and vectorised kernels)
    special = [0.0, -0.0, 1.0, -1.0, 0.1, -0.1, 2.5, -2.5, 7.0, 1e150, 1e-150, math.inf, -math.inf]
    pairs = [(a, b) for a in special for b in special]
    pairs += [(rng.uniform(-50, 50), rng.choice([rng.uniform(-5, 5), 0.0, -0.0])) for _ in range(300)]
    return pairs


def _same(x: float, y: float) -> bool:
    """Equal as IEEE compares (+-0 alike: Python's ``0.0 % -1.0`` is -0.0, torch's 0.0), NaN equal to NaN."""
    return (math.isnan(x) and math.isnan(y)) or x == y


def test_folded_float_floordiv_and_mod_match_the_evaluator():
    """Constant folding (sympy, scalar evaluator) and the tensor evaluator give the same bits."""
    pairs = _float_pairs()
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    tensor_div, tensor_mod = E._floordiv(a, b), E._mod(a, b)
    for i, (x, y) in enumerate(pairs):
        for scalar in (E._floordiv(x, y), S.float_floordiv(x, y)):
            assert _same(scalar, tensor_div[i].item()), (x, y, scalar, tensor_div[i].item())
        for scalar in (E._mod(x, y), S.float_mod(x, y)):
            assert _same(scalar, tensor_mod[i].item()), (x, y, scalar, tensor_mod[i].item())
        if y != 0 and math.isfinite(x) and math.isfinite(y):  # sympy folds finite numbers
            folded_div = S.FloorDiv(sympy.Float(x), sympy.Float(y))
            folded_mod = S.Mod(sympy.Float(x), sympy.Float(y))
            assert _same(float(folded_div), tensor_div[i].item()), (x, y)
            assert _same(float(folded_mod), tensor_mod[i].item()), (x, y)


def test_sympy_float_modulo_is_not_used():
    # sympy's own Mod(1.0, 0.1) is 0.0; Python and torch give 0.09999999999999995
    assert float(S.Mod(sympy.Float(1.0), sympy.Float(0.1))) == 1.0 % 0.1 != 0.0


@pytest.mark.parametrize("expr, want", [
    ("2.5 // (heads * 1.0 - 1.0)", math.inf),
    ("-2.5 // (heads * 1.0 - 1.0)", -math.inf),
    ("0.0 // (heads * 1.0 - 1.0)", math.nan),
    ("2.5 % (heads * 1.0 - 1.0)", math.nan),
    ("2.5 // (heads - 1)", math.inf),
    ("7 // (heads - 1)", 0),
    ("7 % (heads - 1)", 7),
])
def test_divisor_zero_once_sizes_are_known(expr, want):
    """A divisor that is 0 only at these sizes: the folded constant is the evaluator's value."""
    pat = attnc.load(f"pattern p bias {expr}")
    bound = E.bind_sizes(pat, n=4, heads=1)
    folded = E.substitute(pat.bias, bound)
    ev = E.evaluator(pat, bound)
    value = float(E.score_bias(pat, bound, ev))
    assert _same(value, float(want))
    # the same expression over positions (never folded) gives the same value
    pat_t = attnc.load(f"pattern p bias q * 0 + ({expr})")
    tensor = E.score_bias(pat_t, E.bind_sizes(pat_t, n=4, heads=1), E.evaluator(pat_t, E.bind_sizes(pat_t, n=4, heads=1)))
    assert all(_same(v, float(want)) for v in torch.as_tensor(tensor, dtype=torch.float64).flatten().tolist())
    assert folded.is_Number or not folded.free_symbols - {S.Q, S.K}


def test_float_divisor_zero_at_positions_follows_torch():
    pat = attnc.load("pattern p bias (q * 1.0) // (k * 1.0) + (q * 1.0) % (k * 1.0 + 0.0)")
    bound = E.bind_sizes(pat, n=5)
    got = E.score_bias(pat, bound, E.evaluator(pat, bound))[0, 0]
    qs = torch.arange(5, dtype=torch.float64).view(-1, 1)
    ks = torch.arange(5, dtype=torch.float64).view(1, -1)
    want = torch.div(qs, ks, rounding_mode="floor") + torch.remainder(qs, ks)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def _python_mod(x: float, y: float) -> float:
    try:
        return x % y
    except ZeroDivisionError:
        return math.nan


def test_float_mod_is_python_mod_in_every_position():
    """Float ``%`` is exact (Python's) wherever the element sits in the tensor. torch's
    vectorised remainder gives NaN where ``a / b`` overflows (``24.0 % 1e-310``) and its
    scalar tail the exact value: a mask read a token's position into its answer (CI)."""
    rng = random.Random(7)
    special = [0.0, -0.0, 1e-310, -5e-324, 3.0, -2.5, 1e308, -1e308, math.inf, -math.inf, math.nan]

    def draw() -> float:
        if rng.random() < 0.2:
            return rng.choice(special)
        return rng.choice([1.0, -1.0]) * 10.0 ** rng.uniform(-323, 308)

    pairs = [(draw(), draw()) for _ in range(4000)] + [(24.0, 1e-310), (1e308, 5e-324), (-7.5, 1e-320)]
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    got = E._mod(a, b)
    for i, (x, y) in enumerate(pairs):
        assert _same(got[i].item(), _python_mod(x, y)), (x, y, got[i].item())
    # one pair broadcast over 25 positions (vector lanes and the scalar tail) gives one value
    row = E._mod(torch.full((25,), 24.0, dtype=torch.float64), torch.full((25,), 1e-310, dtype=torch.float64))
    assert all(v == 24.0 % 1e-310 for v in row.tolist())
    assert _same(S.float_mod(24.0, 1e-310), 24.0 % 1e-310)


def test_float32_mod_is_exact_in_every_position_and_keeps_its_dtype():
    """float32 ``%``: the exact floored remainder of the float32 values, rounded once to float32, in
    every lane (torch's float32 remainder gave NaN in the vector lanes and an inexact value in the
    tail where the quotient overflows float32, e.g. 1e37 % 0.01); the result stays float32, also
    for a scalar divisor (as ``//`` does)."""
    rng = random.Random(11)
    pairs = [(rng.choice([1.0, -1.0]) * 10.0 ** rng.uniform(-40, 38), rng.choice([1.0, -1.0]) * 10.0 ** rng.uniform(-40, 38))
             for _ in range(3000)] + [(1e37, 0.01), (-3e38, 1e-38), (2.5, -0.75)]
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    got = E._mod(a, b)
    assert got.dtype == torch.float32
    for i in range(len(pairs)):
        x, y = a[i].item(), b[i].item()  # the float32 values, exactly, as Python floats
        want = torch.tensor(_python_mod(x, y), dtype=torch.float64).to(torch.float32).item()
        assert _same(got[i].item(), want), (x, y, got[i].item(), want)
    row = E._mod(torch.full((40,), 1e37), torch.full((40,), 0.01))
    assert row.dtype == torch.float32 and len(set(row.tolist())) == 1 and not math.isnan(row[0].item())
    assert E._mod(torch.full((3,), 1.7), 0.1).dtype == torch.float32 == E._floordiv(torch.full((3,), 1.7), 0.1).dtype


# ----------------------------------------------------------------- nested lets stay linear
NESTED = {
    "if": ("let a{i} = if a{j} > 0 then a{j} else -a{j}", lambda a: a if a > 0 else -a),
    "abs": ("let a{i} = abs(a{j} - 1) + a{j}", lambda a: abs(a - 1) + a),
    "minmax": ("let a{i} = min(a{j}, 3) + max(a{j}, 1)", lambda a: min(a, 3) + max(a, 1)),
    "mod": ("let a{i} = a{j} % 7 + a{j} // 3", lambda a: a % 7 + a // 3),
    "clamp": ("let a{i} = clamp(a{j} - 2, -a{j}, a{j} * 2)", lambda a: min(max(a - 2, -a), a * 2)),
}
MASK = "mask a0 > 3 and a0 % 2 == 0 or q == k"


def _nested(form: str, depth: int) -> str:
    lines = ["pattern p", f"let a{depth} = q - k"]
    lines += [NESTED[form][0].format(i=i, j=i + 1) for i in range(depth - 1, -1, -1)]
    return "\n".join([*lines, MASK])


@pytest.fixture
def hang_guard():
    """Fail instead of hanging (the exponential checker took minutes at depth 8)."""
    def fail(*_):
        raise TimeoutError("nested lets took more than 120 s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("form", sorted(NESTED))
def test_nested_lets_stay_linear_and_evaluate_exactly(form, hang_guard):
    sizes = {}
    for depth in (10, 20, 32):
        pat = attnc.load(_nested(form, depth))
        sizes[depth] = S.dag_size(pat.mask)
    # linear in the source: a bounded number of distinct nodes per let (the
    # expanded tree of depth 32 has more than 2**32 nodes)
    assert all(size <= 8 * depth + 20 for depth, size in sizes.items()), sizes
    # and the mask means what the source says (a naive loop over every pair)
    n = 12
    mask = E.mask_tensor(pat, E.bind_sizes(pat, n=n))[0, 0]
    fn = NESTED[form][1]
    for q in range(n):
        for k in range(n):
            a = q - k
            for _ in range(32):
                a = fn(a)
            assert bool(mask[q, k]) == ((a > 3 and a % 2 == 0) or q == k), (q, k)


def test_nested_lets_check_from_the_cli(tmp_path, hang_guard, capsys):
    from attnc.cli import main

    path = tmp_path / "deep.attn"
    path.write_text(_nested("if", 40) + "\n")
    assert main(["check", str(path)]) == 0
    assert "ok (1 declaration: p)" in capsys.readouterr().out


def test_substitute_matches_sympy_subs_on_small_expressions():
    pat = attnc.load("pattern p(w = 3) tokens grid(y: a, x: b) mask abs(q.y - k.y) <= w and (q.x - k.x) % b < a // 2")
    subs = {S.size_symbol("a"): 4, S.size_symbol("b"): 6}
    assert S.substitute(pat.mask, subs) == pat.mask.subs(subs)
