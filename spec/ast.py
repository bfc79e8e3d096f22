"""The syntax tree of an ``.attn`` file; every node carries its source position."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.errors import Pos

#: How a stdlib pattern is named as a source (``stdlib:NAME``) and its module's filename begins
STDLIB_PREFIX = "stdlib:"

# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Expr:
    pos: Pos


@dataclass(frozen=True)
class Num(Expr):
    value: int | float


@dataclass(frozen=True)
class BoolLit(Expr):
    value: bool


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Attr(Expr):
    """``q.AXIS`` or ``k.AXIS``: a grid coordinate."""

    base: str
    axis: str
    axis_pos: Pos


@dataclass(frozen=True)
class Membership(Expr):
    """``q in SEGMENT`` or ``k in SEGMENT``: whether the token lies in a segment of a
    concatenated layout (``operand`` must be the name ``q`` or ``k``)."""

    operand: Expr
    segment: str
    segment_pos: Pos


@dataclass(frozen=True)
class Index(Expr):
    """``NAME[i, j]``: an element of a call-time input."""

    name: str
    indices: tuple[Expr, ...]


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # '-', '+', '~', 'not'
    operand: Expr


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # + - * / // % ** << >> & | ^ and or
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Compare(Expr):
    """A (possibly chained) comparison ``a < b <= c``."""

    operands: tuple[Expr, ...]
    ops: tuple[str, ...]


@dataclass(frozen=True)
class IfExpr(Expr):
    cond: Expr
    then: Expr
    orelse: Expr


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    pos: Pos


@dataclass(frozen=True)
class Call(Expr):
    """A builtin (``window(x, 7)``) or a pattern used as a bool."""

    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]
    func_pos: Pos


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Param:
    name: str
    default: int | float | bool | None
    pos: Pos
    #: a declared bound, ``(">=", 1)`` for ``window >= 1``, that every value of the parameter meets
    bound: tuple[str, int | float] | None = None
    bound_pos: Pos | None = None
    #: declared ``NAME[heads]``: a value may be a list with one entry per head
    per_head: bool = False


@dataclass(frozen=True)
class AxisDecl:
    name: str
    size: str | int  # a size name or a literal extent
    pos: Pos
    size_pos: Pos


@dataclass(frozen=True)
class Segment:
    """One part of a layout: ``seq`` (size None), ``seq(SIZE)`` or ``grid(...)``."""

    kind: str  # 'seq' | 'grid'
    size: str | int | None  # a seq segment's size name or literal extent
    axes: tuple[AxisDecl, ...]  # a grid segment's axes
    pos: Pos
    size_pos: Pos | None = None


@dataclass(frozen=True)
class Layout:
    """``seq``, ``grid(...)`` or a concatenation ``SEGMENT + SEGMENT + ...`` (kind 'concat')."""

    kind: str  # 'seq' | 'grid' | 'concat'
    axes: tuple[AxisDecl, ...]
    pos: Pos
    segments: tuple[Segment, ...] = ()  # a concatenation's parts, in the order written


@dataclass(frozen=True)
class Clause:
    pos: Pos


@dataclass(frozen=True)
class LayoutClause(Clause):
    role: str  # 'tokens' | 'queries' | 'keys'
    layout: Layout


@dataclass(frozen=True)
class Let(Clause):
    name: str
    value: Expr
    name_pos: Pos


@dataclass(frozen=True)
class Dim:
    value: str | int
    pos: Pos


@dataclass(frozen=True)
class Input(Clause):
    name: str
    dtype: str
    dims: tuple[Dim, ...]
    name_pos: Pos
    dtype_pos: Pos


@dataclass(frozen=True)
class ExprClause(Clause):
    """``mask``, ``bias``, ``softcap``, ``decay`` or ``weights``."""

    keyword: str
    value: Expr


@dataclass(frozen=True)
class BlockAxis:
    axis: str | None  # None for flat blocks of a sequence
    size: Expr
    pos: Pos


@dataclass(frozen=True)
class ScoreSide:
    """One side of a routing score: ``q``, ``k``, ``mean(q)``, ``mean(k)`` or ``bound(k)``."""

    func: str | None
    arg: str
    pos: Pos


@dataclass(frozen=True)
class IndexerScore:
    """A token route's score from inputs: ``indexer(QI, KI, W)`` (func 'indexer'), DeepSeek's lightning indexer
    ``sum_j W[q, j] relu(QI[q, j] . KI[k])``, or ``by NAME`` (func 'key'): a score per key, ``NAME[h, k]``."""

    func: str
    names: tuple[str, str, str]
    pos: Pos


@dataclass(frozen=True)
class Route(Clause):
    topk: Expr
    blocks: tuple[BlockAxis, ...]  # empty for `tokens`
    left: ScoreSide | None
    right: ScoreSide | None
    keep: Expr | None
    shared: bool
    unit: str = "blocks"  # 'blocks' | 'tokens'
    unit_pos: Pos | None = None
    indexer: IndexerScore | None = None  # ``by indexer(QI, KI, W)`` (left and right are None)


@dataclass(frozen=True)
class MinMaxScore:
    """``minmax(LEFT @ RIGHT) over GROUP``: a top-p route's scores, min-max normalised within GROUP (VMoBA)."""

    left: ScoreSide
    right: ScoreSide
    group: str
    group_pos: Pos


@dataclass(frozen=True)
class RouteTopP(Clause):
    """``route topp(P) blocks(SIZE) by antidiagonal(STRIDE) [keep EXPR]`` (XAttention), or
    ``route topp(P) blocks(...) by minmax(q @ mean(k)) over GROUP [keep EXPR]`` (VMoBA)."""

    p: Expr
    blocks: tuple[BlockAxis, ...]
    stride: Expr | None  # the antidiagonal form's
    keep: Expr | None
    minmax: MinMaxScore | None = None  # the min-max share form's


@dataclass(frozen=True)
class BucketRoute(Clause):
    """``route buckets(WINDOW) by nearest(CENTROIDS)`` (Routing Transformer's balanced clusters)."""

    window: Expr
    centroids: str
    centroids_pos: Pos


@dataclass(frozen=True)
class StripesRoute(Clause):
    """``route stripes(THETA) blocks(B) groups(G) keep REGION`` (AnchorAttention's stripes by anchor)."""

    theta: Expr
    block: Expr
    group: Expr
    keep: Expr | None


@dataclass(frozen=True)
class VerticalSlashRoute(Clause):
    """``route topk(V) columns and topk(S) diagonals by last(L) [keep columns(C) diagonals(D)]``."""

    vertical: Expr
    slash: Expr
    last: Expr
    keep_columns: Expr | None
    keep_diagonals: Expr | None


@dataclass(frozen=True)
class Update(Clause):
    """A recurrence's ``update RULE(ARG, ..., KEY = VALUE, ...)``: ``delta(beta)``, ``delta(beta, qk_l2norm = true)``,
    ``titans(theta, eta)``."""

    rule: str
    rule_pos: Pos
    args: tuple[Expr, ...]
    options: tuple[Keyword, ...] = ()


@dataclass(frozen=True)
class Branch(Clause):
    """``branch NAME``: the clauses after it, up to the next ``branch`` or ``combine``, are one branch."""

    name: str
    name_pos: Pos


@dataclass(frozen=True)
class Combine(Clause):
    """``combine G * NAME + ...``: the branches' outputs, each times a gate input (or alone), summed."""

    value: Expr


@dataclass(frozen=True)
class PooledKeys(Clause):
    """``keys pooled(FUNC, SIZE)`` in a branch: the keys (and values) are pooled over runs of SIZE tokens."""

    role: str
    func: str
    func_pos: Pos
    size: str | int
    size_pos: Pos


@dataclass(frozen=True)
class BranchRoute(Clause):
    """``route topk(K) blocks(SIZE) by probs(NAME) [keep EXPR] [shared]`` in a branch: the route of
    ``Route`` scored by another branch's attention probabilities."""

    topk: Expr
    blocks: tuple[BlockAxis, ...]
    score: ScoreSide
    keep: Expr | None
    shared: bool
    unit: str = "blocks"
    unit_pos: Pos | None = None


@dataclass(frozen=True)
class KindRoute(Clause):
    """``route WORD(ARGS) blocks(...) | tokens [keep EXPR]``: a route of a kind registered in ``core.route_kinds``."""

    word: str
    word_pos: Pos
    args: tuple[Expr, ...]
    blocks: tuple[BlockAxis, ...]  # empty for `tokens`
    keep: Expr | None


#: The clauses a pattern's ``route`` keyword opens (a branch's ``BranchRoute`` is its branch's)
ROUTE_CLAUSES = (Route, RouteTopP, VerticalSlashRoute, BucketRoute, StripesRoute, KindRoute)


@dataclass(frozen=True)
class Declaration:
    kind: str  # 'pattern' | 'recurrence'
    name: str
    params: tuple[Param, ...]
    clauses: tuple[Clause, ...]
    pos: Pos
    name_pos: Pos


@dataclass
class Module:
    declarations: list[Declaration]
    filename: str
    source: str
    by_name: dict[str, Declaration] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {d.name: d for d in self.declarations}

    @property
    def is_stdlib(self) -> bool:
        """Whether this is a stdlib pattern's file (one its caller did not write)."""
        return self.filename.startswith(STDLIB_PREFIX)
