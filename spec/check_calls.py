"""Calls: the builtin functions, ``window()``, and calls of other patterns (their
arguments, the caller's frame they see, recursion, and the inputs and windows they bring)."""

from __future__ import annotations

import sympy

from ..core import ir
from ..core import symbols as S
from ..core.errors import SpecError, did_you_mean
from . import ast
from .check_decls import bound_violation
from .check_layouts import Frame
from .check_types import (
    BOOL,
    BUILTINS,
    FLOAT,
    INT,
    WINDOW_KEYWORDS,
    Typed,
    article,
    fold,
    kind_of_value,
    unknown_function_hint,
)
from .params import names_in


class CallChecks:
    """Checker methods for function calls in expressions."""

    def _e_Call(self, node: ast.Call) -> Typed:
        # Functions (builtins, patterns) and values (params, lets, inputs) are
        # separate namespaces: a parameter named `window` does not hide window().
        if node.func not in BUILTINS:
            if node.func in self.inputs:
                raise self.error(f"input '{node.func}' is indexed with [...], not called", node.func_pos)
            return self._call_pattern(node)
        if node.func == "window":
            return self._window(node)
        if node.func == "cluster":
            return self._cluster(node)
        if node.func == "relative":
            return self._relative(node)
        if node.func == "landmark":
            return self._landmark(node)
        lo, hi = BUILTINS[node.func]
        if node.kwargs:
            raise self.error(f"'{node.func}' takes no keyword arguments", node.kwargs[0].pos)
        if not lo <= len(node.args) <= hi:
            count = str(lo) if lo == hi else f"at least {lo}"
            raise self.error(f"'{node.func}' takes {count} argument(s), got {len(node.args)}", node.func_pos)
        if node.func == "is_pow2":
            return Typed(BOOL, S.IsPow2(self.expect(node.args[0], INT, "the argument of is_pow2").expr))
        if node.func in ("log2", "bit_length"):
            x = self.expect(node.args[0], INT, f"the argument of {node.func}").expr
            return Typed(INT, (S.Log2Floor if node.func == "log2" else S.BitLength)(x))
        args = [self.expect_number(a, f"an argument of {node.func}") for a in node.args]
        kind = INT if all(a.type == INT for a in args) else FLOAT
        xs = [a.expr for a in args]
        if node.func == "abs":
            return Typed(kind, S.Abs(xs[0]))
        if node.func == "min":
            return Typed(kind, S.Min(*xs))
        if node.func == "max":
            return Typed(kind, S.Max(*xs))
        if node.func == "clamp":
            return Typed(kind, S.Min(S.Max(xs[0], xs[1]), xs[2]))
        fn = {"exp": sympy.exp, "log": S.Log, "sqrt": S.Sqrt, "tanh": sympy.tanh}[node.func]
        x = xs[0]
        if x.is_number and ((node.func == "log" and x <= 0) or (node.func == "sqrt" and x < 0)):
            raise self.error(f"{node.func} of {x} is not a finite real number", node.args[0].pos)
        if node.func == "exp" and x.is_number and x > 700:
            raise self.error("exp overflows", node.args[0].pos)
        return Typed(FLOAT, fold(fn(x)))

    def _cluster(self, node: ast.Call) -> Typed:
        """``cluster(q | k, CENTROIDS)``: the index of the centroid of head h nearest (largest dot product,
        ties to the lower index) to the query's (key's) vector, an int. It reads a derived input
        ``int[heads, n | nk]`` that the runtime computes from q, k and CENTROIDS at every call
        (``runtime.plan.clusters``): to every backend it is a per-token id, like a document mask's."""
        if node.kwargs:
            raise self.error("'cluster' takes no keyword arguments", node.kwargs[0].pos)
        if len(node.args) != 2:
            raise self.error(f"'cluster' takes 2 arguments (q or k, CENTROIDS), got {len(node.args)}", node.func_pos,
                             hint="cluster(q, centroids) == cluster(k, centroids)")
        side, cent = node.args
        if not isinstance(side, ast.Name) or side.id not in ("q", "k"):
            raise self.error("the first argument of cluster() must be 'q' or 'k' (whose vector is clustered)",
                             side.pos)
        decl = self.inputs.get(cent.id) if isinstance(cent, ast.Name) else None
        if decl is None:
            shown = f"'{cent.id}' is not an input" if isinstance(cent, ast.Name) else "this is not an input"
            raise self.error(f"the second argument of cluster() must name the centroids input: {shown}", cent.pos,
                             hint="declare it: input centroids: float[heads, clusters, dk]")
        if decl.dtype != FLOAT or len(decl.dims) != 3 or decl.dim_names[0] != "heads" or decl.dim_names[2] != "dk":
            raise self.error(f"the centroids input '{cent.id}' must be float[heads, CLUSTERS, dk], got "
                             f"{decl.dtype}[{', '.join(decl.dim_names)}]", cent.pos)
        name = f"__cluster_{side.id}_{cent.id}"
        own = self.frame.queries == self.frame.keys or side.id == "q"
        wanted = ir.InputDecl(name, INT, (S.HEADS, self.frame.n if own else self.frame.nk),
                              ("heads", "n" if own else "nk"), ("cluster", side.id, cent.id))
        if self.inputs.get(name, wanted) != wanted:
            raise self.error(f"the input name '{name}' is taken: cluster() needs it", node.func_pos)
        self.inputs[name] = wanted
        return Typed(INT, wanted.function(S.H, self.frame.q_flat if side.id == "q" else self.frame.k_flat))

    def _relative(self, node: ast.Call) -> Typed:
        """``relative(E, INDEX)``: the query's vector dotted with row INDEX of the relative embeddings E
        (Shaw et al., the Music Transformer), times the attention's scale; 0 where INDEX is outside E's
        rows. Only in a bias. It reads a derived input ``float[heads, n, ROWS + 2]``, the call's
        ``scale * q . E[r]`` for every query and row between two zero columns (``runtime.plan.clusters``),
        at ``clamp(INDEX + 1, 0, ROWS + 1)``: an index in range by its bounds alone, which the kernels need
        not check. Computed from q and E at every call and differentiated like any bias input: no n x n x dk
        tensor."""
        if node.kwargs:
            raise self.error("'relative' takes no keyword arguments", node.kwargs[0].pos)
        if len(node.args) != 2:
            raise self.error(f"'relative' takes 2 arguments (EMBEDDINGS, INDEX), got {len(node.args)}", node.func_pos,
                             hint="bias relative(E, clamp(q - k, -radius, radius) + radius)")
        if not getattr(self, "in_bias", False):
            raise self.error("relative() is a score term: only a bias may read it", node.func_pos,
                             hint="bias relative(E, clamp(q - k, -radius, radius) + radius)")
        emb, index = node.args
        decl = self.inputs.get(emb.id) if isinstance(emb, ast.Name) else None
        if decl is None or decl.derived is not None:
            shown = f"'{emb.id}' is not an input" if isinstance(emb, ast.Name) else "this is not an input"
            raise self.error(f"the first argument of relative() must name the embeddings input: {shown}", emb.pos,
                             hint="declare it: input E: float[rows, dk] (or float[heads, rows, dk])")
        shapes = (("ROWS", "dk"), ("heads", "ROWS", "dk"))
        if decl.dtype != FLOAT or len(decl.dims) not in (2, 3) or decl.dim_names[-1] != "dk" or (
                len(decl.dims) == 3 and decl.dim_names[0] != "heads") or decl.dim_names[-2] in ("n", "nk", "heads"):
            raise self.error(f"the embeddings input '{emb.id}' must be float[{', '.join(shapes[0])}] or "
                             f"float[{', '.join(shapes[1])}], got {decl.dtype}[{', '.join(decl.dim_names)}]", emb.pos)
        if self.frame.queries != self.frame.keys:
            raise self.error("relative() needs the same layout for queries and keys (self-attention)", node.func_pos)
        rows = decl.dims[-2]
        at = self.expect(index, INT, "the row of relative()").expr
        name = f"__relative_{emb.id}"
        wanted = ir.InputDecl(name, FLOAT, (S.HEADS, self.frame.n, rows + 2), ("heads", "n", f"{decl.dim_names[-2]} + 2"),
                              ("relative", "q", emb.id))
        if self.inputs.get(name, wanted) != wanted:
            raise self.error(f"the input name '{name}' is taken: relative() needs it", node.func_pos)
        self.inputs[name] = wanted
        return Typed(FLOAT, wanted.function(S.H, self.frame.q_flat, S.Min(S.Max(at + 1, 0), rows + 1)))

    def _landmark(self, node: ast.Call) -> Typed:
        """``landmark(BLOCK)`` (Landmark Attention's grouped softmax): for key k of block ``c = k // BLOCK``, the
        query's score of the block's landmark, its last key ``c * BLOCK + BLOCK - 1``, less the log-sum-exp of its
        scores of the block's other keys; 0 in a last block shorter than BLOCK (it has no landmark). Scores at the
        attention's scale. Only in a bias: added to a key's score, the query's softmax gives each of the block's
        keys the landmark's probability shared by the block's own softmax. It reads a derived input
        ``float[heads, n, ceil(n / BLOCK)]`` computed from q and k at every call and differentiated like any bias
        input (``runtime.plan.clusters.landmark_gates``). BLOCK is a constant of at least 2."""
        if node.kwargs:
            raise self.error("'landmark' takes no keyword arguments", node.kwargs[0].pos)
        hint = "bias if k // block < q // block then landmark(block) else 0"
        if len(node.args) != 1:
            raise self.error(f"'landmark' takes 1 argument (BLOCK), got {len(node.args)}", node.func_pos, hint=hint)
        if not getattr(self, "in_bias", False):
            raise self.error("landmark() is a score term: only a bias may read it", node.func_pos, hint=hint)
        if self.frame.queries != self.frame.keys or self.frame.keys.kind != "seq":
            raise self.error("landmark() needs one sequence layout for queries and keys (self-attention)",
                             node.func_pos, hint="use 'tokens seq'")
        block = self.expect(node.args[0], INT, "the block of landmark()").expr
        if not block.is_number:
            raise self.error("the block of landmark() must be a constant (a number or a parameter)", node.args[0].pos,
                             hint="BLOCK keys a block, its landmark the last (Landmark Attention: 64)")
        if block < 2:
            raise self.error(f"the block of landmark() must be at least 2 (a key and its landmark), got {block}",
                             node.args[0].pos)
        name = "__landmark"
        wanted = ir.InputDecl(name, FLOAT, (S.HEADS, self.frame.n, -S.FloorDiv(-self.frame.n, block)),
                              ("heads", "n", f"ceil(n / {block})"), ("landmark", "q", int(block)))
        if self.inputs.get(name, wanted) != wanted:
            raise self.error(f"the input name '{name}' is taken, or landmark() is given two blocks", node.func_pos)
        self.inputs[name] = wanted
        return Typed(FLOAT, wanted.function(S.H, self.frame.q_flat, S.FloorDiv(self.frame.k_flat, block)))

    def _window(self, node: ast.Call) -> Typed:
        frame = self.frame
        if frame.queries != frame.keys:
            raise self.error("window() needs the same layout for queries and keys", node.func_pos)
        layout = frame.queries
        args = list(node.args)
        axis_names = [a for a, _ in layout.coordinate_axes]
        if not axis_names or (layout.segments and len(args) == 1):  # a sequence (or a concatenation's flat positions)
            if len(args) != 1:
                raise self.error(
                    f"window() on 'tokens seq' takes one positional argument (SIZE), got {len(args)}",
                    node.func_pos,
                    hint="window(SIZE, dilation = 1, stride = 1, causal = false)",
                )
            axis, length, qa, ka = None, frame.n, frame.q_flat, frame.k_flat
        else:
            if len(args) != 2:
                raise self.error(
                    f"window() on a grid takes two positional arguments (AXIS, SIZE), got {len(args)}",
                    node.func_pos,
                    hint="window(AXIS, SIZE, dilation = 1, stride = 1, causal = false)",
                )
            axis_node = args.pop(0)
            if not isinstance(axis_node, ast.Name) or axis_node.id not in axis_names:
                shown = axis_node.id if isinstance(axis_node, ast.Name) else "this"
                raise self.error(
                    f"'{shown}' is not an axis",
                    axis_node.pos,
                    hint=(did_you_mean(axis_node.id, axis_names) if isinstance(axis_node, ast.Name) else None)
                    or "axes: " + ", ".join(axis_names),
                )
            axis = axis_node.id
            length, qa, ka = layout.size_of(axis), layout.coordinate("q", axis), layout.coordinate("k", axis)
        values = {"size": (args[0], INT), "dilation": (None, INT), "stride": (None, INT), "causal": (None, BOOL)}
        for kw in node.kwargs:
            if kw.name not in WINDOW_KEYWORDS:
                raise self.error(f"window() has no argument '{kw.name}'", kw.pos,
                                 hint=did_you_mean(kw.name, WINDOW_KEYWORDS) or "arguments: dilation, stride, causal")
            values[kw.name] = (kw.value, values[kw.name][1])
        lowered = {}
        defaults = {"dilation": sympy.Integer(1), "stride": sympy.Integer(1), "causal": sympy.false}
        for name, (vnode, want) in values.items():
            if vnode is None:
                lowered[name] = defaults[name]
                continue
            e = self.expect(vnode, want, f"window {name}").expr
            self._no_positions(e, vnode.pos, f"window {name}", allow_head=False)
            if want == INT and e.is_number and e < 1:
                raise self.error(f"window {name} must be at least 1, got {e}", vnode.pos)
            if want == BOOL and e not in (sympy.true, sympy.false):
                raise self.error("window causal must be a constant bool", vnode.pos)
            lowered[name] = e
        # the caller's own arguments the window's sizes read (a called pattern's are its caller's expressions), and
        # in a stdlib pattern (a file the caller did not write) the parameters left at their defaults
        defaults = ({p.name: p.default for p in self.decl.params if p.default is not None and p.name not in self.params}
                    if self.module.is_stdlib else {})
        given = () if self.call_stack else tuple(
            (role, name, name, "" if name in self.params else f"its default, {defaults[name]}")
            for role, (vnode, _) in values.items() if vnode is not None and role != "causal"
            for name in dict.fromkeys(names_in(vnode))
            if (name in self.params or name in defaults) and name not in self.env_lets)
        self.windows.append(
            ir.WindowSite(axis, length, lowered["size"], lowered["dilation"], lowered["stride"], node.pos,
                          self.module.filename, self.module.source, given)
        )
        return Typed(BOOL, S.Window(qa, ka, length, lowered["size"], lowered["dilation"], lowered["stride"], lowered["causal"]))

    def _call_pattern(self, node: ast.Call) -> Typed:
        found = self.resolve(node.func, self.module)
        if found is None:
            known = [*BUILTINS, *self.module.by_name]
            raise self.error(f"unknown function or pattern '{node.func}'", node.func_pos,
                             hint=unknown_function_hint(node.func, known))
        module, decl = found
        if decl.kind != "pattern":
            raise self.error(f"'{node.func}' is a recurrence; only patterns can be used in a mask", node.func_pos)
        if any(isinstance(c, ast.Branch) for c in decl.clauses):
            raise self.error(f"'{node.func}' combines several attentions (branches): it has no single mask to "
                             "use here", node.func_pos, hint="call one of the patterns it is built from")
        if node.args:
            raise self.error(f"pattern '{node.func}' takes keyword arguments only", node.args[0].pos)
        ident = f"{module.filename}:{decl.name}"
        chain = (*self.call_stack, f"{self.module.filename}:{self.decl.name}")
        if ident in chain:
            names = [c.rsplit(":", 1)[1] for c in chain[chain.index(ident):]] + [decl.name]
            raise self.error(f"pattern '{decl.name}' calls itself: " + " -> ".join(names), node.func_pos)
        callee_params = {p.name: p for p in decl.params}
        given: dict[str, Typed] = {}
        for kw in node.kwargs:
            if kw.name not in callee_params:
                raise self.error(f"pattern '{decl.name}' has no parameter '{kw.name}'", kw.pos,
                                 hint=did_you_mean(kw.name, callee_params) or (
                                     "parameters: " + ", ".join(callee_params) if callee_params else None))
            given[kw.name] = self.expr(kw.value)
        for name, typed in given.items():
            default = callee_params[name].default
            want = None if default is None else kind_of_value(default)
            kw = next(k for k in node.kwargs if k.name == name)
            if want is not None and typed.type != want and not (want == FLOAT and typed.type == INT):
                raise self.error(f"parameter '{name}' of '{decl.name}' is {want}, got {article(typed.type)}", kw.value.pos)
            bound = callee_params[name].bound
            broken = bound_violation(bound, typed.expr) if bound and typed.type != BOOL else None
            if broken:
                raise self.error(f"parameter '{name}' of '{decl.name}' {broken}", kw.value.pos,
                                 hint=f"'{decl.name}' declares {name} {bound[0]} {bound[1]}")
        frame = self._callee_frame(module, decl, node)
        callee = type(self)(module, decl, {}, self.resolve, strict=True, frame=frame, call_stack=chain, param_exprs=given)
        try:
            result = callee.lower()
        except SpecError as err:
            if err.filename == module.filename and module is not self.module:
                raise self.error(f"in pattern '{decl.name}' called here: {err.message}", node.func_pos) from None
            raise
        for name, inp in callee.inputs.items():
            mine = self.inputs.get(name)
            if mine is None:
                self.inputs[name] = inp
            elif (mine.dtype, mine.dims) != (inp.dtype, inp.dims):
                raise self.error(f"input '{name}' of '{decl.name}' differs from this pattern's '{name}'", node.func_pos)
        self.windows.extend(callee.windows)
        return Typed(BOOL, result.mask)

    def _callee_frame(self, module: ast.Module, decl: ast.Declaration, node: ast.Call) -> Frame:
        """The callee sees the caller's positions; its grid axes and named segments must exist in the caller."""
        frame = self.frame
        layouts = [c for c in decl.clauses if isinstance(c, ast.LayoutClause)]
        sizes = dict(frame.sizes)
        q_layout, k_layout = frame.queries, frame.keys
        for c in layouts:
            segments = c.layout.segments
            for a in [a for seg in segments for a in seg.axes] if segments else c.layout.axes:
                for layout in (q_layout, k_layout):
                    if a.name not in (name for name, _ in layout.coordinate_axes):
                        raise self.error(
                            f"pattern '{decl.name}' uses axis '{a.name}', which this pattern's layout lacks",
                            node.func_pos,
                        )
                if isinstance(a.size, str):
                    sizes[a.size] = q_layout.size_of(a.name)
            for seg in segments:
                if seg.kind != "seq" or not isinstance(seg.size, str):
                    continue
                for layout in (q_layout, k_layout):
                    if seg.size not in layout.segment_names:
                        raise self.error(
                            f"pattern '{decl.name}' uses segment '{seg.size}', which this pattern's layout lacks",
                            node.func_pos,
                        )
                sizes[seg.size] = next(s.size for s in q_layout.segments if s.name == seg.size)
        return Frame(q_layout, k_layout, sizes)
