"""The checker: one test per kind of bad input, each asserting the message, the
line and column of the construct at fault, the caret under it and the hint.
Plus the compile-time window checks and the IR hash (``key()``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import attnc
from attnc.spec.library import check_text

FILE = "bad.attn"


def spec_error(src: str, *, load: bool = False, **kwargs) -> attnc.SpecError:
    src = textwrap.dedent(src).lstrip("\n")
    with pytest.raises(attnc.SpecError) as info:
        if load:
            attnc.load(src, **kwargs)
        else:
            check_text(src, FILE)
    return info.value


def assert_at(err: attnc.SpecError, line: int, col: int, *fragments: str, hint: str | None = None,
              width: int | None = None, filename: str = FILE) -> None:
    """The error is at LINE:COL of FILE, says FRAGMENTS, and draws the caret there."""
    assert err.pos is not None, str(err)
    assert (err.pos.line, err.pos.col) == (line, col), str(err)
    for fragment in fragments:
        assert fragment in err.message, str(err)
    lines = str(err).splitlines()
    assert lines[0] == f"{filename}:{line}:{col}: error: {err.message}"
    source_line = err.source.splitlines()[line - 1]
    assert lines[1] == "    " + source_line.expandtabs(1)
    caret = lines[2][4:]
    assert caret.index("^") == col - 1, str(err)
    if width is not None:
        assert len(caret.strip()) == width, str(err)
    if hint is not None:
        assert err.hint == hint and lines[-1] == f"  hint: {hint}", str(err)


# ----------------------------------------------------------------- syntax
def test_syntax_error_unexpected_token():
    err = spec_error("""
        pattern p
          tokens seq
          mask q < < k
    """)
    assert_at(err, 3, 12, "unexpected '<'", width=1)
    # the list of what could come is in words, not grammar-internal names
    assert "expected" in err.message and "'+' or '-'" in err.message and "a name" in err.message
    assert "_op" not in err.message.lower()


def test_syntax_error_unexpected_character():
    err = spec_error("pattern p\n  tokens seq\n  mask q $ k\n")
    assert_at(err, 3, 10, "unexpected character '$'")


def test_syntax_error_end_of_file():
    err = spec_error("pattern p\n  tokens seq\n  mask q <\n")
    assert err.pos.line == 3 and "unexpected end of file" in err.message
    assert str(err).startswith(f"{FILE}:3:")


def test_syntax_error_reserved_word_as_name():
    err = spec_error("pattern p(mask = 1)\n  tokens seq\n")
    assert_at(err, 1, 11, "'mask' is a reserved word", width=4)


def test_syntax_error_integer_literal_too_large():
    err = spec_error("pattern p\n  tokens seq\n  mask q < 99999999999999999999\n")
    assert_at(err, 3, 12, "integer literal too large", width=20)


@pytest.mark.parametrize("src, col", [
    ("pattern p\n  tokens seq\n  mask q * 4611686018427387904 * 4 > k\n", 8),
    ("pattern p(s = 1)\n  tokens seq\n  mask (q + 1) * s * 8 == 0\n", 9),
])
def test_constants_folded_past_64_bits_are_refused_where_written(src, col):
    """sympy multiplies constants out exactly (q * 2**62 * 4 is q * 2**64), which no backend's 64-bit integers
    hold: refused at the expression, not an OverflowError at the call or a comparison folded to false."""
    err = spec_error(src, load=True, s=2**61) if "(s = 1)" in src else spec_error(src, load=True)
    assert err.pos is not None and (err.pos.line, err.pos.col) == (3, col), str(err)
    assert "constant too large" in err.message and "18446744073709551616" in err.message, str(err)
    assert attnc.load(src.replace("* 4 >", "* 1 >"), **({"s": 2**59} if "(s = 1)" in src else {}))  # within 64 bits


def test_a_fold_past_64_bits_with_the_sizes_is_refused_when_they_are_bound():
    """q * n * 2**60 loads (n is a size), and at n = 16 folds to q * 2**64: a SpecError, not an OverflowError."""
    with pytest.raises(attnc.SpecError) as info:
        attnc.materialize_mask("pattern p\n  tokens seq\n  mask q * n * 2**60 > k\n", n=16)
    assert "past 64 bits at these sizes" in info.value.message, str(info.value)
    assert attnc.materialize_mask("pattern p\n  tokens seq\n  mask q * n * 2**58 > k\n", n=16).shape == (1, 16, 16)


# ----------------------------------------------------------------- names
def test_unknown_name_with_hint():
    err = spec_error("""
        pattern p(window = 3)
          tokens seq
          mask q - k < windw
    """)
    assert_at(err, 3, 16, "unknown name 'windw'", hint="did you mean 'window'?", width=5)


def test_unknown_function_with_hint():
    err = spec_error("pattern p\n  tokens seq\n  mask windoww(3)\n")
    assert_at(err, 3, 8, "unknown function or pattern 'windoww'", hint="did you mean 'window'?")


def test_unknown_pattern_name_as_bool():
    err = spec_error("""
        pattern near
          tokens seq
          mask q - k < 2
        pattern p
          tokens seq
          mask causal and naer
    """)
    assert_at(err, 6, 19, "unknown name 'naer'", hint="did you mean 'near'?")


def test_cyclic_lets():
    err = spec_error("""
        pattern p
          tokens seq
          let a = b + 1
          let b = c * 2
          let c = a
          mask q < a
    """)
    assert_at(err, 3, 7, "'a' is defined in terms of itself: a -> b -> c -> a",
              hint="definitions may not be cyclic")


def test_self_referential_let():
    err = spec_error("pattern p\n  tokens seq\n  let a = a + 1\n  mask q < a\n")
    assert_at(err, 3, 7, "'a' is defined in terms of itself: a -> a")


def test_lets_in_any_order_are_fine():
    src = "pattern p\n  tokens seq\n  let b = a * 2\n  let a = 1\n  mask q - k < b\n"
    m = attnc.materialize_mask(src, n=4)[0]
    assert m[3].tolist() == [False, False, True, True]


# ----------------------------------------------------------------- types
def test_int_used_as_mask():
    err = spec_error("pattern p\n  tokens seq\n  mask q - k\n")
    assert_at(err, 3, 8, "a mask must be a bool, got an int")


def test_and_on_ints():
    err = spec_error("pattern p\n  tokens seq\n  mask q and k\n")
    assert_at(err, 3, 8, "the left operand of 'and' must be a bool, got an int")
    err = spec_error("pattern p\n  tokens seq\n  mask causal or k\n")
    assert_at(err, 3, 18, "the right operand of 'or' must be a bool, got an int")
    err = spec_error("pattern p\n  tokens seq\n  mask not q\n")
    assert_at(err, 3, 12, "the operand of 'not' must be a bool, got an int")


def test_arithmetic_on_bools():
    err = spec_error("pattern p\n  tokens seq\n  mask causal + 1 > 0\n")
    assert_at(err, 3, 8, "'+' needs numbers, got a bool", width=6)
    err = spec_error("pattern p\n  tokens seq\n  mask (q < 1) & causal\n")
    assert err.pos.line == 3 and "needs numbers, got a bool" in err.message
    assert err.hint == "use 'and', 'or', 'not' to combine bools"


def test_bit_operation_on_float():
    err = spec_error("pattern p\n  tokens seq\n  mask 1.5 << 2 > 0\n")
    assert_at(err, 3, 8, "'<<' needs ints, got a float")


def test_comparison_types():
    err = spec_error("pattern p\n  tokens seq\n  mask causal < 1\n")
    assert_at(err, 3, 17, "cannot compare a bool with an int")
    err = spec_error("pattern p\n  tokens seq\n  mask causal < true\n")
    assert_at(err, 3, 17, "'<' cannot order bools")


def test_if_branches_of_different_types():
    err = spec_error("pattern p\n  tokens seq\n  mask if causal then true else 1\n")
    assert_at(err, 3, 33, "the branches of 'if' have different types (bool and int)")
    err = spec_error("pattern p\n  tokens seq\n  mask if q then true else false\n")
    assert_at(err, 3, 11, "the condition of 'if' must be a bool, got an int")


def test_constant_division_by_zero():
    err = spec_error("pattern p\n  tokens seq\n  mask q // 0 == 0\n")
    assert_at(err, 3, 13, "division by zero")


@pytest.mark.parametrize("mask,col", [
    ("((q + q) / ((q - q) ** q)) < q", 10),  # 1 / 0 ** q: sympy folds it to complex infinity ** q
    ("1.5 + exp(q * 1.0) / ((k - k) ** q) > 2.0", 14),  # the division inside a sum, at its own place
])
def test_a_division_by_an_operand_that_is_always_zero(mask, col):
    """An operand that is 0 whatever q and k, under a division or a negative power, is refused at its place
    (sympy would fold the part to complex infinity, which no evaluator takes)."""
    err = spec_error(f"pattern p\n  tokens seq\n  mask {mask}\n")
    assert_at(err, 3, col, "divides by zero")


def test_bias_and_softcap_types():
    err = spec_error("pattern p\n  tokens seq\n  bias causal\n")
    assert_at(err, 3, 8, "a bias must be a number, got a bool")
    err = spec_error("pattern p\n  tokens seq\n  softcap -1.0\n")
    assert_at(err, 3, 11, "softcap must be positive")
    err = spec_error("pattern p\n  tokens seq\n  softcap q + 1.0\n")
    assert_at(err, 3, 11, "a softcap must not depend on q or k")


# ----------------------------------------------------------------- axes
def test_unknown_axis():
    err = spec_error("pattern p\n  tokens grid(y: height, x: width)\n  mask q.z == k.z\n")
    assert_at(err, 3, 10, "unknown axis 'z'", hint="axes: y, x")
    err = spec_error("pattern p\n  tokens grid(y: height, x: width)\n  mask q.yy == k.y\n")
    assert_at(err, 3, 10, "unknown axis 'yy'", hint="did you mean 'y'?")


def test_axis_of_a_flat_sequence():
    err = spec_error("pattern p\n  tokens seq\n  mask q.x == k.x\n")
    assert_at(err, 3, 10, "unknown axis 'x': the tokens are a flat 'seq'",
              hint="declare a grid: tokens grid(AXIS: SIZE, ...)")


def test_coordinate_of_something_else():
    err = spec_error("pattern p\n  tokens grid(y: height)\n  mask h.y == 0\n")
    assert_at(err, 3, 8, "only q.AXIS and k.AXIS are coordinates")


def test_axis_declared_twice_and_bad_extent():
    err = spec_error("pattern p\n  tokens grid(y: h1, y: h2)\n")
    assert_at(err, 2, 22, "axis 'y' is declared twice")
    err = spec_error("pattern p\n  tokens grid(y: 0)\n")
    assert_at(err, 2, 18, "an axis size must be at least 1")


def test_layout_clause_rules():
    err = spec_error("pattern p\n  tokens seq\n  tokens seq\n")
    assert_at(err, 3, 3, "'tokens' is given twice", width=6)
    err = spec_error("pattern p\n  queries seq\n")
    assert_at(err, 2, 3, "'queries' and 'keys' must be given together")
    err = spec_error("pattern p\n  tokens seq\n  keys seq\n")
    assert_at(err, 3, 3, "give either 'tokens' or 'queries' and 'keys', not both")


# ----------------------------------------------------------------- builtins
def test_builtin_arity():
    err = spec_error("pattern p\n  tokens seq\n  mask clamp(q, 1) > 0\n")
    assert_at(err, 3, 8, "'clamp' takes 3 argument(s), got 2", width=5)
    err = spec_error("pattern p\n  tokens seq\n  mask min(q) > 0\n")
    assert_at(err, 3, 8, "'min' takes at least 2 argument(s), got 1")
    err = spec_error("pattern p\n  tokens seq\n  mask is_pow2(q, k)\n")
    assert_at(err, 3, 8, "'is_pow2' takes 1 argument(s), got 2")


def test_builtin_unknown_keyword():
    err = spec_error("pattern p\n  tokens seq\n  mask abs(x = q) > 0\n")
    assert_at(err, 3, 12, "'abs' takes no keyword arguments")


def test_builtin_argument_types():
    err = spec_error("pattern p\n  tokens seq\n  mask log2(1.5) > 0\n")
    assert_at(err, 3, 13, "the argument of log2 must be an int, got a float")
    err = spec_error("pattern p\n  tokens seq\n  mask is_pow2(causal)\n")
    assert_at(err, 3, 16, "the argument of is_pow2 must be an int, got a bool")
    err = spec_error("pattern p\n  tokens seq\n  bias log(0)\n")
    assert_at(err, 3, 12, "log of 0 is not a finite real number")


def test_builtin_used_as_a_value():
    err = spec_error("pattern p\n  tokens seq\n  mask abs > 0\n")
    assert_at(err, 3, 8, "'abs' is a function: call it with arguments")


def test_window_on_seq_with_an_axis():
    err = spec_error("pattern p\n  tokens seq\n  mask window(x, 3)\n")
    assert_at(err, 3, 8, "window() on 'tokens seq' takes one positional argument (SIZE), got 2",
              hint="window(SIZE, dilation = 1, stride = 1, causal = false)", width=6)


def test_window_on_grid_without_an_axis():
    err = spec_error("pattern p\n  tokens grid(y: h1, x: w1)\n  mask window(3)\n")
    assert_at(err, 3, 8, "window() on a grid takes two positional arguments (AXIS, SIZE), got 1")


def test_window_unknown_axis():
    err = spec_error("pattern p\n  tokens grid(y: h1, x: w1)\n  mask window(z, 3)\n")
    assert_at(err, 3, 15, "'z' is not an axis", hint="axes: y, x")


def test_window_unknown_keyword():
    err = spec_error("pattern p\n  tokens seq\n  mask window(3, strid = 2)\n")
    assert_at(err, 3, 18, "window() has no argument 'strid'", hint="did you mean 'stride'?", width=5)


def test_window_argument_values():
    err = spec_error("pattern p\n  tokens seq\n  mask window(0)\n")
    assert_at(err, 3, 15, "window size must be at least 1, got 0")
    err = spec_error("pattern p\n  tokens seq\n  mask window(q)\n")
    assert_at(err, 3, 15, "window size must not depend on q, k or h")
    err = spec_error("pattern p\n  tokens seq\n  mask window(3, causal = 1)\n")
    assert_at(err, 3, 27, "window causal must be a bool, got an int")
    err = spec_error("pattern p\n  tokens seq\n  mask window(3, stride = 2, stride = 3)\n")
    assert_at(err, 3, 30, "keyword argument 'stride' given twice")
    err = spec_error("pattern p\n  tokens seq\n  mask window(stride = 2, 3)\n")
    assert_at(err, 3, 27, "positional argument after a keyword argument")


def test_window_needs_one_layout():
    err = spec_error("pattern p\n  queries seq\n  keys seq\n  mask window(3)\n")
    assert_at(err, 4, 8, "window() needs the same layout for queries and keys")


# ----------------------------------------------------------------- inputs
def test_input_index_count():
    err = spec_error("pattern p\n  tokens seq\n  input doc: int[n]\n  mask doc[q, k] == 0\n")
    assert_at(err, 4, 8, "input 'doc' has 1 dimension(s) (n), indexed with 2")


def test_input_not_indexed():
    err = spec_error("pattern p\n  tokens seq\n  input doc: int[n]\n  mask doc == 0\n")
    assert_at(err, 4, 8, "input 'doc' must be indexed")


def test_input_unknown_dimension():
    err = spec_error("pattern p\n  tokens seq\n  input doc: int[m]\n  mask doc[q] == 0\n")
    assert_at(err, 3, 18, "unknown dimension 'm'", hint="dimensions: heads, n, nk, dk")
    err = spec_error("pattern p\n  tokens grid(y: height)\n  input g: float[heads, heigt]\n")
    assert_at(err, 3, 25, "unknown dimension 'heigt'", hint="did you mean 'height'?")


def test_input_bad_type_and_index():
    err = spec_error("pattern p\n  tokens seq\n  input doc: bool[n]\n")
    assert_at(err, 3, 14, "input type must be 'int' or 'float', got 'bool'")
    err = spec_error("pattern p\n  tokens seq\n  input doc: int[n]\n  mask doc[q / 2] == 0\n")
    assert_at(err, 4, 12, "an index must be an int, got a float")
    err = spec_error("pattern p\n  tokens seq\n  mask dco[q] == 0\n")
    assert_at(err, 3, 8, "'dco' is not an input")


def test_input_shape_at_call_time():
    src = "pattern p\n  tokens seq\n  input doc: int[n]\n  mask doc[q] == doc[k]\n"
    import torch

    with pytest.raises(attnc.SpecError) as info:
        attnc.materialize_mask(src, n=4, inputs={"doc": torch.arange(5)})
    assert "input 'doc' has shape [5], expected [n] = [4]" in info.value.message
    with pytest.raises(attnc.SpecError, match="missing input 'doc'"):
        attnc.materialize_mask(src, n=4)
    with pytest.raises(attnc.SpecError, match="input 'doc' is int, got a torch.float32"):
        attnc.materialize_mask(src, n=4, inputs={"doc": torch.rand(4) + 1})
    with pytest.raises(attnc.SpecError, match="has no input 'dco'"):
        attnc.materialize_mask(src, n=4, inputs={"doc": torch.arange(4), "dco": torch.arange(4)})


# ----------------------------------------------------------------- parameters
def test_param_type_errors_at_load():
    src = "pattern p(w = 3)\n  tokens seq\n  mask q - k < w\n"
    for value, got in ((2.5, "got float 2.5"), (True, "got bool True")):
        err = spec_error(src, load=True, w=value)
        assert err.pos is None and err.where == "argument w"
        assert err.message == f"expected int (the default of 'w' is 3), {got}"
        assert str(err).startswith("argument w: error: ")
    err = spec_error(src, load=True, w="3")  # one message for every wrong type (it said "a number or bool" here)
    assert err.message == "expected int (the default of 'w' is 3), got str"
    err = spec_error(src, load=True, width=3)
    assert err.message == "'p' has no parameter 'width'" and err.hint == "parameters: w"
    assert spec_error(src, load=True, ww=3).hint == "did you mean 'w'?"
    err = spec_error(src, load=True, w=float("nan"))
    assert err.message == "must be finite"
    # an int for a float parameter is fine
    assert attnc.load("pattern p(r = 0.5)\n  tokens seq\n  mask q * r <= k\n", r=1) is not None


def test_param_without_value():
    err = spec_error("pattern p(w)\n  tokens seq\n  mask q - k < w\n", load=True)
    assert "parameter 'w' of 'p' has no default and no value was given" in err.message
    assert err.hint == "pass w=..."
    # `attnc check` accepts it (the value comes later)
    assert check_text("pattern p(w)\n  tokens seq\n  mask q - k < w\n", FILE)


def test_param_type_errors_in_spec():
    err = spec_error("pattern p(w = 3.5)\n  tokens grid(y: w)\n")
    assert_at(err, 2, 18, "axis size 'w' must be an int parameter")
    err = spec_error("pattern p(c = true)\n  tokens seq\n  mask q - k < c\n")
    assert_at(err, 3, 16, "cannot compare an int with a bool")
    err = spec_error("pattern p(q = 3)\n  tokens seq\n")
    assert_at(err, 1, 11, "'q' is a builtin name and cannot be a parameter")
    err = spec_error("pattern p(w = 3, w = 4)\n  tokens seq\n")
    assert_at(err, 1, 18, "parameter 'w' is declared twice")


# ----------------------------------------------------------------- score terms
def test_decay_without_causal_mask():
    err = spec_error("""
        pattern p
          tokens seq
          input g: float[heads, n]
          mask q - k < 4
          decay g
    """)
    assert_at(err, 5, 3, "'decay' (Forgetting Transformer gates) needs a causal mask",
              hint="add 'causal and ...' to the mask", width=5)
    # with a causal conjunct it is accepted, also written as k <= q
    for mask in ("causal and q - k < 4", "k <= q", "q - k < 4 and q >= k"):
        check_text(f"pattern p\n  tokens seq\n  input g: float[heads, n]\n  mask {mask}\n  decay g\n", FILE)


def test_decay_input_shape():
    err = spec_error("pattern p\n  tokens seq\n  input g: float[n]\n  mask causal\n  decay g\n")
    assert_at(err, 5, 9, "a pattern's decay must be an input of shape float[heads, n]; 'g' is float[n]")


# ----------------------------------------------------------------- routes
def test_route_bad_score_side():
    err = spec_error("pattern p\n  tokens seq\n  route topk(2) blocks(4) by k @ mean(k)\n")
    assert_at(err, 3, 30, "the routing score's left side must be 'q' or 'mean(q)'")
    err = spec_error("pattern p\n  tokens seq\n  route topk(2) blocks(4) by q @ k\n")
    assert_at(err, 3, 34, "the routing score's right side must be 'mean(k)'")


def test_route_mean_q_with_cross_layouts():
    err = spec_error("""
        pattern p
          queries seq
          keys grid(y: h1, x: w1)
          route topk(2) blocks(y: 2, x: 2) by mean(q) @ mean(k)
    """)
    assert_at(err, 4, 39, "'mean(q)' needs the same layout for queries and keys", width=4)


def test_route_topk_below_one():
    err = spec_error("pattern p\n  tokens seq\n  route topk(0) blocks(4) by q @ mean(k)\n")
    assert_at(err, 3, 14, "topk must be at least 1, got 0")
    err = spec_error("pattern p(t = 2)\n  tokens seq\n  route topk(t - 3) blocks(4) by q @ mean(k)\n")
    assert_at(err, 3, 14, "topk must be at least 1, got -1")


def test_route_blocks():
    err = spec_error("pattern p\n  tokens grid(y: h1, x: w1)\n  route topk(1) blocks(y: 2, z: 2) by q @ mean(k)\n")
    assert_at(err, 3, 30, "unknown axis 'z'")
    err = spec_error("pattern p\n  tokens grid(y: h1, x: w1)\n  route topk(1) blocks(4) by q @ mean(k)\n")
    assert_at(err, 3, 24, "a grid layout needs per-axis blocks", hint="write blocks(y: SIZE, x: SIZE)")
    err = spec_error("pattern p\n  tokens seq\n  route topk(1) blocks(0) by q @ mean(k)\n")
    assert_at(err, 3, 24, "a block size must be at least 1, got 0")


# ----------------------------------------------------------------- recurrences
def test_recurrence_with_a_mask_clause():
    err = spec_error("recurrence r\n  input g: float[heads, n]\n  mask causal\n  decay g\n")
    assert_at(err, 3, 3, "'mask' is not allowed in a recurrence",
              hint="a recurrence has a decay, lets and inputs over 'tokens seq'")


def test_recurrence_rules():
    err = spec_error("recurrence r\n  tokens seq\n")
    assert_at(err, 1, 12, "recurrence 'r' needs a 'decay' clause")
    err = spec_error("recurrence r\n  decay -0.1 * q\n")
    assert_at(err, 2, 9, "a recurrence's decay may depend only on the head h and parameters")
    err = spec_error("recurrence r\n  tokens grid(y: a1)\n  decay -0.1\n")
    assert_at(err, 2, 3, "'tokens grid' is not allowed in a recurrence")


# ----------------------------------------------------------------- pattern calls
TWO = """
pattern a(w = 2)
  tokens seq
  mask q - k < w

pattern b
  tokens seq
  mask {call}
"""


def test_call_unknown_parameter():
    err = spec_error(TWO.format(call="a(width = 3)"))
    assert_at(err, 7, 10, "pattern 'a' has no parameter 'width'", hint="parameters: w", width=5)
    err = spec_error(TWO.format(call="a(ww = 3)"))
    assert err.hint == "did you mean 'w'?"


def test_call_parameter_types_and_positional():
    err = spec_error(TWO.format(call="a(w = true)"))
    assert_at(err, 7, 14, "parameter 'w' of 'a' is int, got a bool")
    err = spec_error(TWO.format(call="a(w = 1.5)"))
    assert_at(err, 7, 14, "parameter 'w' of 'a' is int, got a float")
    err = spec_error(TWO.format(call="a(3)"))
    assert_at(err, 7, 10, "pattern 'a' takes keyword arguments only")


def test_call_recursion():
    err = spec_error("""
        pattern a
          tokens seq
          mask b

        pattern b
          tokens seq
          mask a( )
    """)
    assert_at(err, 7, 8, "pattern 'a' calls itself: a -> b -> a")
    err = spec_error("pattern a\n  tokens seq\n  mask causal and a\n")
    assert_at(err, 3, 19, "pattern 'a' calls itself: a -> a")


def test_call_of_a_recurrence():
    err = spec_error("recurrence r\n  decay -0.1\npattern p\n  tokens seq\n  mask r\n")
    assert_at(err, 5, 8, "'r' is a recurrence; only patterns can be used in a mask")


def test_call_with_missing_axis():
    err = spec_error("""
        pattern local2d
          tokens grid(y: height, x: width)
          mask window(y, 3) and window(x, 3)
        pattern p
          tokens grid(t: frames, x: width)
          mask local2d
    """)
    assert_at(err, 6, 8, "pattern 'local2d' uses axis 'y', which this pattern's layout lacks")


# ----------------------------------------------------------------- duplicates
def test_duplicate_declarations():
    err = spec_error("pattern a\n  tokens seq\n\npattern a\n  tokens seq\n")
    assert_at(err, 4, 9, "'a' is declared twice (first at line 1)")


def test_duplicate_clauses_and_names():
    err = spec_error("pattern a\n  tokens seq\n  mask causal\n  mask true\n")
    assert_at(err, 4, 3, "'mask' is given twice (first at line 3)")
    err = spec_error("pattern a\n  tokens seq\n  let x = 1\n  let x = 2\n  mask q < x\n")
    assert_at(err, 4, 7, "'x' is already defined (line 3)")
    err = spec_error("pattern a(x = 1)\n  tokens seq\n  let x = 2\n")
    assert_at(err, 3, 7, "'x' is already a parameter")
    err = spec_error("pattern a\n  tokens seq\n  let q = 2\n")
    assert_at(err, 3, 7, "'q' is a builtin name and cannot be redefined")
    err = spec_error("pattern a\n  tokens seq\n  input g: int[n]\n  let g = 2\n")
    assert_at(err, 4, 7, "'g' is already defined")
    err = spec_error("pattern a\n  tokens grid(y: height)\n  let height = 2\n")
    assert_at(err, 3, 7, "'height' is already an axis size")


# ----------------------------------------------------------------- window sizes at compile time
def window_error(src: str, **kwargs) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as info:
        attnc.materialize_mask(textwrap.dedent(src).lstrip("\n"), **kwargs)
    return info.value


def test_window_larger_than_its_axis():
    err = window_error("""
        pattern p
          tokens seq
          mask causal and window(9)
    """, n=8)
    assert_at(err, 3, 19, "window of 9 does not fit the sequence of length 8", filename="<spec>",
              hint="window size times dilation must be at most the axis length", width=6)
    # the same spec at a size where it fits is fine
    assert attnc.materialize_mask("pattern p\n  tokens seq\n  mask causal and window(9)\n", n=9).shape == (1, 9, 9)


def test_window_with_dilation_larger_than_its_axis():
    err = window_error("pattern p\n  tokens seq\n  mask window(3, dilation = 3)\n", n=8)
    assert_at(err, 3, 8, "window of 3 with dilation 3 does not fit the sequence of length 8",
              filename="<spec>", hint="window size times dilation must be at most the axis length")


def test_window_larger_than_a_grid_axis():
    err = window_error("""
        pattern p
          tokens grid(y: height, x: width)
          mask window(y, 3) and
            window(x, 5, stride = 2)
    """, sizes={"height": 4, "width": 4})
    assert_at(err, 4, 5, "window of 5 does not fit axis 'x' of length 4", filename="<spec>",
              hint="window size times dilation must be at most the axis length")


def test_window_size_from_a_given_parameter_names_the_argument():
    """The value given is at fault, not the file (REFERENCE.md: an error at a use of a parameter whose value was
    given names the argument, the use's place in the hint); a default is the file's."""
    err = window_error("pattern p(w)\n  tokens seq\n  mask window(w)\n", n=8, w=9)
    assert err.where == "argument w" and err.message == "window of 9 does not fit the sequence of length 8", str(err)
    assert err.hint == ("'w' is read at <spec>:3:8; window size times dilation must be at most the axis length")
    err = window_error("pattern p(w = 9)\n  tokens seq\n  mask window(w)\n", n=8)
    assert_at(err, 3, 8, "window of 9 does not fit the sequence of length 8", filename="<spec>",
              hint="window size times dilation must be at most the axis length")
    err = window_error("pattern p(s)\n  tokens seq\n  mask window(3, stride = s)\n", n=8, s=4)
    assert err.where == "argument s" and "stride 4 is larger than the window 3" in err.message, str(err)


def test_a_combined_patterns_windows_know_the_per_axis_argument_given():
    """A branch's window reads ks_y, which ks=6 set: its error names ks, as a plain pattern's does."""
    src = ("pattern two(ks_y = 3, ks_x = 3)\n  tokens grid(y: height, x: width)\n  branch a\n"
           "    mask window(y, ks_y) and window(x, ks_x)\n  branch b\n    mask q == k\n  combine softmax(a, b)\n")
    sites = attnc.load(src, ks=6).branches[0].pattern.windows
    assert [site.given for site in sites] == [(("size", "ks", "ks_y", "axis y, 'ks_y'"),),
                                              (("size", "ks", "ks_x", "axis x, 'ks_x'"),)]


def test_a_natten_argument_too_large_for_its_axis_is_named():
    """neighborhood_2d's kernel_size, given once for both axes, sets kernel_size_y: the error names kernel_size."""
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile_attention("stdlib:neighborhood_2d", sizes={"height": 5, "width": 5}, kernel_size=6)
    err = info.value
    assert err.where == "argument kernel_size", str(err)
    assert "window of 6 does not fit axis 'y' of length 5 (axis y, 'kernel_size_y')" in err.message, str(err)
    assert "stdlib:neighborhood_2d.attn:" in err.hint, str(err)


def test_a_stdlib_default_too_large_for_its_axis_names_the_parameter():
    """A stdlib pattern's default (a file the caller did not write) that does not fit names the parameter to give,
    with its default; a default in the caller's own file still points at the window there."""
    with pytest.raises(attnc.SpecError) as info:
        attnc.compile_attention("stdlib:neighborhood_2d", sizes={"height": 6, "width": 7})
    err = info.value
    assert err.where == "argument kernel_size_y", str(err)
    assert "window of 7 does not fit axis 'y' of length 6 (its default, 7)" in err.message, str(err)
    assert "stdlib:neighborhood_2d.attn:" in err.hint, str(err)
    own = window_error("pattern p(w = 9)\n  tokens seq\n  mask window(w)\n", n=8)
    assert_at(own, 3, 8, "window of 9 does not fit the sequence of length 8", filename="<spec>")


def test_stride_larger_than_window():
    err = window_error("pattern p\n  tokens seq\n  mask window(3, stride = 4)\n", n=8)
    assert_at(err, 3, 8, "stride 4 is larger than the window 3", filename="<spec>")


def test_window_error_inside_a_called_pattern(tmp_path):
    path = tmp_path / "two.attn"
    path.write_text("pattern local(w = 3)\n  tokens seq\n  mask window(w)\n\n"
                    "pattern p\n  tokens seq\n  mask causal and local(w = 12)\n")
    with pytest.raises(attnc.SpecError) as info:
        attnc.materialize_mask(str(path), name="p", n=8)
    err = info.value
    assert err.pos.line in (3, 7) and "window of 12 does not fit" in err.message
    assert str(err).startswith(f"{path}:{err.pos.line}:{err.pos.col}: error: ")


# ----------------------------------------------------------------- the IR hash
BASE = "pattern p(w = 3)\n  tokens seq\n  mask causal and q - k < w\n"


def test_key_same_spec_same_key():
    assert attnc.load(BASE).key() == attnc.load(BASE).key()
    assert attnc.load(BASE).key() == attnc.load(BASE, w=3).key()


def test_key_different_param_different_key():
    keys = {attnc.load(BASE, w=w).key() for w in (1, 2, 3, 4, 100)}
    assert len(keys) == 5


def test_key_different_pattern_different_key():
    other = BASE.replace("q - k < w", "q - k <= w")
    assert attnc.load(other).key() != attnc.load(BASE).key()


def test_key_ignores_whitespace_comments_and_positions():
    spaced = "# a comment\n\npattern   p( w=3 )   # header\n\ttokens seq\n\n\n  mask causal and\n   q-k<w  # tail\n"
    assert attnc.load(spaced).key() == attnc.load(BASE).key()


def test_key_is_stable_across_processes():
    code = ("import attnc; print(attnc.load('pattern p(w = 3) tokens grid(y: a1, x: b1) "
            "mask causal and q - k < w and window(x, 3) and q.y != k.y + 1').key())")
    keys = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             check=True)
        keys.add(out.stdout.strip())
    assert len(keys) == 1 and len(keys.pop()) == 64


def test_comparison_of_a_side_sympy_deems_non_real_is_left_to_evaluation():
    # log(-q) is NaN for q > 0 and -inf at q = 0 (float semantics); sympy refused the
    # relation ("Invalid comparison of non-real") with a raw TypeError before
    import math

    import numpy as np
    import torch

    spec = "pattern p()\n  tokens seq\n  mask log(-q) < 0.0005 or k == 0\n"
    n = 6
    mask = attnc.materialize_mask(spec, n=n)[0]

    def log_neg(q):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log(np.float64(-q)))

    want = torch.tensor([[(not math.isnan(log_neg(q)) and log_neg(q) < 0.0005) or k == 0 for k in range(n)]
                         for q in range(n)])
    assert torch.equal(mask, want)
    q = torch.randn(1, 2, n, 4, dtype=torch.float64)
    ref = attnc.compile_attention(spec, backend="reference")(q, q, q)
    cpu = attnc.compile_attention(spec, backend="cpu")(q, q, q)
    torch.testing.assert_close(cpu, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- parameter bounds
def _argument_error(source: str, **params) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError) as info:
        attnc.load(source, **params)
    return info.value


def test_a_value_outside_a_declared_bound_names_the_argument():
    err = _argument_error("stdlib:sliding_window", window=-5)  # was silent: an all-zero output
    assert err.where == "argument window" and err.pos is None
    assert str(err).splitlines() == ["argument window: error: must be at least 1, got -5",
                                     "  hint: 'sliding_window' declares window >= 1"]
    err = _argument_error("stdlib:softcap", cap=0.0)
    assert err.where == "argument cap" and err.message == "must be positive, got 0.0"
    assert attnc.load("stdlib:sliding_window", window=1).params == (("window", 1),)


@pytest.mark.parametrize("value, axis", [(-3, "y"), ((3, 0), "x")])
def test_a_per_axis_bound_names_the_argument_as_given(value, axis):
    """``kernel_size=-3`` named ``stdlib:neighborhood_2d.attn:20:18``: now the argument and the axis."""
    err = _argument_error("stdlib:neighborhood_2d", kernel_size=value)
    bad = value if isinstance(value, int) else 0
    assert str(err).splitlines()[0] == (f"argument kernel_size: error: must be at least 1, got {bad} "
                                        f"(axis {axis}, 'kernel_size_{axis}')")
    err = _argument_error("stdlib:neighborhood_2d", dilation_x=0)
    assert err.where == "argument dilation_x" and "stdlib:" not in str(err)


def test_every_stdlib_size_and_count_is_bounded():
    """A negative window, block, count or kernel of a stdlib pattern is refused, naming the argument."""
    from attnc.spec.library import stdlib_index

    unbounded = {(name, p.name) for name, (_, decl) in stdlib_index().items() for p in decl.params
                 if p.bound is None and not isinstance(p.default, bool)}
    # the offset of S2's vertical stripes is any int; a layer index is bounded below only; MoA's alpha is a
    # signed token count (the code's -1024 ... 1024: the budget is clipped below by its minimum); AnchorAttention's
    # theta is a margin in score units, of either sign
    assert unbounded == {("s2", "offset"), ("moa", "alpha"), ("anchor", "theta")}, unbounded
    required = {p.name: 100 for _, (_, decl) in stdlib_index().items() for p in decl.params  # no default: given
                if p.default is None and p.bound is not None}
    for name, (_, decl) in stdlib_index().items():
        for p in decl.params:
            if p.bound is not None and p.bound[0] == ">=":
                given = {q.name: required[q.name] for q in decl.params if q.name in required and q.name != p.name}
                err = _argument_error(f"stdlib:{name}", **given, **{p.name: p.bound[1] - 1})
                assert err.where == f"argument {p.name}", str(err)


def test_a_bound_on_a_default_a_bool_and_a_pattern_call():
    err = spec_error("""
        pattern p(w >= 1 = 0)
          tokens seq
          mask q - k < w
    """)
    assert_at(err, 1, 11, "the default of 'w' must be at least 1, got 0")
    err = spec_error("""
        pattern p(flag >= 1 = true)
          tokens seq
          mask flag
    """)
    assert_at(err, 1, 16, "'flag' is a bool: it takes no bound")
    err = spec_error("""
        pattern a_window(w >= 1 = 4)
          tokens seq
          mask causal and q - k < w
        pattern caller
          tokens seq
          mask a_window(w = 0)
    """)
    assert_at(err, 6, 21, "parameter 'w' of 'a_window' must be at least 1, got 0",
              hint="'a_window' declares w >= 1")
    # a bare bounded parameter stays a symbol when the file is only checked, and is checked when given
    assert check_text("pattern p(w >= 1)\n  tokens seq\n  mask q - k < w\n", FILE)
    err = _argument_error("pattern p(w >= 1)\n  tokens seq\n  mask q - k < w\n", w=0)
    assert err.where == "argument w"
    err = _argument_error("pattern p(w >= 1)\n  tokens seq\n  mask q - k < w\n", w=True)
    assert err.where == "argument w" and "expected a number" in err.message


def test_an_error_at_the_use_of_a_given_parameter_names_the_argument():
    """Where a parameter's domain is known only where it is used (a route's topk, a window's size, a
    top-p threshold), the error still names the argument the user gave; the use is in the hint."""
    err = _argument_error("stdlib:xattention", threshold=1.5)
    assert err.where == "argument threshold" and "topp must be in (0, 1]" in err.message
    assert err.hint.startswith("'threshold' is read at stdlib:xattention.attn:")
    src = "pattern p(ks = 7)\n  tokens grid(y: hh, x: ww)\n  mask window(y, ks) and window(x, ks)\n"
    err = _argument_error(src, ks=0)
    assert str(err).splitlines() == ["argument ks: error: window size must be at least 1, got 0",
                                     "  hint: 'ks' is read at <spec>:3:18"]
    # a bad default is the file's fault: its position
    err = _argument_error(src.replace("ks = 7", "ks = 0"))
    assert err.where is None and (err.pos.line, err.pos.col) == (3, 18)


# ----------------------------------------------------------------- every unknown name at once
def test_every_misspelt_name_of_a_declaration_is_reported():
    err = spec_error("""
        pattern p(window = 4)
          tokens seq
          input doc: int[n]
          let near = q - k < windw
          mask causl and near and dc[q] == doc[k] and abss(q) > 0
          bias -0.5 * (q - kk)
    """)
    # as a SpecError it is the first, as before
    assert (err.pos.line, err.pos.col, err.message, err.hint) == (4, 22, "unknown name 'windw'",
                                                                  "did you mean 'window'?")
    text = str(err)
    heads = [line for line in text.splitlines() if line.startswith(FILE)]
    assert heads == [f"{FILE}:4:22: error: unknown name 'windw'",
                     f"{FILE}:5:8: error: unknown name 'causl'",
                     f"{FILE}:5:27: error: 'dc' is not an input",
                     f"{FILE}:5:47: error: unknown function or pattern 'abss'",
                     f"{FILE}:6:20: error: unknown name 'kk'"]
    for hint in ("'window'", "'causal'", "'doc'", "'abs'", "'k'"):
        assert f"  hint: did you mean {hint}?" in text
    assert text.count("^") == 5


def test_one_unknown_name_and_other_errors_are_reported_as_before():
    err = spec_error("""
        pattern p(window = 4)
          tokens seq
          mask causal and q - k < windw
    """)
    assert str(err).count("error:") == 1
    err = spec_error("""
        pattern p(window = 4)
          tokens seq
          mask causal and q - k < 1.5 + true and windw
    """)  # the first error is no unknown name: only it
    assert str(err).count("error:") == 1 and "windw" not in err.message
