"""The parser (and what runs after it) never fails with anything but SpecError.

Arbitrary text, binary garbage decoded leniently, and mutations of valid
specs go through parse -> check -> load -> materialize_mask: each stage may
refuse with ``attnc.SpecError`` and nothing else. Absurd nesting and huge
constants are refused cleanly (and quickly: no timing assertion, the tests
simply stay small). Names that mean something to Python or to attnc's own
code are ordinary names in a spec. AST nodes carry the right positions, and
errors read ``FILE:LINE:COL: error: ...`` with the source line and a caret.
"""

from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

import pytest
import sympy
import torch
from fuzz_budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.core import ir
from attnc.spec import ast
from attnc.spec.library import lower
from attnc.spec.parser import MAX_SOURCE_CHARS, decode_source, normalize_source, parse

# ----------------------------------------------------------------- the pipeline under test
CORPUS = [
    """# Sliding window with attention sinks (StreamingLLM)
pattern sliding_window(window = 4096, sinks = 4)
  tokens seq
  mask causal and (q - k < window or k < sinks)
""",
    """pattern neighborhood_3d(kt = 3, ky = 7, kx = 7, st = 1, sy = 1, sx = 1)
  tokens grid(t: frames, y: height, x: width)
  mask window(t, kt, stride = st) and window(y, ky, stride = sy) and window(x, kx, stride = sx)
""",
    """pattern power(block = 256, local = 5)
  tokens seq
  let d = q // block - k // block
  mask causal and (d < local or is_pow2(d) or k < block)
""",
    """pattern alibi
  tokens seq
  mask causal
  bias -(2 ** (-8 * (h + 1) / heads)) * (q - k)
""",
    """pattern documents
  tokens seq
  input doc: int[n]
  mask causal and doc[q] == doc[k]
""",
    """pattern moba(block = 512, topk = 3)
  tokens seq
  mask causal
  route topk(topk) blocks(block) by q @ mean(k) keep q // block == k // block
""",
    """recurrence retention
  decay log(1 - 2 ** (-5 - h))

recurrence gla
  input g: float[heads, n, dk]
  decay g
""",
    """pattern biformer(topk = 2)
  tokens grid(y: height, x: width)
  route topk(topk) blocks(y: 2, x: 2) by mean(q) @ mean(k) shared
""",
    """pattern fox(cap = 30.0)
  tokens seq
  input g: float[heads, n]
  mask causal and q - k < 64
  softcap cap
  decay g
""",
    """pattern cross(r = 2)
  queries seq
  keys grid(y: 4, x: width)
  let near = abs(q % 4 - k.y) < r
  mask if q < 2 then true else near and k.x != 0x1 and not (k.y >= 3)
""",
    """pattern radialish(p = 16, shrink = 1.5)
  tokens grid(f: frames, s: per_frame)
  let d = abs(q.f - k.f)
  let g = bit_length(d)
  mask d <= 1 or abs(q.s - k.s) <= max(2 ** bit_length(p) / 2 ** g * shrink, 1) and d % max(1, 128 >> g) == 0
""",
    """pattern longnet(w = 8, r = 2)
  tokens seq
  let j = h // max(1, heads // r)
  mask q // w == k // w and (q % w) % r == j % r and (k % w) % r == j % r and causal
pattern both
  tokens seq
  mask longnet(w = 4) or sliding_window(window = 3, sinks = 1)
""",
]


def stdlib_sources() -> list[str]:
    folder = resources.files("attnc.stdlib_patterns")
    return [e.read_text(encoding="utf-8") for e in sorted(folder.iterdir(), key=lambda e: e.name)
            if e.name.endswith(".attn")]


ALL_SPECS = CORPUS + stdlib_sources()


def random_inputs(pat: ir.PatternIR, bound: E.Bound) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for decl in pat.inputs:
        dims = [int(sympy.sympify(d).subs(bound.subs)) for d in decl.dims]
        if decl.dtype == "int":
            out[decl.name] = torch.randint(1, 3, dims, generator=gen)
        else:
            out[decl.name] = -torch.rand(dims, generator=gen, dtype=torch.float64) - 0.1
    return out


def run_pipeline(text: str) -> str:
    """Parse, check, load and materialize everything in ``text``; returns how far it got.
    Any exception other than SpecError propagates (and fails the test)."""
    try:
        module = parse(text, "fuzz.attn")
    except attnc.SpecError as err:
        assert str(err).startswith("fuzz.attn:") or err.where is not None
        return "parse"
    stage = "parsed"
    for decl in module.declarations:
        try:
            lower(module, decl, {}, strict=False)
            pat = lower(module, decl, {}, strict=True)
        except attnc.SpecError:
            continue
        stage = "checked"
        if not isinstance(pat, ir.PatternIR):
            continue
        names = {str(s).removeprefix("size_") for lay in (pat.queries, pat.keys)
                 for _, e in lay.axes for s in e.free_symbols}
        try:
            n = 5 if pat.queries.kind == "seq" else None
            nk = 4 if pat.keys.kind == "seq" and not pat.self_attention else None
            bound = E.bind_sizes(pat, n=n, nk=nk, heads=2, sizes=dict.fromkeys(names, 3), dk=4)
            if bound.n * bound.nk > 10_000:
                continue
            mask = attnc.materialize_mask(pat, n=n, nk=nk, heads=2, sizes=dict.fromkeys(names, 3),
                                          inputs=random_inputs(pat, bound))
            assert mask.dtype == torch.bool and mask.shape[-2:] == (bound.n, bound.nk)
            stage = "materialized"
        except attnc.SpecError:
            continue
    return stage


def test_corpus_is_valid():
    """The seeds of the mutation test are valid, and most of them get all the way through."""
    stages = [run_pipeline(text) for text in ALL_SPECS]
    assert "parse" not in stages
    assert stages.count("materialized") >= len(CORPUS) - 2, stages


# ----------------------------------------------------------------- fuzzing
FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text())
def test_arbitrary_text(text):
    run_pipeline(text)


@FUZZ
@given(st.text(alphabet=string.printable + "→λ\u00a0\u2028\x00", min_size=0, max_size=200))
def test_arbitrary_printable_text(text):
    run_pipeline(text)


SPEC_ALPHABET = st.sampled_from(
    list("()[]{},.:=+-*/%<>!&|^~@#_ \n\t0123456789.eExqkh")
    + ["pattern ", "recurrence ", "tokens ", "seq", "grid(", "let ", "input ", "mask ", "bias ",
       "softcap ", "decay ", "route ", "topk(", "blocks(", " by ", "mean(", " keep ", " shared",
       " and ", " or ", "not ", "if ", " then ", " else ", "true", "false", "window(", "causal",
       "int[", "float[", "heads", "n", "**", "//", "<<", ">>", "<=", "==", "!=", "1e999", "0x"]
)


@FUZZ
@given(st.lists(SPEC_ALPHABET, max_size=60).map("".join))
def test_spec_like_token_soup(text):
    run_pipeline(text)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["replace", "surrogateescape", "ignore", "latin-1"]))
def test_binary_garbage(data, how):
    text = data.decode("latin-1") if how == "latin-1" else data.decode("utf-8", errors=how)
    run_pipeline(text)
    try:
        decoded = decode_source(data, "garbage.attn")
    except attnc.SpecError as err:
        assert err.message == "file is not UTF-8 text"
        assert str(err).startswith(f"garbage.attn:{err.pos.line}:{err.pos.col}: error: ")
        return
    assert decoded == normalize_source(data.decode("utf-8"))  # BOM dropped, line endings \n
    run_pipeline(decoded)


TOKEN_RE = re.compile(r"\s+|#[^\n]*|\*\*|//|<<|>>|<=|>=|==|!=|[A-Za-z_][A-Za-z_0-9]*|[0-9.]+(?:[eE][-+]?[0-9]+)?|.", re.S)
TOKENS = sorted({t for text in CORPUS for t in TOKEN_RE.findall(text) if t.strip()})


@st.composite
def mutated_specs(draw):
    text = draw(st.sampled_from(ALL_SPECS))
    tokens = TOKEN_RE.findall(text)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["delete", "insert", "swap", "duplicate", "replace",
                                     "char_delete", "char_insert", "char_replace"]))
        if not tokens:
            break
        i = draw(st.integers(0, len(tokens) - 1))
        if kind == "delete":
            del tokens[i]
        elif kind == "insert":
            tokens.insert(i, draw(st.sampled_from(TOKENS)) + draw(st.sampled_from(["", " "])))
        elif kind == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "replace":
            tokens[i] = draw(st.sampled_from(TOKENS))
        else:
            chars = list("".join(tokens))
            if not chars:
                break
            c = draw(st.integers(0, len(chars) - 1))
            new = draw(st.sampled_from(list(string.printable) + ["\x00", "é", "\u2028"]))
            if kind == "char_delete":
                del chars[c]
            elif kind == "char_insert":
                chars.insert(c, new)
            else:
                chars[c] = new
            tokens = TOKEN_RE.findall("".join(chars))
    return "".join(tokens)


@settings(max_examples=examples(500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutated_valid_specs(text):
    run_pipeline(text)


# ----------------------------------------------------------------- absurd nesting
def expect_clean(text: str, *, may_parse: bool = False) -> attnc.SpecError | None:
    try:
        module = parse(text, "deep.attn")
    except attnc.SpecError as err:
        assert str(err).startswith("deep.attn:")
        return err
    assert may_parse, "expected a SpecError"
    assert isinstance(module, ast.Module)
    run_pipeline(text)
    return None


HEAD = "pattern p\n  tokens seq\n  mask "


@pytest.mark.parametrize("depth", [100, 3000, 20000])
def test_deeply_nested_expressions_are_refused(depth):
    cases = {
        "binary in parentheses": HEAD + "(q + " * depth + "1" + ")" * depth + " > k",
        "unary minus": "pattern p\n  tokens seq\n  bias " + "-" * depth + "1",
        "unary minus spaced": "pattern p\n  tokens seq\n  bias " + "- " * depth + "q",
        "not": HEAD + "not " * depth + "causal",
        "bit not": HEAD + "~" * depth + "q > 0",
        "mixed unary": HEAD + "-+~" * (depth // 3) + "q > 0",
        "calls": HEAD + "abs(" * depth + "q" + ")" * depth + " > 0",
        "if": HEAD + "if causal then " * depth + "true" + " else false" * depth,
        "index": "pattern p\n  tokens seq\n  input d: int[n]\n  mask " + "d[" * depth + "q" + "]" * depth + " > 0",
        "power chain": HEAD + " ** ".join(["1"] * depth) + " > 0",
        "and chain": HEAD + " and ".join(["causal"] * depth),
        "sum chain": HEAD + " + ".join(["q"] * depth) + " > 0",
    }
    for name, text in cases.items():
        err = expect_clean(text)
        assert "nested too deeply" in err.message, (name, err.message)


@pytest.mark.parametrize("depth", [10, 5000])
def test_redundant_parentheses(depth):
    """Parentheses around one atom do not nest the tree: fine, and they mean the atom."""
    text = HEAD + "(" * depth + "q" + ")" * depth + " - k < 2"
    assert expect_clean(text, may_parse=True) is None
    mask = attnc.materialize_mask(text, n=5)[0]
    assert torch.equal(mask, attnc.materialize_mask(HEAD + "q - k < 2", n=5)[0])


def test_unbalanced_and_huge_inputs():
    for text in (HEAD + "(" * 10000, HEAD + "q" + ")" * 10000, HEAD + "[" * 5000, "(" * 100000,
                 HEAD + "q < " * 10000):
        err = expect_clean(text)
        assert "unexpected" in err.message
    err = expect_clean("#" * (MAX_SOURCE_CHARS + 1))
    assert err is not None and "spec too large" in str(err)


def test_long_comparison_chain():
    """A chain of comparisons is one flat node: it evaluates (or is refused cleanly)."""
    text = HEAD + " <= ".join(["k"] * 500) + " <= q"
    if expect_clean(text, may_parse=True) is None:
        mask = attnc.materialize_mask(text, n=4)[0]
        assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).tril())


# ----------------------------------------------------------------- huge constants
@pytest.mark.parametrize("expr", [
    "2 ** 10**9", "10 ** 10 ** 10", "2 ** 2 ** 2 ** 2 ** 2 ** 2", "99999999999 ** 9999999",
    "1 << 10**9", "q << 10**9", "q ** 10**9", "heads ** 1000", "2.0 ** 10000", "7 ** -1000",
    "(2 ** 62) * (2 ** 62)", "9223372036854775807 + 1", "-(2 ** 63) - 1", "10 ** 18 * 10",
    "1e999", "1" * 5000, "1" * 5000 + ".0", "0x" + "f" * 5000, "0b" + "1" * 5000,
    "exp(1e308)", "exp(exp(exp(10)))", "0 ** -1",
])
def test_huge_constants_error_quickly(expr):
    for text in (f"{HEAD}{expr} > q", f"pattern p\n  tokens seq\n  bias {expr}"):
        try:
            attnc.load(text)
        except attnc.SpecError as err:
            assert err.pos is not None and err.pos.line == 3, str(err)
            assert any(word in err.message for word in ("too large", "out of range", "overflow", "finite")), str(err)
        else:
            raise AssertionError(f"accepted {expr!r}")


def test_largest_constants_are_fine():
    text = HEAD + "9223372036854775807 - q >= 9223372036854775800 and -9223372036854775807 < q"
    m = attnc.materialize_mask(text, n=10)[0]
    assert m[:, 0].tolist() == [q <= 7 for q in range(10)]
    m = attnc.materialize_mask(HEAD + "2 ** 62 + q > 2 ** 62 + 2 ** 61 - 1 - 2 ** 61 + k", n=4)[0]
    assert torch.equal(m, torch.ones(4, 4, dtype=torch.bool).tril())


# ----------------------------------------------------------------- names that are nothing special
SPECIAL = ["tl", "torch", "exec", "__import__", "keep", "shared", "seq", "grid", "eval", "os",
           "by", "topk", "blocks", "mean", "self", "None", "lambda", "import", "triton", "sympy",
           "Symbol", "print", "int", "float", "exp"]


def test_special_names_as_params():
    values = {name: i + 2 for i, name in enumerate(SPECIAL)}
    params = ", ".join(f"{name} = 1" for name in SPECIAL)
    total = " + ".join(SPECIAL)
    src = f"pattern p({params})\n  tokens seq\n  mask q - k < ({total}) % 7\n"
    expect = sum(values.values()) % 7
    m = attnc.materialize_mask(src, n=9, **values)[0]
    assert torch.equal(m, torch.tensor([[q - k < expect for k in range(9)] for q in range(9)]))
    # and with the defaults
    m = attnc.materialize_mask(src, n=9)[0]
    assert torch.equal(m, torch.tensor([[q - k < len(SPECIAL) % 7 for k in range(9)] for q in range(9)]))


def test_special_names_as_lets_inputs_and_axes():
    lets = "\n".join(f"  let {name} = {i} * q - k" for i, name in enumerate(SPECIAL))
    src = (f"pattern p\n  tokens seq\n{lets}\n  input eval_: int[n]\n"
           f"  mask ({' + '.join(SPECIAL)}) % 5 == eval_[q] % 5\n")
    n = 6
    doc = torch.tensor([3, 8, 1, 4, 6, 2])
    m = attnc.materialize_mask(src.replace("eval_", "exec_"), n=n, inputs={"exec_": doc})[0]
    want = [[sum(i * q - k for i in range(len(SPECIAL))) % 5 == int(doc[q]) % 5 for k in range(n)]
            for q in range(n)]
    assert torch.equal(m, torch.tensor(want))
    src = "pattern p\n  tokens grid(seq: grid, grid: seq)\n  mask q.seq == k.grid\n"
    m = attnc.materialize_mask(src, sizes={"grid": 2, "seq": 3})[0]
    coords = [(a, b) for a in range(2) for b in range(3)]
    assert torch.equal(m, torch.tensor([[qa == kb for _, kb in coords] for qa, _ in coords]))


def test_route_keywords_as_names():
    src = """pattern p(keep = 1, shared = 4, topk = 2, blocks = 3)
      tokens seq
      mask causal
      route topk(keep) blocks(shared) by q @ mean(k) keep q // shared == k // shared + topk - blocks + 1 shared
    """
    pat = attnc.load(src)
    assert pat.route.params.topk == 1 and tuple(pat.route.block) == (4,) and pat.route.params.shared
    assert pat.route.keep is not None


# ----------------------------------------------------------------- positions
POS_SRC = """# header comment
pattern demo(w = 4, r = 0.5)
  tokens grid(y: height, x: 8)
  let d = q.y - k.y
  input doc: int[n]
  mask window(x, 3, stride = 2) and abs(d) <= w
\tbias -r * (q - k)
"""


def test_positions_on_ast_nodes():
    module = parse(POS_SRC, "pos.attn")
    (decl,) = module.declarations
    at = lambda p: (p.line, p.col)  # noqa: E731
    assert at(decl.pos) == (2, 1) and at(decl.name_pos) == (2, 9)
    assert [at(p.pos) for p in decl.params] == [(2, 14), (2, 21)]
    layout, let, inp, mask, bias = decl.clauses
    assert at(layout.pos) == (3, 3)
    ya, xa = layout.layout.axes
    assert (at(ya.pos), at(ya.size_pos), at(xa.pos), at(xa.size_pos)) == ((3, 15), (3, 18), (3, 26), (3, 29))
    assert (at(let.pos), at(let.name_pos)) == ((4, 3), (4, 7))
    assert isinstance(let.value, ast.Binary) and at(let.value.pos) == (4, 11)
    assert at(let.value.left.axis_pos) == (4, 13) and at(let.value.right.pos) == (4, 17)
    assert (at(inp.pos), at(inp.name_pos), at(inp.dtype_pos), at(inp.dims[0].pos)) == ((5, 3), (5, 9), (5, 14), (5, 18))
    assert at(mask.pos) == (6, 3)
    call, cmp = mask.value.left, mask.value.right
    assert at(call.func_pos) == (6, 8) and call.func_pos.end_col == 14
    assert [at(a.pos) for a in call.args] == [(6, 15), (6, 18)]
    assert at(call.kwargs[0].pos) == (6, 21) and at(call.kwargs[0].value.pos) == (6, 30)
    assert isinstance(cmp, ast.Compare) and at(cmp.pos) == (6, 37)
    assert at(cmp.operands[0].args[0].pos) == (6, 41) and at(cmp.operands[1].pos) == (6, 47)
    assert at(bias.pos) == (7, 2)  # after a tab: columns count characters
    assert isinstance(bias.value, ast.Binary) and isinstance(bias.value.left, ast.Unary)
    assert at(bias.value.left.pos) == (7, 7) and at(bias.value.left.operand.pos) == (7, 8)
    assert at(bias.value.right.left.pos) == (7, 13) and at(bias.value.right.right.pos) == (7, 17)


def test_positions_survive_into_checker_errors():
    src = POS_SRC.replace("abs(d) <= w", "abs(dd) <= w")
    with pytest.raises(attnc.SpecError) as info:
        lower(parse(src, "pos.attn"), parse(src, "pos.attn").declarations[0], {})
    assert (info.value.pos.line, info.value.pos.col) == (6, 41)


# ----------------------------------------------------------------- error message format
def caret_column(rendered: str) -> int:
    line = rendered.splitlines()[2]
    assert line.startswith("    ")
    return line.index("^") - 4 + 1


def test_error_format_and_caret():
    src = "pattern p\n  tokens seq\n  mask (q - k) < < 3\n"
    with pytest.raises(attnc.SpecError) as info:
        parse(src, "dir/file.attn")
    text = str(info.value)
    lines = text.splitlines()
    assert re.match(r"^dir/file\.attn:3:18: error: unexpected '<'", lines[0])
    assert lines[1] == "    " + "  mask (q - k) < < 3"
    assert caret_column(text) == 18 and lines[1][4 + 18 - 1] == "<"
    assert "Traceback" not in text


def test_error_caret_with_tabs_and_unprintables():
    src = "pattern p\n\ttokens seq\n\tmask\tq <\t$\n"
    with pytest.raises(attnc.SpecError) as info:
        parse(src, "t.attn")
    err = info.value
    assert (err.pos.line, err.pos.col) == (3, 11) and "'$'" in err.message
    lines = str(err).splitlines()
    assert lines[1][4 + 11 - 1] == "$" and caret_column(str(err)) == 11
    # an unprintable character is shown as '?', with the caret still under it
    src = "pattern p\n\ttokens seq\n\tmask q\x1b\x0b < k\n"
    with pytest.raises(attnc.SpecError) as info:
        parse(src, "t.attn")
    err = info.value
    assert (err.pos.line, err.pos.col) == (3, 8) and "unexpected character" in err.message
    lines = str(err).splitlines()
    assert lines[1] == "     mask q?? < k" and caret_column(str(err)) == 8
    assert all(c.isprintable() for c in str(err).replace("\n", ""))


def test_error_shows_the_line_the_lexer_counts():
    """Form feeds, vertical tabs and CRLF do not shift the shown source line; a lone CR ends a line."""
    for sep in ("\x0c", "\r", "\u2028 ", "\x1c "):
        src = f"pattern p\n  tokens{sep} seq\n  mask q < < k\n"
        with pytest.raises(attnc.SpecError) as info:
            parse(src, "ff.attn")
        lines = str(info.value).splitlines()
        if sep in ("\x0c", "\r"):  # whitespace to the lexer: the error is the second '<'
            line = 4 if sep == "\r" else 3
            assert lines[0].startswith(f"ff.attn:{line}:12: ") and lines[1] == "      mask q < < k"
        else:  # not whitespace: the error is that character, on line 2
            assert lines[0].startswith("ff.attn:2:9: ") and "tokens?" in str(info.value)
    src = "pattern p\r\n  tokens seq\r\n  mask q < < k\r\n"
    with pytest.raises(attnc.SpecError) as info:
        parse(src, "crlf.attn")
    assert str(info.value).splitlines()[1:3] == ["      mask q < < k", "               ^"]


def test_error_caret_on_a_very_long_line():
    src = "pattern p\n  tokens seq\n  mask " + "q + " * 10 + "k " * 300 + "< 1\n"
    with pytest.raises(attnc.SpecError) as info:
        parse(src, "long.attn")
    err = info.value
    lines = str(err).splitlines()
    assert lines[0].startswith(f"long.attn:3:{err.pos.col}: error: unexpected 'k'")
    shown, caret = lines[1][4:], caret_column(str(err))
    assert len(shown) <= 200 and shown[caret - 1] == "k"


def test_error_at_end_of_file_and_on_empty_input():
    for src in ("pattern", "pattern p(", "pattern p\n  tokens grid(\n"):
        with pytest.raises(attnc.SpecError) as info:
            parse(src, "eof.attn")
        assert "unexpected end of file" in info.value.message
        assert str(info.value).startswith("eof.attn:")
    assert parse("", "empty.attn").declarations == []
    assert parse("# only a comment\n", "c.attn").declarations == []


def test_non_utf8_bytes_are_located():
    data = b"pattern p\n  tokens seq\n  mask q \xff< k\n"
    with pytest.raises(attnc.SpecError) as info:
        decode_source(data, "latin.attn")
    assert str(info.value).startswith("latin.attn:3:10: error: file is not UTF-8 text")


# ----------------------------------------------------------------- issue 9: paths are never spec text
@pytest.mark.parametrize("rel", ["patterns/win.attn", "patterns.attn", "recurrences/r.attn", "#odd.attn"])
def test_relative_paths_that_look_like_spec_text_are_paths(tmp_path, monkeypatch, rel):
    import attnc

    monkeypatch.chdir(tmp_path)
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("pattern win\n  tokens seq\n  mask causal and q - k < 2\n")
    assert attnc.load(rel).name == "win"
    assert attnc.load(Path(rel)).name == "win"
    path.unlink()
    with pytest.raises(attnc.SpecError) as info:
        attnc.load(rel)
    assert info.value.message == f"no such file: {rel}"


def test_an_existing_file_without_attn_suffix_is_a_path(tmp_path, monkeypatch):
    import attnc

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pattern_file").write_text("pattern p\n  mask q >= k\n")
    assert attnc.load("pattern_file").name == "p"
    assert attnc.load("pattern p mask q >= k").name == "p"  # still spec text


def test_leading_zeros_are_decimal():
    import attnc

    assert attnc.load("pattern p mask q - k < 000005").mask == attnc.load("pattern p mask q - k < 5").mask
    long_zeros = "0" * 60 + "7"
    assert attnc.load(f"pattern p(w = {long_zeros}) mask q - k < w").mask == attnc.load("pattern p mask q - k < 7").mask


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_line_endings_and_bom(tmp_path, newline):
    import attnc

    text = newline.join(["# comment", "pattern p", "  tokens seq", "  mask q < < k", ""])
    path = tmp_path / "e.attn"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    with pytest.raises(attnc.SpecError) as info:
        attnc.load(path)
    assert (info.value.pos.line, info.value.pos.col) == (4, 12)
    assert "    mask q < < k" in str(info.value)
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("< <", "<").encode())
    assert attnc.load(path).name == "p"
    assert attnc.load("\ufeff" + text.replace("< <", "<")).name == "p"


@pytest.mark.parametrize("text,kind,near", [
    ("recurrence r\n  input g: float[heads, n]\n  decy g\n", "recurrence", "decay"),
    ("pattern p\n  tokens seq\n  mask causal\n  bais 1.0\n", "pattern", "bias"),
    ("pattern p\n  tokens seq\n  mask causal\nrecurrence r\n  decay -1.0\n  mask2 causal\n", "recurrence", "mask"),
])
def test_an_unknown_clause_lists_the_clauses_of_its_declaration_kind(text, kind, near):
    with pytest.raises(attnc.SpecError) as err:
        parse(text, "x.attn")
    assert f"expected a {kind} clause: " in err.value.message
    if kind == "recurrence":
        assert "decay, update, let, input, tokens;" in err.value.message and "route" not in err.value.message
    if near != "mask":
        assert err.value.hint == f"did you mean '{near}'?"


# ----------------------------------------------------------------- parameter bounds, misspelt keywords
def test_a_parameter_takes_a_bound_before_its_default():
    text = "pattern p(a >= 1 = 4, b, c < 2.5, d = 3, e > -1)\n  tokens seq\n  mask causal\n"
    decl = parse(text).declarations[0]
    assert [(p.name, p.bound, p.default) for p in decl.params] == [
        ("a", (">=", 1), 4), ("b", None, None), ("c", ("<", 2.5), None), ("d", None, 3),
        ("e", (">", -1), None)]
    assert (decl.params[0].bound_pos.line, decl.params[0].bound_pos.col) == (1, 13)
    for bad, fragment in (("a == 1", "a parameter's bound is '>=', '>', '<=' or '<', got '=='"),
                          ("a >= true", "a parameter's bound must be a number"),
                          ("a >= = 3", "unexpected '='")):
        with pytest.raises(attnc.SpecError, match=fragment):
            parse(f"pattern p({bad})\n  tokens seq\n  mask causal\n")


@pytest.mark.parametrize("expr, word, near", [
    ("q >= k adn q - k < 4", "adn", "and"),
    ("(q >= k adn q - k < 4)", "adn", "and"),
    ("q > k an k > 1", "an", "and"),
    ("q > k oor k > 1", "oor", "or"),
    ("if q > k thn true else false", "thn", "then"),
])
def test_a_misspelt_keyword_after_an_expression_is_suggested(expr, word, near):
    with pytest.raises(attnc.SpecError) as err:
        parse(f"pattern p\n  tokens seq\n  mask {expr}\n", "x.attn")
    assert err.value.message.startswith(f"unexpected '{word}'")
    assert err.value.hint == f"did you mean '{near}'?"


@pytest.mark.parametrize("text, word, near, col", [
    ("  mask q >= k andd q - k < 4", "andd", "and", 15),
    ("  mask q > k ore k > 1", "ore", "or", 14),
    ("  mask q > k and1", "and1", "and", 14),
    ("  mask causal\n  route topk(2) blocks(4) byq @ mean(k)", "byq", "by", 27),
    ("  mask causal\n  bias if q > k thenx else 0.0", "thenx", "then", 17),
])
def test_a_keyword_run_into_the_next_word_is_one_unknown_word(text, word, near, col):
    """``andd`` after an expression was read as ``and d`` (the lexer takes a keyword where no name may
    come): a whole word is refused as the user wrote it."""
    tokens = "  tokens seq\n" if "tokens" not in text else ""
    with pytest.raises(attnc.SpecError) as err:
        parse(f"pattern p\n{tokens}{text}\n", "x.attn")
    assert err.value.message == f"unexpected '{word}'"
    assert err.value.pos.col == col
    assert err.value.hint.startswith(f"did you mean '{near}'?")


def test_a_layout_keyword_run_into_a_name():
    with pytest.raises(attnc.SpecError) as err:
        parse("pattern p\n  tokens seqq\n  mask causal\n", "x.attn")
    assert err.value.message == "unexpected 'seqq'" and (err.value.pos.line, err.value.pos.col) == (2, 10)
    assert err.value.hint.startswith("did you mean 'seq'?")


@pytest.mark.parametrize("mask, at, hint", [
    ("causal && q - k < 8", (3, 16), "'&&' is written 'and'"),
    ("causal || q - k < 8", (3, 16), "'||' is written 'or'"),
    ("!(q == k)", (3, 8), "negation is written 'not'"),
    ("causal\n  bias 1.0 if q > k else 0.0", (4, 12), "if C then A else B"),
    ("floor(q / 2) == k", (3, 8), "floor(a / b) is a // b"),
    ("flor(q / 2) == k", (3, 8), "functions: abs, "),
    ("int(q / 2) == k", (3, 8), "there is no float-to-int conversion"),
    ("pow(2, k) > q", (3, 8), "2 ** x for x an int"),
])
def test_operators_and_functions_of_other_languages_are_told_how_the_language_spells_them(mask, at, hint):
    """A researcher's first mistakes: C's '&&', '||' and '!', Python's conditional and floor(): one located error
    whose hint says how the language writes it (the message alone said 'unexpected' or 'unknown')."""
    text = f"pattern p\n  tokens seq\n  mask {mask}\n"
    with pytest.raises(attnc.SpecError) as err:
        attnc.load(text)
    assert (err.value.pos.line, err.value.pos.col) == at
    assert err.value.hint is not None and hint in err.value.hint, err.value.hint


def test_a_float_index_is_told_of_floor_division():
    text = "pattern p\n  input t: float[heads, n]\n  tokens seq\n  mask causal\n  bias t[h, (q - k) / 2]\n"
    with pytest.raises(attnc.SpecError, match="an index must be an int, got a float") as err:
        attnc.load(text)
    assert "'//' divides ints" in err.value.hint
