"""Text -> syntax tree (``spec.ast``), with every failure a located ``SpecError``."""

from __future__ import annotations

import math
import os
import re
import stat
from functools import lru_cache
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args

from ..core.errors import Pos, SpecError, did_you_mean
from . import ast

#: Words that start a declaration or clause, or are expression syntax; never names.
RESERVED = frozenset(
    "pattern recurrence tokens queries keys let input mask bias softcap decay weights route "
    "and or not in if then else true false".split()
)

#: Reserved words that may still name a declaration (they never start an expression).
_CLAUSE_WORDS = frozenset("tokens queries keys let input mask bias softcap decay weights route".split())

#: The comparisons that bound a parameter (``window >= 1``).
BOUND_OPS = (">=", ">", "<=", "<")

#: Nesting deeper than this is refused: real patterns stay far below it, and
#: every later pass (checker, sympy) recurses over the tree.
MAX_DEPTH = 64

#: Source texts longer than this are refused before parsing.
MAX_SOURCE_CHARS = 1_000_000

_TOKEN_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "INT": "an integer",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "COLON": "':'",
    "EQUAL": "'='",
    "DOT": "'.'",
    "$END": "the end of the file",
    "AT": "'@'",
    "MINUS": "'-'",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*', '/', '//' or '%'",
    "UNARY_OP": "'~'",
    "POW": "'**'",
    "COMP_OP": "a comparison",
    "SHIFT_OP": "'<<' or '>>'",
    "BOR": "'|'",
    "BXOR": "'^'",
    "BAND": "'&'",
    "DECL_KW": "'pattern' or 'recurrence'",
    "IN": "'in'",
    "LAYOUT_KW": "'tokens', 'queries' or 'keys'",
    "EXPR_KW": "a clause",
}


def _pos(tok_or_meta) -> Pos:
    return Pos(tok_or_meta.line, tok_or_meta.column, tok_or_meta.end_line, tok_or_meta.end_column)


def _depth(node) -> int:
    return getattr(node, "_depth", 1)


def _with_depth(node, *children):
    depth = 1 + max((_depth(c) for c in children), default=0)
    if depth > MAX_DEPTH:
        raise SpecError(f"expression nested too deeply (more than {MAX_DEPTH} levels)", node.pos)
    object.__setattr__(node, "_depth", depth)
    return node


def _check_name(tok: Token) -> str:
    if str(tok) in RESERVED:
        raise SpecError(f"'{tok}' is a reserved word and cannot be used as a name", _pos(tok))
    return str(tok)


def _parse_int(tok: Token) -> int:
    text = str(tok).lower()
    if not text.startswith(("0x", "0b")):
        text = text.lstrip("0") or "0"  # leading zeros: decimal, 007 == 7 (documented)
    if len(text) > 40:
        raise SpecError("integer literal too large (it must fit in 64 bits)", _pos(tok))
    value = int(text, 0) if text.startswith(("0x", "0b")) else int(text)
    if value >= 2**63:
        raise SpecError("integer literal too large (it must fit in 64 bits)", _pos(tok))
    return value


def _parse_number(tok: Token) -> int | float:
    text = str(tok)
    if any(c in text for c in ".eE") and not text.lower().startswith("0x"):
        value = float(text)
        if not math.isfinite(value):
            raise SpecError("float literal out of range", _pos(tok))
        return value
    return _parse_int(tok)


@v_args(inline=True)
class _Builder(Transformer):
    """Builds ``spec.ast`` nodes while the LALR parser reduces (no recursion)."""

    # ------------------------------------------------------------ expressions
    def number(self, tok):
        return ast.Num(_pos(tok), _parse_number(tok))

    def true(self, tok):
        return ast.BoolLit(_pos(tok), True)

    def false(self, tok):
        return ast.BoolLit(_pos(tok), False)

    def name(self, tok):
        return ast.Name(_pos(tok), _check_name(tok))

    def binary(self, left, op, right):
        node = ast.Binary(left.pos, str(op), left, right)
        return _with_depth(node, left, right)

    def unary(self, op, operand):
        return _with_depth(ast.Unary(_pos(op), str(op), operand), operand)

    def compare(self, *items):
        operands = items[0::2]
        ops = tuple(str(t) for t in items[1::2])
        return _with_depth(ast.Compare(operands[0].pos, tuple(operands), ops), *operands)

    def if_expr(self, kw, cond, then, orelse):
        return _with_depth(ast.IfExpr(_pos(kw), cond, then, orelse), cond, then, orelse)

    def call(self, func, *args):
        positional, keywords = [], []
        for a in args:
            if a is None:
                continue
            if isinstance(a, ast.Keyword):
                if any(k.name == a.name for k in keywords):
                    raise SpecError(f"keyword argument '{a.name}' given twice", a.pos)
                keywords.append(a)
            else:
                if keywords:
                    raise SpecError("positional argument after a keyword argument", a.pos)
                positional.append(a)
        node = ast.Call(_pos(func), _check_name(func), tuple(positional), tuple(keywords), _pos(func))
        return _with_depth(node, *positional, *(k.value for k in keywords))

    def kwarg(self, name, value):
        return ast.Keyword(_check_name(name), value, _pos(name))

    def index(self, name, *indices):
        node = ast.Index(_pos(name), _check_name(name), tuple(indices))
        return _with_depth(node, *indices)

    def attr(self, base, axis):
        return ast.Attr(_pos(base), str(base), str(axis), _pos(axis))

    def membership(self, operand, _kw, segment):
        node = ast.Membership(operand.pos, operand, _check_name(segment), _pos(segment))
        return _with_depth(node, operand)

    # ------------------------------------------------------------ clauses
    def lit_number(self, tok):
        return _parse_number(tok)

    def lit_negative(self, tok):
        return -_parse_number(tok)

    def lit_true(self, _tok):
        return True

    def lit_false(self, _tok):
        return False

    def param_heads(self, name):
        if str(name) != "heads":
            raise SpecError(f"a parameter is one value, or one per head: '[heads]', not '[{name}]'", _pos(name),
                            hint="alpha[heads] = 0")
        return True

    def param(self, name, per_head=None, op=None, bound=None, default=None):
        per_head = bool(per_head)
        if op is None:
            return ast.Param(_check_name(name), default, _pos(name), per_head=per_head)
        if str(op) not in BOUND_OPS:
            raise SpecError(f"a parameter's bound is '>=', '>', '<=' or '<', got '{op}'", _pos(op),
                            hint=f"{name} >= 1")
        if isinstance(bound, bool):
            raise SpecError("a parameter's bound must be a number", _pos(op))
        return ast.Param(_check_name(name), default, _pos(name), (str(op), bound), _pos(op), per_head=per_head)

    def params(self, *items):
        return tuple(p for p in items if p is not None)

    def seq_plain(self, kw):
        return ast.Segment("seq", None, (), _pos(kw))

    def seq_sized(self, kw, size):
        value: str | int = _parse_int(size) if size.type == "INT" else _check_name(size)
        return ast.Segment("seq", value, (), _pos(kw), _pos(size))

    def axis_decl(self, name, size):
        size_value: str | int = _parse_int(size) if size.type == "INT" else _check_name(size)
        return ast.AxisDecl(_check_name(name), size_value, _pos(name), _pos(size))

    def grid_segment(self, kw, *axes):
        return ast.Segment("grid", None, tuple(axes), _pos(kw))

    def layout(self, *items):
        segments, ops = items[0::2], items[1::2]
        for op in ops:
            if str(op) != "+":
                raise SpecError("segments of a layout are joined with '+'", _pos(op),
                                hint="tokens seq(text) + grid(t: frames, y: height, x: width)")
        if len(segments) == 1:
            only = segments[0]
            if only.size is not None:
                raise SpecError("a sized 'seq(...)' is a segment of a concatenation; a flat sequence is "
                                "'tokens seq'", only.pos, hint="tokens seq(text) + grid(t: frames, y: height, x: width)")
            return only.kind, only.axes, ()
        for seg in segments:
            if seg.kind == "seq" and seg.size is None:
                raise SpecError("a 'seq' segment of a concatenation needs its size: seq(NAME) or seq(INT)", seg.pos)
        return "concat", (), tuple(segments)

    def layout_clause(self, kw, layout):
        kind, axes, segments = layout
        return ast.LayoutClause(_pos(kw), str(kw), ast.Layout(kind, axes, _pos(kw), segments))

    def let_clause(self, kw, name, value):
        return ast.Let(_pos(kw), _check_name(name), value, _pos(name))

    def dim(self, tok):
        value: str | int = _parse_int(tok) if tok.type == "INT" else _check_name(tok)
        return ast.Dim(value, _pos(tok))

    def input_clause(self, kw, name, dtype, *dims):
        return ast.Input(_pos(kw), _check_name(name), str(dtype), tuple(dims), _pos(name), _pos(dtype))

    def expr_clause(self, kw, value):
        return ast.ExprClause(_pos(kw), str(kw), value)

    def update_clause(self, kw, rule, *args):
        positional = tuple(a for a in args if not isinstance(a, ast.Keyword))
        options = tuple(a for a in args if isinstance(a, ast.Keyword))
        if not positional or args[:len(positional)] != positional:
            at = positional[-1].pos if positional else _pos(rule)
            raise SpecError(f"'{rule}' takes its rate inputs first, then options as keywords", at,
                            hint="update delta(beta), update delta(beta, qk_l2norm = true) or update titans(theta, eta)")
        return ast.Update(_pos(kw), str(rule), _pos(rule), positional, options)

    def flat_blocks(self, size):
        return (ast.BlockAxis(None, size, size.pos),)

    def block_axis(self, name, size):
        return ast.BlockAxis(str(name), size, _pos(name))

    def grid_blocks(self, *axes):
        return tuple(axes)

    def score_plain(self, name):
        return ast.ScoreSide(None, str(name), _pos(name))

    def score_call(self, func, arg):
        return ast.ScoreSide(str(func), str(arg), _pos(func))

    def score_call3(self, func, *names):
        if str(func) != "indexer":
            raise SpecError(f"'{func}(...)' with three arguments is not a routing score", _pos(func),
                            hint="route topk(K) tokens by indexer(QI, KI, W)")
        return ast.IndexerScore(str(func), tuple(str(n) for n in names), _pos(func))

    def keep_part(self, expr):
        return expr

    def unit_blocks(self, blocks):
        return blocks

    def unit_tokens(self, word):
        if str(word) != "tokens":
            raise SpecError(f"a route selects 'blocks(SIZE)' or 'tokens', got '{word}'", _pos(word),
                            hint="route topk(K) tokens by q @ k")
        return word

    def route_clause(self, kw, topk, unit, left, right, keep=None, shared=None):
        if isinstance(keep, Token):  # `shared` without `keep`
            keep, shared = None, keep
        for side in (left, right):
            if isinstance(side, ast.IndexerScore):
                raise SpecError("indexer(QI, KI, W) is a whole score, not a side of '@'", side.pos,
                                hint="route topk(K) tokens by indexer(QI, KI, W)")
        if isinstance(unit, Token):  # `tokens`: every key is its own unit
            return ast.Route(_pos(kw), topk, (), left, right, keep, shared is not None, "tokens", _pos(unit))
        return ast.Route(_pos(kw), topk, unit, left, right, keep, shared is not None)

    def antidiagonal_score(self, stride):
        return ("antidiagonal", stride)

    def minmax_score(self, left, right, group):
        for side in (left, right):
            if isinstance(side, ast.IndexerScore):
                raise SpecError("indexer(QI, KI, W) scores single keys, not blocks", side.pos,
                                hint="route topk(K) tokens by indexer(QI, KI, W)")
        return ("minmax", ast.MinMaxScore(left, right, str(group), _pos(group)))

    def topp_clause(self, kw, p, blocks, score, keep=None):
        form, arg = score
        if form == "antidiagonal":
            return ast.RouteTopP(_pos(kw), p, blocks, arg, keep)
        return ast.RouteTopP(_pos(kw), p, blocks, None, keep, arg)

    def stripes_route_clause(self, kw, theta, block, group, keep=None):
        return ast.StripesRoute(_pos(kw), theta, block, group, keep)

    def kind_route_clause(self, kw, word, *rest):
        # ARGS, then the unit (`blocks(...)`: a tuple of axes; `tokens`: the word), then `keep`'s expression if any
        at = max(i for i, x in enumerate(rest) if isinstance(x, Token | tuple))
        unit, keep = rest[at], rest[at + 1] if at + 1 < len(rest) else None
        blocks = () if isinstance(unit, Token) else unit
        return ast.KindRoute(_pos(kw), str(word), _pos(word), tuple(rest[:at]), blocks, keep)

    def bucket_route_clause(self, kw, window, centroids):
        return ast.BucketRoute(_pos(kw), window, str(centroids), _pos(centroids))

    def vs_keep_columns(self, expr):
        return expr

    def vs_keep_diagonals(self, expr):
        return expr

    def vs_keep_both(self, columns, diagonals=None):
        return (columns, diagonals)

    def vs_keep_diagonals_only(self, diagonals):
        return (None, diagonals)

    def vs_route_clause(self, kw, vertical, _and, slash, last, keep=None):
        columns, diagonals = keep if keep is not None else (None, None)
        return ast.VerticalSlashRoute(_pos(kw), vertical, slash, last, columns, diagonals)
    # ------------------------------------------------------------ combined patterns (spec/check_branches.py)
    def branch_clause(self, kw, name):
        return ast.Branch(_pos(kw), _check_name(name), _pos(name))

    def combine_clause(self, kw, value):
        return ast.Combine(_pos(kw), value)

    def pooled_clause(self, kw, _pooled, func, size):
        value: str | int = _parse_int(size) if size.type == "INT" else _check_name(size)
        return ast.PooledKeys(_pos(kw), str(kw), str(func), _pos(func), value, _pos(size))

    def branch_route_clause(self, kw, topk, unit, score, keep=None, shared=None):
        if isinstance(keep, Token):  # `shared` without `keep`
            keep, shared = None, keep
        if isinstance(score, ast.IndexerScore):  # a token route scored by DeepSeek's indexer (not a branch's)
            if not isinstance(unit, Token):
                raise SpecError("indexer(QI, KI, W) scores single keys", score.pos,
                                hint="route topk(K) tokens by indexer(QI, KI, W)")
            return ast.Route(_pos(kw), topk, (), None, None, keep, shared is not None, "tokens", _pos(unit),
                             indexer=score)
        if isinstance(unit, Token) and score.func is None:  # `tokens by NAME`: a per-key score given as an input
            return ast.Route(_pos(kw), topk, (), None, None, keep, shared is not None, "tokens", _pos(unit),
                             indexer=ast.IndexerScore("key", (score.arg,), score.pos))
        if isinstance(unit, Token):
            return ast.BranchRoute(_pos(kw), topk, (), score, keep, shared is not None, "tokens", _pos(unit))
        if score.func is None:  # `blocks(B) by NAME`: block scores given at call time (SeerAttention's gate)
            return ast.Route(_pos(kw), topk, unit, None, None, keep, shared is not None,
                             indexer=ast.IndexerScore("blocks", (score.arg,), score.pos))
        return ast.BranchRoute(_pos(kw), topk, unit, score, keep, shared is not None)

    def declaration(self, kw, name, *rest):
        params: tuple = ()
        clauses = list(rest)
        if clauses and isinstance(clauses[0], tuple):
            params = clauses.pop(0)
        # A declaration may take a clause keyword as its name (`pattern softcap`):
        # it is loaded as stdlib:softcap, though a mask cannot call it by name.
        decl_name = str(name) if str(name) in _CLAUSE_WORDS else _check_name(name)
        return ast.Declaration(str(kw), decl_name, params, tuple(clauses), _pos(kw), _pos(name))

    def start(self, *decls):
        return list(decls)


class _WholeWords(lark.lark.PostLex):
    """A keyword must be a whole word. Where the grammar expects a keyword but no name (after an
    expression: 'and', 'or', ...), the lexer takes the keyword's letters and leaves the rest as the
    next token: ``andd`` read as ``and d``, ``iff`` as ``if f``. Such a keyword glued to a name or
    number is refused here, as the one word it is."""

    always_accept = ()

    def process(self, stream):
        prev = None
        for tok in stream:
            if _is_glued(prev, tok):
                raise _Glued(prev, tok)  # (``parse`` makes the error: it has the source)
            prev = tok
            yield tok


class _Glued(Exception):
    def __init__(self, keyword: Token, rest: Token) -> None:
        super().__init__(str(keyword) + str(rest))
        self.keyword, self.rest = keyword, rest


def _is_glued(prev: Token | None, tok: Token) -> bool:
    """Whether ``prev`` is a keyword run into the name or number ``tok`` after it (``andd``)."""
    return not (prev is None or prev.type == "NAME" or prev.end_pos != tok.start_pos
                or not _WORD.fullmatch(prev) or not _WORD_CHAR.match(tok))


#: Keywords that only start a clause (or a declaration): glued to more letters, the word is where
#: a clause should start.
_CLAUSE_TOKENS = frozenset({"EXPR_KW", "LET", "INPUT", "ROUTE", "UPDATE", "BRANCH", "COMBINE",
                            "DECL_KW"})


def _glued_error(keyword: Token, rest: Token, source: str) -> SpecError:
    """``andd`` is one unknown word, not ``and`` then ``d``: where a clause should start, told as
    ``_clause_error`` tells an unknown word there."""
    word = str(keyword) + str(rest)
    shown = word if len(word) <= 30 else word[:27] + "..."
    pos = Pos(keyword.line, keyword.column, rest.end_line, rest.end_column)
    hint = f"did you mean '{keyword}'? (or '{keyword} {rest}', with a space)"
    if keyword.type not in _CLAUSE_TOKENS:
        return SpecError(f"unexpected '{shown}'", pos, hint=hint)
    kind = _declaration_kind(source, keyword.start_pos)
    hint = _keyword_hint(word, (), CLAUSES[kind])
    return SpecError(f"unexpected '{shown}' " + _clause_list(kind), pos, hint=hint)


_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_WORD_CHAR = re.compile(r"[A-Za-z_0-9]")


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("attnc.spec").joinpath("grammar.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        transformer=_Builder(),
        postlex=_WholeWords(),
    )


@lru_cache(maxsize=1)
def _keyword_terminals() -> dict[str, str]:
    """Terminal name -> its word, for the grammar's one-word keywords (``AND`` -> ``and``)."""
    return {t.name: t.pattern.value for t in _parser().terminals
            if isinstance(t.pattern, lark.lexer.PatternStr) and _WORD.fullmatch(t.pattern.value)}


def _keyword_hint(word: str, expected, extra: tuple[str, ...] = ()) -> str | None:
    """'did you mean ...?' for a misspelt keyword among those the parser expected here (``adn``
    after an expression: 'and'), or among ``extra`` (the clause keywords)."""
    return did_you_mean(word, {_keyword_terminals().get(e) for e in expected} - {None} | set(extra))


def _describe_expected(expected) -> str:
    names = sorted({_TOKEN_NAMES.get(e, f"'{e.lower()}'" if e.isupper() else e) for e in expected})
    if len(names) > 6:
        return ""
    return " (expected " + ", ".join(names) + ")"


#: The clauses each declaration kind takes, for "unexpected" messages at a clause's place (the
#: grammar's clause list is shared; the checker refuses the other kind's clauses).
CLAUSES = {
    "pattern": ("tokens", "queries", "keys", "mask", "bias", "softcap", "decay", "weights", "scale", "route", "let",
                "input", "branch", "combine"),
    "recurrence": ("decay", "update", "let", "input", "tokens"),
}


def _clause_error(err: lark.exceptions.UnexpectedToken, source: str) -> SpecError | None:
    """A word where a clause should start: the clauses of the enclosing declaration's kind (and the
    closest one), not the grammar's shared list."""
    if "EXPR_KW" not in err.expected or err.token.type == "$END":
        return None
    kind = _declaration_kind(source, err.token.start_pos)
    word = str(err.token)
    shown = word if len(word) <= 30 else word[:27] + "..."
    # a misspelt clause keyword, or a misspelt operator after an expression ('adn' for 'and')
    return SpecError(f"unexpected '{shown}' " + _clause_list(kind), _pos(err.token),
                     hint=_keyword_hint(word, err.expected, CLAUSES[kind]) or _spelling(word, ""))


def _declaration_kind(source: str, start: int | None) -> str:
    """'pattern' or 'recurrence': the kind of the declaration the text before ``start`` is in."""
    kinds = re.findall(r"\b(pattern|recurrence)\b", source[:start] if start is not None else "")
    return kinds[-1] if kinds else "pattern"


def _clause_list(kind: str) -> str:
    return (f"(expected a {kind} clause: {', '.join(CLAUSES[kind])}; or the next 'pattern' or "
            "'recurrence')")


#: Other languages' spellings of the language's operators: the token as met -> how it is written here.
_SPELLINGS = {
    "!": "negation is written 'not' (and not-equal '!=')",
    "&&": "'&&' is written 'and' ('&' is the bitwise and of ints)",
    "||": "'||' is written 'or' ('|' is the bitwise or of ints)",
    "?": "a conditional is written 'if C then A else B'",
    "if": "a conditional is written 'if C then A else B', its condition first",
}


def _spelling(token: str, before: str) -> str | None:
    """A hint for an operator spelt as in another language: ``token`` where it was not expected, ``before`` the
    source text just before it (``&&``: the second '&' is the unexpected one)."""
    if token in ("&", "|") and before.endswith(token):
        return _SPELLINGS[token * 2]
    return _SPELLINGS.get(token)


def _syntax_error(err: lark.exceptions.LarkError, source: str = "") -> SpecError:
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        ch = err.char
        shown = repr(ch) if ch.isprintable() else f"byte {ch.encode('utf-8', 'replace')!r}"
        return SpecError(f"unexpected character {shown}", Pos(err.line, err.column), hint=_spelling(ch, ""))
    if isinstance(err, lark.exceptions.UnexpectedToken):
        history = getattr(err, "token_history", None) or [None]  # (the lexer's: the token before)
        if err.token.type != "$END" and _is_glued(history[-1], err.token):
            return _glued_error(history[-1], err.token, source)
        clause = _clause_error(err, source)
        if clause is not None:
            return clause
        tok = err.token
        if tok.type == "$END":
            return SpecError("unexpected end of file" + _describe_expected(err.expected),
                             Pos(max(err.line, 1), max(err.column, 1)))
        text = str(tok)
        shown = text if len(text) <= 30 else text[:27] + "..."
        hint = _keyword_hint(text, err.expected) if tok.type == "NAME" else None
        before = source[: tok.start_pos].rstrip() if tok.start_pos is not None else ""
        return SpecError(f"unexpected '{shown}'" + _describe_expected(err.expected), _pos(tok),
                         hint=hint or _spelling(text, before))
    if isinstance(err, lark.exceptions.UnexpectedEOF):
        return SpecError("unexpected end of file", Pos(1, 1))
    return SpecError(f"syntax error: {err}", Pos(1, 1))


def parse(source: str, filename: str = "<spec>") -> ast.Module:
    """Parse the text of an ``.attn`` file. Raises ``SpecError`` (never anything else).

    A leading UTF-8 byte order mark is ignored; ``\r\n`` and a lone ``\r`` end a
    line as ``\n`` does (so positions are right for every line-ending style)."""
    source = normalize_source(source)
    if len(source) > MAX_SOURCE_CHARS:
        raise SpecError(f"spec too large ({len(source)} characters; at most {MAX_SOURCE_CHARS})",
                        where=filename)
    try:
        decls = _parser().parse(source)
    except SpecError as err:
        raise err.located(filename, source) from None
    except _Glued as glued:
        raise _glued_error(glued.keyword, glued.rest, source).located(filename, source) from None
    except lark.exceptions.VisitError as err:
        inner = err.orig_exc
        if isinstance(inner, SpecError):
            raise inner.located(filename, source) from None
        raise
    except lark.exceptions.LarkError as err:
        raise _syntax_error(err, source).located(filename, source) from None
    except RecursionError:
        raise SpecError("spec nested too deeply", Pos(1, 1)).located(filename, source) from None
    module = ast.Module(decls or [], filename, source)
    seen: dict[str, ast.Declaration] = {}
    for decl in module.declarations:
        if decl.name in seen:
            raise SpecError(f"'{decl.name}' is declared twice (first at line {seen[decl.name].pos.line})",
                            decl.name_pos, filename=filename, source=source)
        seen[decl.name] = decl
    return module


def normalize_source(text: str) -> str:
    """Spec text without a byte order mark, every line ending ``\n``."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def decode_source(data: bytes, filename: str) -> str:
    """Bytes of a spec file -> text (a UTF-8 byte order mark is dropped, line
    endings become ``\n``); a non-UTF-8 file is a located ``SpecError``."""
    try:
        return normalize_source(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        before = data[: err.start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line = before.count(b"\n") + 1
        col = len(before) - (before.rfind(b"\n") + 1) + 1
        raise SpecError("file is not UTF-8 text", Pos(line, col), filename=filename) from None


#: A spec file larger than this many bytes is refused before it is read (UTF-8
#: takes at most 4 bytes per character).
MAX_SOURCE_BYTES = 4 * MAX_SOURCE_CHARS


def read_file(path: str | os.PathLike, where: str) -> str:
    """The text of a spec file. Only a regular file of at most ``MAX_SOURCE_BYTES``
    is read: a FIFO, a device (``/dev/zero``) or a huge file is refused at once,
    never read into memory or waited on. Every failure is a ``SpecError`` at ``where``."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below refuses it
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise SpecError(f"no such file: {name}", where=where) from None
    except IsADirectoryError:
        raise SpecError(f"{name} is a directory, not a spec file", where=where) from None
    except OSError as err:
        raise SpecError(f"cannot read {name}: {err.strerror}", where=where) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SpecError(f"{name} is a directory, not a spec file", where=where)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"{name} is not a regular file (a pipe, device or socket)", where=where)
        if st.st_size > MAX_SOURCE_BYTES:
            raise SpecError(f"{name} is too large ({st.st_size} bytes; a spec file has at most "
                            f"{MAX_SOURCE_BYTES} bytes)", where=where)
        chunks, left = [], MAX_SOURCE_BYTES + 1  # the file may grow after fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as err:
        raise SpecError(f"cannot read {name}: {err.strerror}", where=where) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_SOURCE_BYTES:
        raise SpecError(f"{name} is too large (more than {MAX_SOURCE_BYTES} bytes)", where=where)
    return decode_source(data, name)
