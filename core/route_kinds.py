"""The route kinds of the language, one entry each, as ``recurrence_rules`` holds the recurrence rules: what an
``ir.Route`` of the kind holds (``Route(kind, params)``, ``params`` a frozen dataclass of the kind's), the facts
every layer asks of it (whether each query selects alone, what the most units a query keeps is, which inputs it
reads) and, for a kind written in the general clause ``route WORD(ARGS) blocks(...) | tokens [keep EXPR]``, how
the clause's arguments are checked. A kind's selection (host and device), its refusals and its reference register
under the same name in ``runtime.plan.forms`` (``RouteForm``); its cost model asks only these facts.

Adding a kind (CONTRIBUTING.md, ``tests/spec/test_route_kind_registry.py`` adds one from a test): its facts here
(``register``) and its form there, two modules and a line in each registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy


# ----------------------------------------------------------------- what a route of each kind holds
@dataclass(frozen=True)
class RouteParams:
    """What every kind holds: ``block``, the extents of its unit of keys per key-layout axis (one entry on a
    sequence; all 1 for single keys), and ``keep``, a bool expression of q, h and k (k bound to a unit's first key)
    of the units always kept, or None."""

    block: tuple[sympy.Expr, ...]
    keep: sympy.Basic | None


@dataclass(frozen=True)
class TopK(RouteParams):
    """``route topk(K) blocks(...) | tokens by SCORE [keep EXPR] [shared]`` (kinds ``topk_blocks``,
    ``topk_tokens``; and ``given``, a call's ``selection=``).

    ``score`` is 'token' (q @ mean(k), MoBA; q @ k of single keys), 'block' (mean(q) @ mean(k), BiFormer), 'bound'
    (q @ bound(k), Quest: sum over d of max(q_d * max_k k_d, q_d * min_k k_d) over the block's keys), 'indexer'
    (DeepSeek's lightning indexer ``sum_j W[q, j] relu(QI[q, j] . KI[k])``) or 'key' (a score per key ``S[h, k]``,
    DMA). ``indexer``: ``(QI, KI)`` of a token route scored ``QI @ KI``, ``(QI, KI, W)`` of score 'indexer',
    ``(S,)`` of score 'key'. ``scores``: the input ``float[heads, n, blocks]`` holding each block's score (``by
    NAME``, a branch's ``by probs(BRANCH)``, or the selection itself for ``given``, selected where > 0)."""

    topk: sympy.Expr
    score: str
    shared: bool = False
    indexer: tuple[str, ...] | None = field(default=None, metadata={"key": "when set"})
    scores: str | None = field(default=None, metadata={"key": "when set"})


@dataclass(frozen=True)
class TopPAntidiagonal(RouteParams):
    """``route topp(P) blocks(SIZE) by antidiagonal(STRIDE) [keep EXPR]`` (XAttention, ``runtime.plan.antidiagonal``):
    ``topp`` the constant threshold P in (0, 1], ``stride`` an int expression of the sizes dividing the block."""

    topp: sympy.Expr
    stride: sympy.Expr


@dataclass(frozen=True)
class TopPShare(RouteParams):
    """``route topp(P) blocks(...) by minmax(q @ mean(k)) over GROUP [keep EXPR]`` (VMoBA, ``runtime.plan.share``):
    the scores q @ mean(k) min-max normalised and ranked within ``group``: 'query' (one query's row), 'head' (one
    head's (query, block) pairs), 'block' (one block's (head, query) pairs) or 'all' (every pair of a batch row)."""

    topp: sympy.Expr
    group: str


@dataclass(frozen=True)
class Stripes(RouteParams):
    """``route stripes(THETA) blocks(B) groups(G) keep REGION`` (AnchorAttention, ``runtime.plan.stripes``): single
    keys kept per group of G queries where a block of B queries' mean query scores within THETA of its mean anchor;
    ``keep`` the anchor region."""

    theta: sympy.Expr
    query_block: sympy.Expr
    group: sympy.Expr


@dataclass(frozen=True)
class RouteClause:
    """A general route clause ``route WORD(ARGS) blocks(...) | tokens [keep EXPR]`` as the checker hands it to its
    kind's ``check``: ``args`` each a sympy expression of the sizes and parameters (or of q, k, h, if the kind
    allows it: ``check`` says), ``arg_pos`` their places in the file (for ``checker.error``), ``block`` and ``keep``
    checked already."""

    word: str
    args: tuple[sympy.Expr, ...]
    arg_pos: tuple[Any, ...]
    block: tuple[sympy.Expr, ...]
    keep: sympy.Basic | None
    pos: Any


# ----------------------------------------------------------------- the facts of each kind
def _all_ones(params: RouteParams) -> bool:
    return all(b == 1 for b in params.block)


def _no_count(_params: RouteParams) -> None:
    return None


def _no_inputs(_params: RouteParams) -> tuple[str, ...]:
    return ()


def _fields(params: RouteParams) -> str:
    """Every value of ``params`` by name (a kind's line without a ``describe`` of its own)."""
    return ", ".join(f"{f.name}={getattr(params, f.name)}" for f in dataclasses.fields(params))


@dataclass(frozen=True)
class RouteKind:
    """One route kind (see the module docstring).

    - ``name``: ``ir.Route.kind``; for a kind of the general clause, its word (``route WORD(...)``).
    - ``title``: how messages, ``attnc show`` and the simulator's assumptions name it.
    - ``clause``: its syntax, for messages.
    - ``params``: the dataclass its routes hold.
    - ``per_query(params)``: whether a query's selection depends on that query alone (and the keys): a decode
      step then selects as the whole call would.
    - ``tokens(params)``: whether every key is its own unit (the executor's allowed units are the mask itself).
    - ``count(params)``: the most units a query keeps, an int expression of the sizes (top-k's K), or None: any
      number (a threshold's), modelled as every unit the mask reaches.
    - ``inputs(params)``: the call inputs the selection reads besides ``keep``'s.
    - ``describe(params)``: one line after ``route = `` (``attnc show``, a pattern's ``.source``).
    - ``check(checker, clause)``: a kind of the general clause: its ``params`` from the clause's checked
      arguments (``clause.args``: sympy expressions; ``clause.block``, ``clause.keep`` already checked), raising
      ``checker.error(message, pos)`` where they are wrong. None for a kind with a clause of its own.
    """

    name: str
    title: str
    clause: str
    params: type
    per_query: Callable[[Any], bool]
    tokens: Callable[[Any], bool] = _all_ones
    count: Callable[[Any], sympy.Expr | None] = _no_count
    inputs: Callable[[Any], tuple[str, ...]] = _no_inputs
    describe: Callable[[Any], str] = _fields
    check: Callable[..., RouteParams] | None = None


#: Every kind by name, the language's own first; ``register`` adds one.
KINDS: dict[str, RouteKind] = {}


def add_entry(table: dict, name: str, entry, taken: str):
    """Add ``entry`` to a registry ``table`` under ``name``; a name another entry holds is refused with ``taken``
    (two entries would answer for one route). Adding the same entry again is nothing."""
    if name in table and table[name] != entry:
        raise ValueError(taken)
    table[name] = entry
    return entry


def register(kind: RouteKind) -> RouteKind:
    """Add ``kind`` (a name already taken is refused)."""
    return add_entry(KINDS, kind.name, kind, f"a route kind '{kind.name}' is registered already")


def unregister(name: str) -> None:
    """Remove a kind added by ``register`` (a test's)."""
    KINDS.pop(name, None)


def kind_of(route) -> RouteKind:
    """The kind of ``route`` (an ``ir.Route``)."""
    return KINDS[route.kind]


def _top_k_inputs(p: TopK) -> tuple[str, ...]:
    return (*(p.indexer or ()), *((p.scores,) if p.scores else ()))


def _top_k_line(p: TopK) -> str:
    return f"topk({p.topk}) blocks{tuple(p.block)} score={p.score} keep={p.keep} shared={p.shared}"


TOPK_BLOCKS = register(RouteKind(
    "topk_blocks", "top-k blocks", "route topk(K) blocks(...) by q @ mean(k) | mean(q) @ mean(k) | q @ bound(k) | NAME",
    TopK, per_query=lambda p: p.score != "block", count=lambda p: p.topk,
    inputs=_top_k_inputs, describe=_top_k_line))
TOPK_TOKENS = register(RouteKind(
    "topk_tokens", "top-k tokens", "route topk(K) tokens by q @ k | QI @ KI | indexer(QI, KI, W) | S", TopK,
    per_query=lambda p: True, tokens=lambda p: True, count=lambda p: p.topk, inputs=_top_k_inputs,
    describe=_top_k_line))
GIVEN = register(RouteKind(
    "given", "a given selection", "a call's selection= (runtime.plan.given)", TopK, per_query=lambda p: True,
    count=lambda p: p.topk, inputs=_top_k_inputs,
    describe=lambda p: f"the given selection '{p.scores}' blocks{tuple(p.block)}"))
TOPP_ANTIDIAGONAL = register(RouteKind(
    "topp_antidiagonal", "top-p by antidiagonal scoring", "route topp(P) blocks(SIZE) by antidiagonal(STRIDE)",
    TopPAntidiagonal, per_query=lambda p: False, tokens=lambda p: False,
    describe=lambda p: f"topp({p.topp}) blocks{tuple(p.block)} by antidiagonal({p.stride}) keep={p.keep}"))
TOPP_SHARE = register(RouteKind(
    "topp_share", "top-p by min-max share", "route topp(P) blocks(...) by minmax(q @ mean(k)) over GROUP", TopPShare,
    per_query=lambda p: p.group == "query", tokens=lambda p: False,
    describe=lambda p: f"topp({p.topp}) blocks{tuple(p.block)} by minmax(q @ mean(k)) over {p.group} keep={p.keep}"))
STRIPES = register(RouteKind(
    "stripes", "stripes by anchor", "route stripes(THETA) blocks(B) groups(G) keep REGION", Stripes,
    per_query=lambda p: False, tokens=lambda p: True,
    describe=lambda p: f"stripes({p.theta}) blocks({p.query_block}) groups({p.group}) keep={p.keep}"))
