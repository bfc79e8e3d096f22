"""The IR: what a checked declaration means, as sympy expressions plus small
descriptors. Hashable: ``key()`` is stable across processes and will key the
kernel caches. Source positions ride along for compile-time errors but are not
part of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import sympy

from . import route_kinds
from . import symbols as S
from .errors import Pos, SpecError


@dataclass(frozen=True)
class Segment:
    """One part of a concatenated layout: ``seq(SIZE)`` (``axes`` empty) or ``grid(a: SIZE, ...)``.

    ``name`` is what ``q in NAME`` tests: a seq segment's size name (None for a literal extent),
    ``grid`` for the grid segment."""

    kind: str  # 'seq' | 'grid'
    name: str | None
    size: sympy.Expr  # tokens in the segment (the product of the axes for a grid)
    axes: tuple[tuple[str, sympy.Expr], ...] = ()

    def describe(self) -> str:
        if self.kind == "seq":
            return f"seq({_size_text(self.size)})"
        return "grid(" + ", ".join(f"{a}: {_size_text(s)}" for a, s in self.axes) + ")"


@dataclass(frozen=True)
class Layout:
    """``seq`` (axes empty) or ``grid(a: SIZE, ...)``, row-major, last axis fastest.

    A concatenation (``seq(text) + grid(t: frames, ...)``) is kind ``seq`` with ``segments``:
    its tokens are flat positions (so tiles, intervals and every backend see a sequence) and
    ``coordinate`` / ``contains`` turn the per-segment meaning into exact expressions of the
    flat position (floored ``//``, ``%``, ``min``, ``max``), which every evaluator already
    computes exactly. Its length is the sum of the segments."""

    kind: str
    axes: tuple[tuple[str, sympy.Expr], ...] = ()
    cross: bool = False  # `keys seq` beside `queries seq`: the keys have their own length nk
    segments: tuple[Segment, ...] = ()  # a concatenation's parts, in order

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.axes)

    def size_of(self, axis: str) -> sympy.Expr:
        return dict(self.coordinate_axes)[axis]

    @property
    def coordinate_axes(self) -> tuple[tuple[str, sympy.Expr], ...]:
        """The axes ``q.AXIS`` may name: the grid's, or those of a concatenation's grid segment."""
        grids = [seg for seg in self.segments if seg.kind == "grid"]
        return grids[0].axes if grids else self.axes

    @property
    def segment_names(self) -> tuple[str, ...]:
        return tuple(seg.name for seg in self.segments if seg.name is not None)

    def token_count(self) -> sympy.Expr | None:
        """The number of tokens the sizes imply (a grid's product, a concatenation's sum);
        None for a plain sequence, whose length is given by the tensors."""
        if self.segments:
            return sympy.Add(*(seg.size for seg in self.segments))
        if self.kind == "grid":
            return sympy.Mul(*(s for _, s in self.axes))
        return None

    def extents(self) -> tuple[sympy.Expr, ...]:
        """Every size expression of the layout (axis extents, segment sizes)."""
        if self.segments:
            return tuple(e for seg in self.segments for e in ((seg.size,) if seg.kind == "seq" else
                                                                (s for _, s in seg.axes)))
        return tuple(s for _, s in self.axes)

    def length(self, flat_symbol: sympy.Symbol) -> sympy.Expr:
        """Number of tokens: the flat symbol (n or nk) for seq, the product for grid."""
        if self.kind == "seq":
            return flat_symbol
        return sympy.Mul(*(s for _, s in self.axes))

    def flat(self, role: str) -> sympy.Expr:
        """The flat position of a token in terms of this layout's coordinates."""
        if self.kind == "seq":
            return S.Q if role == "q" else S.K
        expr = sympy.Integer(0)
        for name, size in self.axes:
            expr = expr * size + S.coord(role, name)
        return sympy.expand(expr)

    def _start(self, index: int) -> sympy.Expr:
        return sympy.Add(*(seg.size for seg in self.segments[:index]))

    def contains(self, role: str, name: str) -> sympy.Basic:
        """``q in NAME``: the flat position lies in the named segment of a concatenation."""
        index = next(i for i, seg in enumerate(self.segments) if seg.name == name)
        start, flat = self._start(index), self.flat(role)
        return S.logic_and(sympy.Le(start, flat), sympy.Lt(flat, start + self.segments[index].size))

    def coordinate(self, role: str, axis: str) -> sympy.Expr:
        """``q.AXIS``: a grid coordinate symbol, or on a concatenation the coordinate of the
        flat position's index in the grid segment, clamped into it (a token before the grid
        has the first cell's coordinates, one after it the last cell's)."""
        if not self.segments:
            return S.coord(role, axis)
        index = next(i for i, seg in enumerate(self.segments) if seg.kind == "grid")
        grid = self.segments[index]
        local = S.Min(S.Max(self.flat(role) - self._start(index), 0), grid.size - 1)
        names = [a for a, _ in grid.axes]
        at = names.index(axis)
        stride = sympy.Mul(*(s for _, s in grid.axes[at + 1:]))
        value = local if stride == 1 else S.FloorDiv(local, stride)
        return value if at == 0 else S.Mod(value, grid.axes[at][1])

    def describe(self) -> str:
        if self.segments:
            return " + ".join(seg.describe() for seg in self.segments)
        if self.kind == "seq":
            return "seq"
        return "grid(" + ", ".join(f"{a}: {_size_text(s)}" for a, s in self.axes) + ")"


def _size_text(s: sympy.Expr) -> str:
    return str(s).removeprefix("size_")


@dataclass(frozen=True)
class InputDecl:
    """``input NAME: int[...]|float[...]``; dims are size expressions or ints."""

    name: str
    dtype: str
    dims: tuple[sympy.Expr, ...]
    dim_names: tuple[str, ...]
    #: None for an input the caller passes; ``("cluster", "q" | "k", CENTROIDS)`` for the cluster ids of
    #: the query (key) vectors that ``cluster(q, CENTROIDS)`` reads, computed from q, k and the input
    #: CENTROIDS at every call (``runtime.plan.clusters``), never passed by the caller;
    #: ``("vertical_slash", "columns" | "diagonals", VerticalSlash)`` for the flags of a vertical-slash
    #: route (``runtime.plan.vertical_slash``)
    derived: tuple | None = field(default=None, metadata={"key": "when set"})

    @property
    def function(self):
        return S.input_function(self.name, self.dtype)

    @property
    def token_dims(self) -> tuple[int, ...]:
        """The dimensions over the tokens (named ``n`` or ``nk``), as declared (no batch dimension)."""
        return tuple(i for i, dim in enumerate(self.dim_names) if dim in ("n", "nk"))


@dataclass(frozen=True)
class VerticalSlash:
    """``route topk(V) columns and topk(S) diagonals by last(L) [keep columns(C)] [keep diagonals(D)]``
    (MInference's vertical-slash index): selected per call from the softmax of the last L queries,
    lowered to two derived int inputs (``InputDecl.derived``) that the mask reads, a column flag
    ``[heads, n]`` at ``[h, k]`` and a diagonal flag ``[heads, 2n - 1]`` at ``[h, q - k + n - 1]``.
    ``keep_columns`` is a bool of k (and h); ``keep_diagonals`` a bool of the offset, written in q
    (the offset q - k with k = 0). None keeps nothing."""

    vertical: sympy.Expr
    slash: sympy.Expr
    last: sympy.Expr
    keep_columns: sympy.Basic | None
    keep_diagonals: sympy.Basic | None


@dataclass(frozen=True)
class WindowSite:
    """Where a ``window(...)`` call stands, for the compile-time size checks."""

    axis: str | None
    length: sympy.Expr
    size: sympy.Expr
    dilation: sympy.Expr
    stride: sympy.Expr
    pos: Pos
    filename: str = "<spec>"
    source: str | None = None
    #: the parameters the caller gave that its size, dilation or stride reads, each (role: "size", "dilation" or
    #: "stride"; the argument as given; the parameter as declared; a note, e.g. the axis of a per-axis argument):
    #: a window that does not fit names that argument, not the file (which may be the stdlib's)
    given: tuple[tuple[str, str, str, str], ...] = ()


@dataclass(frozen=True)
class Route:
    """A ``route`` clause: a content-dependent choice of key units per query, of one of the kinds registered in
    ``core.route_kinds`` (top-k blocks or tokens, top-p by antidiagonal or by min-max share, stripes by anchor, a
    given selection, or one a user adds). ``params`` holds the kind's values (its dataclass: every kind's has
    ``block``, the unit's extents per key-layout axis, and ``keep``, the units always kept); the layers ask the
    kind (``route_kinds.kind_of``), never a field another kind lacks."""

    kind: str
    params: route_kinds.RouteParams

    @property
    def block(self) -> tuple[sympy.Expr, ...]:
        """The extents of the route's unit of keys per key-layout axis (one entry on a sequence)."""
        return self.params.block

    @property
    def keep(self) -> sympy.Basic | None:
        """The units always kept (an expression of q, h and k, k bound to the unit's first key), or None."""
        return self.params.keep

    @property
    def per_query(self) -> bool:
        """Whether a query's selection depends on that query alone (and the keys)."""
        return route_kinds.kind_of(self).per_query(self.params)

    @property
    def tokens(self) -> bool:
        """Whether every key is its own unit."""
        return route_kinds.kind_of(self).tokens(self.params)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The call inputs the selection reads besides ``keep``'s."""
        return route_kinds.kind_of(self).inputs(self.params)

    @property
    def free_symbols(self) -> set:
        """The symbols any of the route's values reads (its block, keep, count, threshold, stride, ...)."""
        syms: set = set()
        for f in dataclasses.fields(self.params):
            value = getattr(self.params, f.name)
            for part in value if isinstance(value, tuple) else (value,):
                syms |= getattr(part, "free_symbols", set())
        return syms

    @property
    def scores_input(self) -> str | None:
        """The input holding each unit's score given per call (a top-k route's ``by NAME``, a branch's ``by
        probs(BRANCH)``, a given selection), or None where the route scores its units itself."""
        return self.params.scores if self.is_top_k() else None

    def is_top_k(self) -> bool:
        """Whether the route keeps the K best units of a score (``route_kinds.TopK``: top-k blocks or tokens, or a
        given selection)."""
        return isinstance(self.params, route_kinds.TopK)


def top_k_route(topk: sympy.Expr, block: tuple, score: str, keep: sympy.Basic | None, shared: bool = False,
                indexer: tuple[str, ...] | None = None, scores: str | None = None, given: bool = False) -> Route:
    """A top-k route (``route_kinds.TopK``) of the kind its values make it: ``given`` for a call's selection, top-k
    tokens where every key is its own unit and the route scores them itself, top-k blocks otherwise (a block route
    of one-key blocks whose scores are given stays one)."""
    params = route_kinds.TopK(tuple(block), keep, topk, score, shared, indexer, scores)
    if given:
        return Route(route_kinds.GIVEN.name, params)
    tokens = all(b == 1 for b in params.block) and scores is None
    return Route((route_kinds.TOPK_TOKENS if tokens else route_kinds.TOPK_BLOCKS).name, params)


#: The functions ``weights F(s) ** P`` may take of the score s.
WEIGHT_FUNCTIONS = ("exp", "sigmoid", "relu", "softplus")


@dataclass(frozen=True)
class Weights:
    """``weights F(s) [** P] [/ sum]``: the attention weight of a pair is ``F(s) ** P`` of its score s (after
    scale, softcap, bias and decay), divided by the row's sum of them with ``/ sum``. Softmax is
    ``exp(s) / sum``, the default (a pattern without the clause holds None). Every backend runs it as the softmax
    of ``log(F(s) ** P)`` (``runtime.numerics.log_weights``), and an unnormalised one multiplies that softmax's
    output by the row's sum of weights, ``exp(lse)``."""

    function: str  # one of WEIGHT_FUNCTIONS
    power: sympy.Expr  # positive, of parameters and sizes
    normalized: bool

    def describe(self) -> str:
        power = "" if self.power == 1 else f" ** {self.power}"
        return f"{self.function}(s){power}" + (" / sum" if self.normalized else "")


@dataclass(frozen=True)
class PatternIR:
    """A softmax-attention pattern: mask, score terms, routing, layouts, inputs."""

    name: str
    queries: Layout
    keys: Layout
    mask: sympy.Basic
    bias: sympy.Expr | None
    softcap: sympy.Expr | None
    decay: str | None  # name of a float[heads, n] input of log forget gates (FoX)
    route: Route | None
    inputs: tuple[InputDecl, ...]
    params: tuple[tuple[str, object], ...]
    windows: tuple[WindowSite, ...] = field(default=(), compare=False)
    filename: str = field(default="<spec>", compare=False)
    source: str | None = field(default=None, compare=False)
    #: parameters given one value per head (``NAME[heads]``), by name: how many values, the head count every
    #: call must have (``evaluate.bind_sizes``); their values are already in the expressions
    head_params: tuple[tuple[str, int], ...] = field(default=(), compare=False)
    #: ``weights F(s) ** P [/ sum]``; None: softmax (``exp(s) / sum``)
    weights: Weights | None = field(default=None, metadata={"key": "when set"})
    #: ``scale E``: each query's dot products times E (of q, h, parameters and sizes) besides the call's scale,
    #: folded into the queries before any backend runs (``runtime.api.Attention._score_scale``); None: 1
    score_scale: sympy.Expr | None = field(default=None, metadata={"key": "when set"})

    kind = "pattern"

    @property
    def self_attention(self) -> bool:
        return self.queries == self.keys

    def check_head_count(self, heads: int) -> None:
        """Refuse a call of ``heads`` query heads where a parameter holds one value per head of another count."""
        for name, count in self.head_params:
            if count != heads:
                raise SpecError(f"'{name}' holds {count} values, one per head, but the call has {heads} heads",
                                where=f"argument {name}", hint=f"give '{name}' one value per head of q (the CLI: --heads)")

    def key(self) -> str:
        return _key(
            "pattern",
            self.queries,
            self.keys,
            self.mask,
            self.bias,
            self.softcap,
            self.decay,
            self.route,
            self.inputs,
            *(() if self.weights is None else (self.weights,)),
        )

    def input(self, name: str) -> InputDecl:
        return next(i for i in self.inputs if i.name == name)

    def describe_terms(self) -> list[str]:
        """The mask and score terms, one readable line each (for ``.source``)."""
        lines = [f"mask = {self.mask}"]
        if self.softcap is not None:
            lines.append(f"softcap = {self.softcap}")
        if self.bias is not None:
            lines.append(f"bias = {self.bias}")
        if self.decay is not None:
            lines.append(f"decay = cumsum({self.decay})[q] - cumsum({self.decay})[k]")
        if self.weights is not None:
            lines.append(f"weights = {self.weights.describe()}")
        if self.score_scale is not None:
            lines.append(f"scale = {self.score_scale} (times the call's scale, folded into q)")
        if self.route is not None:
            lines.append(f"route = {route_kinds.kind_of(self.route).describe(self.route.params)}")
        return lines


@dataclass(frozen=True)
class RecurrenceIR:
    """A linear recurrence ``S_t = diag(exp(decay_t)) S_{t-1} + k_t^T v_t`` (``rule`` 'decay'), or the
    delta rule (``rule`` 'delta', rate ``beta`` an input float[heads, n]):
    ``S_t = diag(exp(decay_t)) S_{t-1}; S_t += beta_t k_t^T (v_t - k_t S_t)``; ``o_t = scale q_t S_t``.

    ``gate`` is 'head' (``decay`` a sympy expression of h: RetNet, Lightning; 0 for DeltaNet),
    'scalar' (``decay`` names a float[heads, n] input: Mamba2, Gated DeltaNet) or 'vector'
    (a float[heads, n, dk] input: GLA, Kimi Delta Attention).

    Titans' neural memory (``rule`` 'titans', rates ``theta`` and ``eta``, inputs float[heads, n]):
    ``m_t = eta_t m_{t-1} + theta_t k_t^T (v_t - k_t S_{t-1})``; ``S_t = exp(decay_t) S_{t-1} + m_t``; the state
    holds S and m (``[B, H, 2 Dk, Dv]``). ``core.recurrence_rules`` lists the rules.

    ``qk_l2norm`` (the delta rule's ``update delta(beta, qk_l2norm = true)``): q and k are divided by
    their L2 norm over the head dimension before the rule (flash-linear-attention's
    ``use_qk_l2norm_in_kernel``; ``runtime.recurrences.delta.naive.prepare_qk``).
    """

    name: str
    gate: str
    decay: sympy.Expr | str
    inputs: tuple[InputDecl, ...]
    params: tuple[tuple[str, object], ...]
    rule: str = "decay"
    qk_l2norm: bool = False
    #: every rate input of the rule's ``update`` clause, in order: the delta rule's beta; Titans' theta and eta
    rates: tuple[str, ...] = ()
    filename: str = field(default="<spec>", compare=False)
    source: str | None = field(default=None, compare=False)

    kind = "recurrence"

    @property
    def beta(self) -> str | None:
        """The first rate input (the delta rule's ``beta``), None without an ``update`` clause."""
        return self.rates[0] if self.rates else None

    def key(self) -> str:
        if self.rule == "decay":  # the key of every recurrence before the delta rule, unchanged
            return _key("recurrence", self.gate, self.decay, self.inputs)
        if self.rule != "delta":  # rules after the delta rule: every rate
            return _key("recurrence", self.gate, self.decay, self.inputs, self.rule, self.rates, self.qk_l2norm)
        if not self.qk_l2norm:  # the key of the delta rule before its options, unchanged
            return _key("recurrence", self.gate, self.decay, self.inputs, self.rule, self.beta)
        return _key("recurrence", self.gate, self.decay, self.inputs, self.rule, self.beta, "qk_l2norm")


@dataclass(frozen=True)
class Branch:
    """One attention of a combined pattern (``branch NAME``): an ordinary ``PatternIR`` over the combined
    pattern's queries. ``pool`` is ``("mean", SIZE)`` when its keys and values are the means of runs of
    SIZE keys (``keys pooled(mean, SIZE)``: the branch is then a cross attention whose key ``k`` is the
    run's index), ``("max", SIZE)`` when its keys are the runs' elementwise maxima and its values each run's
    attention by its elementwise-max query (``keys pooled(max, SIZE)``, Combiner's summaries); ``probs_of`` names the branch whose attention probabilities score its route
    (``by probs(NAME)``; the scores reach the route as the input ``pattern.route.scores_input``)."""

    name: str
    pattern: PatternIR
    pool: tuple[str, sympy.Expr] | None = None
    probs_of: str | None = None


@dataclass(frozen=True)
class CombinedIR:
    """Several attentions over the same queries, combined (``branch`` ... ``combine``): the output is
    ``sum(gate[h, q] * branch_out)`` over ``terms`` (gate None: weight 1), or with ``merge`` "softmax"
    (``combine softmax(A, B, ...)``) one softmax over every branch's keys: the branches' outputs weighted by
    ``exp(lse_branch - lse)``, ``lse`` the log-sum-exp of theirs. ``gates`` are the call-time
    inputs ``float[heads, n]`` the combination reads; ``inputs`` every input a call passes (the gates
    and the branches' own, not the route scores the pattern computes)."""

    name: str
    branches: tuple[Branch, ...]
    terms: tuple[tuple[str | None, str], ...]
    gates: tuple[InputDecl, ...]
    inputs: tuple[InputDecl, ...]
    params: tuple[tuple[str, object], ...]
    filename: str = field(default="<spec>", compare=False)
    source: str | None = field(default=None, compare=False)
    merge: str = "sum"

    kind = "combined"
    self_attention = True

    def branch(self, name: str) -> Branch:
        return next(b for b in self.branches if b.name == name)

    def key(self) -> str:
        return _key("combined", tuple((b.name, b.pattern.key(), b.pool, b.probs_of) for b in self.branches),
                    self.terms, self.gates, *(() if self.merge == "sum" else (self.merge,)))


@dataclass(frozen=True)
class BucketedIR:
    """Balanced clusters (``route buckets(WINDOW) by nearest(CENTROIDS)``, the Routing Transformer): per
    head h and centroid c, the bucket holds the ``window`` queries and the ``window`` keys whose
    L2-normalised vectors have the largest dot product with ``CENTROIDS[h, c]`` (each side chosen apart; a
    token may be in no bucket or in several). Each query attends, within each bucket it is in, the bucket's
    keys that ``pattern``'s mask allows; its output is the sum of those attentions over its buckets
    divided by their count plus ``BUCKET_EPS`` (the authors' code's mean). ``pattern`` is the attention
    within a bucket (a mask of positions, heads and sizes); ``inputs`` holds the centroids."""

    name: str
    pattern: PatternIR
    window: sympy.Expr
    centroids: str
    inputs: tuple[InputDecl, ...]
    params: tuple[tuple[str, object], ...]
    filename: str = field(default="<spec>", compare=False)
    source: str | None = field(default=None, compare=False)

    kind = "bucketed"
    self_attention = True

    def key(self) -> str:
        return _key("bucketed", self.pattern.key(), self.window, self.centroids)


def what_it_is(pat) -> str:
    """How a refusal names an IR that is not one softmax pattern (``PatternIR``)."""
    if isinstance(pat, CombinedIR):
        return "a combined pattern (several attentions summed)"
    if isinstance(pat, BucketedIR):
        return "a bucketed pattern (attention within buckets chosen per call, in torch)"
    return "a recurrence"


#: What the mean over a token's buckets adds to their count (lucidrains/routing-transformer's scatter_mean:
#: the sum over the buckets divided by count + 1e-5; a token in no bucket gets 0).
BUCKET_EPS = 1e-5


def _canon(x) -> str:
    if isinstance(x, sympy.Basic):
        return sympy.srepr(x)
    if isinstance(x, tuple | list):
        return "(" + ",".join(_canon(i) for i in x) + ")"
    if hasattr(x, "__dataclass_fields__"):
        # a field added later marks itself {"key": "when set"}: left out while unset, so the keys of
        # everything written before it (and the kernel caches keyed by them) stay as they were
        fields = [f for f in x.__dataclass_fields__.values() if f.compare
                  and not (f.metadata.get("key") == "when set" and getattr(x, f.name) is None)]
        return type(x).__name__ + "(" + ",".join(_canon(getattr(x, f.name)) for f in fields) + ")"
    return repr(x)


def _key(*parts) -> str:
    return hashlib.sha256(_canon(parts).encode()).hexdigest()


# ----------------------------------------------------------------- compile-time checks
def least_length(ir: PatternIR | CombinedIR, subs: dict | None = None) -> int:
    """The fewest tokens a sequence of ``ir`` holds for its windows along it to fit (``check_window_sizes``'s rule:
    size times dilation), 1 where it has none: what a paged batch's rows, whose lengths the kernel reads on the
    device, are checked against. ``subs``: sizes the windows' may name (not the length). A combined pattern's: its
    branches' over the tokens (a pooled branch's windows are over runs)."""
    if isinstance(ir, CombinedIR):
        return max((least_length(b.pattern, subs) for b in ir.branches if b.pool is None), default=1)
    least = 1
    for site in ir.windows:
        if site.length not in (S.N, S.NK):
            continue
        size, dil = (sympy.sympify(x).subs(subs or {}) for x in (site.size, site.dilation))
        if isinstance(size, sympy.Integer) and isinstance(dil, sympy.Integer):
            least = max(least, int(size) * int(dil))
    return least


def check_window_sizes(ir: PatternIR, subs: dict) -> None:
    """Window larger than its axis, stride larger than the window: errors once sizes are known.
    Sizes that passed are remembered on the pattern (every call binds its sizes: sympy
    substitution per window would be a fixed cost of each call)."""
    if not ir.windows:
        return
    passed = ir.__dict__.setdefault("_window_sizes_passed", set())
    key = tuple(sorted((str(sym), str(val)) for sym, val in subs.items()))
    if key in passed:
        return
    for site in ir.windows:
        vals = [sympy.sympify(x).subs(subs) for x in (site.length, site.size, site.dilation, site.stride)]
        if not all(isinstance(v, sympy.Integer) for v in vals):
            continue
        L, size, dil, stride = (int(v) for v in vals)
        axis = f"axis '{site.axis}'" if site.axis else "the sequence"
        if size * dil > L:
            raise _window_error(site, ("size", "dilation"),
                                f"window of {size}" + (f" with dilation {dil}" if dil > 1 else "")
                                + f" does not fit {axis} of length {L}",
                                "window size times dilation must be at most the axis length")
        if stride > size:
            raise _window_error(site, ("stride", "size"), f"stride {stride} is larger than the window {size}")
    passed.add(key)


def _window_error(site: WindowSite, roles: tuple[str, ...], message: str, hint: str | None = None) -> SpecError:
    """A window's size error: of the argument the caller gave for one of ``roles`` where there is one (its value
    is at fault, and the window's place goes into the hint), else at the window in its file."""
    for role in roles:
        for given_role, argument, declared, note in site.given:
            if given_role == role:
                used = f"'{declared}' is read at {site.filename}:{site.pos.line}:{site.pos.col}"
                return SpecError(message + (f" ({note})" if note else ""), where=f"argument {argument}",
                                 hint=used + (f"; {hint}" if hint else ""))
    return SpecError(message, site.pos, filename=site.filename, source=site.source, hint=hint)
