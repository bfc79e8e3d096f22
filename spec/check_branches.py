"""Combined patterns: several attentions over the same queries (``branch NAME`` ...), summed by
``combine G * NAME + ...``. Each branch is checked by the ordinary ``Checker`` as a pattern of its
own (the clauses before the first ``branch``, then the branch's), so every branch lowers to an
ordinary ``PatternIR`` that every backend runs; what is new is checked here and lowered to
``ir.CombinedIR``:

- ``keys pooled(mean, SIZE)`` in a branch: the branch attends to the means of runs of SIZE keys; it
  is checked as a cross attention (``queries seq``, ``keys seq``: ``k`` is a run's index, ``nk`` the
  number of runs);
- ``route ... by probs(NAME)``: a route scored by an earlier pooled branch's attention probabilities
  (one score per run of that branch's pooling, so the route's blocks must be those runs); it is
  checked as ``by q @ mean(k)`` and then reads its scores from an input the call computes;
- ``combine``: a sum of terms ``GATE * BRANCH`` (or ``BRANCH``), each branch at most once, every
  gate an input ``float[heads, n]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sympy

from ..core import ir
from ..core import symbols as S
from ..core.errors import Pos, SpecError, did_you_mean
from . import ast
from .check_types import INT
from .checker import Checker

#: The clauses a branch may hold; the layout, lets and inputs stand before the first branch.
BRANCH_CLAUSES = "mask, bias, softcap, route, keys pooled(mean | max, SIZE)"

#: ``keys pooled(F, SIZE)``: the runs' means (keys and values), or their maxima (keys) and their own attention
#: by the maximum query (values: Combiner's summaries)
POOLINGS = ("mean", "max")


def has_branches(decl: ast.Declaration) -> bool:
    """Whether a declaration uses the combined-pattern clauses (then ``lower_combined`` checks it)."""
    return any(isinstance(c, ast.Branch | ast.Combine | ast.PooledKeys | ast.BranchRoute) for c in decl.clauses)


def scores_input(branch: str) -> str:
    """The name of the input that carries a ``by probs(BRANCH)`` route's scores (not a name the language
    can declare, so it never clashes with the pattern's own inputs)."""
    return f"probs({branch})"


def _error(module: ast.Module, message: str, pos: Pos | None, hint: str | None = None) -> SpecError:
    return SpecError(message, pos, filename=module.filename, source=module.source, hint=hint)


def _split(module: ast.Module, decl: ast.Declaration):
    """(shared clauses, [(Branch, clauses)], Combine): errors for clauses in the wrong place."""
    shared: list[ast.Clause] = []
    branches: list[tuple[ast.Branch, list[ast.Clause]]] = []
    combine = None
    for c in decl.clauses:
        if combine is not None:
            raise _error(module, "'combine' ends a combined pattern: no clause may follow it", c.pos)
        if isinstance(c, ast.Branch):
            if any(b.name == c.name for b, _ in branches):
                first = next(b for b, _ in branches if b.name == c.name)
                raise _error(module, f"branch '{c.name}' is declared twice (first at line {first.pos.line})",
                             c.name_pos)
            branches.append((c, []))
        elif isinstance(c, ast.Combine):
            if not branches:
                raise _error(module, "'combine' sums branches: declare them first with 'branch NAME'", c.pos)
            combine = c
        elif not branches:
            if isinstance(c, ast.PooledKeys | ast.BranchRoute):
                what = "keys pooled(...)" if isinstance(c, ast.PooledKeys) else "a route by probs(...)"
                raise _error(module, f"{what} belongs to a branch", c.pos,
                             hint="open one with 'branch NAME' (a pattern with branches sums them with 'combine')")
            if not isinstance(c, ast.LayoutClause | ast.Let | ast.Input):
                raise _error(module, "in a pattern with branches, this clause belongs to a branch: before the "
                                     "first 'branch' stand only the layout, lets and inputs", c.pos)
            shared.append(c)
        else:
            if isinstance(c, ast.LayoutClause | ast.Let | ast.Input):
                raise _error(module, "the layout, lets and inputs are shared by every branch: declare them "
                                     "before the first 'branch'", c.pos, hint=f"a branch holds {BRANCH_CLAUSES}")
            if isinstance(c, ast.Update):
                raise _error(module, "'update' is a recurrence's clause (the delta rule)", c.pos)
            if isinstance(c, ast.ExprClause) and c.keyword in ("weights", "scale"):
                raise _error(module, f"a branch is a softmax attention: '{c.keyword}' is not taken in a combined "
                                     "pattern in this version", c.pos, hint=f"a branch holds {BRANCH_CLAUSES}")
            branches[-1][1].append(c)
    if not branches:
        raise _error(module, "'combine' needs branches", decl.pos)
    if combine is None:
        raise _error(module, f"'{decl.name}' declares branches but no 'combine' clause", decl.name_pos,
                     hint="combine G1 * " + " + G2 * ".join(b.name for b, _ in branches[:2]))
    return shared, branches, combine


def _terms(module: ast.Module, node: ast.Expr) -> list[ast.Expr]:
    if isinstance(node, ast.Binary) and node.op == "+":
        return _terms(module, node.left) + _terms(module, node.right)
    if isinstance(node, ast.Binary) and node.op == "-":
        raise _error(module, "'combine' is a sum of terms (GATE * BRANCH): write the sign into the gate",
                     node.pos)
    return [node]


def _combine(module: ast.Module, combine: ast.Combine, names: list[str], inputs: dict[str, ir.InputDecl]
             ) -> tuple[tuple[tuple[str | None, str], ...], tuple[ir.InputDecl, ...], str]:
    """The terms (gate or None, branch), the gates, each checked at its position, and the merge: "sum" (``G1 *
    A + G2 * B``) or "softmax" (``softmax(A, B, ...)``: one softmax over every branch's keys, no gates)."""
    terms: list[tuple[str | None, str]] = []
    gates: dict[str, ir.InputDecl] = {}
    hint = "combine G1 * " + " + G2 * ".join(names[:2])
    node = combine.value
    if isinstance(node, ast.Call) and node.func == "softmax":
        if node.kwargs or len(node.args) < 2 or not all(isinstance(a, ast.Name) for a in node.args):
            raise _error(module, "'combine softmax(...)' takes two or more branches by name", node.pos,
                         hint="combine softmax(" + ", ".join(names[:2]) + ")" if len(names) > 1 else
                         "declare a second branch: softmax(...) merges the keys of several")
        for a in node.args:
            if a.id not in names:
                raise _error(module, f"no branch '{a.id}'", a.pos,
                             hint=did_you_mean(a.id, names) or "branches: " + ", ".join(names))
            if any(b == a.id for _, b in terms):
                raise _error(module, f"branch '{a.id}' appears twice in 'combine'", a.pos)
            terms.append((None, a.id))
        return tuple(terms), (), "softmax"
    for term in _terms(module, node):
        if isinstance(term, ast.Name):
            gate, branch = None, term
        elif (isinstance(term, ast.Binary) and term.op == "*" and isinstance(term.left, ast.Name)
              and isinstance(term.right, ast.Name)):
            swap = term.left.id in names and term.right.id not in names  # BRANCH * GATE
            gate, branch = (term.right, term.left) if swap else (term.left, term.right)
        else:
            raise _error(module, "a term of 'combine' is GATE * BRANCH or BRANCH (a gate is an input "
                                 "float[heads, n])", term.pos, hint=hint)
        if branch.id not in names:
            raise _error(module, f"no branch '{branch.id}'", branch.pos,
                         hint=did_you_mean(branch.id, names) or "branches: " + ", ".join(names))
        if any(b == branch.id for _, b in terms):
            raise _error(module, f"branch '{branch.id}' appears twice in 'combine'", branch.pos)
        if gate is not None:
            decl = inputs.get(gate.id)
            if decl is None:
                raise _error(module, f"'{gate.id}' is not an input: a gate is an input float[heads, n]", gate.pos,
                             hint=did_you_mean(gate.id, inputs) or f"declare it: input {gate.id}: float[heads, n]")
            if decl.dtype != "float" or decl.dim_names != ("heads", "n"):
                raise _error(module, f"gate '{gate.id}' must be float[heads, n], is "
                                     f"{decl.dtype}[{', '.join(decl.dim_names)}]", gate.pos)
            gates[gate.id] = decl
        terms.append((gate.id if gate is not None else None, branch.id))
    return tuple(terms), tuple(gates.values()), "sum"


def _pooled(module: ast.Module, shared: list[ast.Clause], clauses: list[ast.Clause]):
    """A branch's ``keys pooled(...)`` clause (or None) and its clauses as the checker takes them."""
    pooled = [c for c in clauses if isinstance(c, ast.PooledKeys)]
    if not pooled:
        return None, list(shared) + clauses
    c = pooled[0]
    if len(pooled) > 1:
        raise _error(module, "'keys pooled(...)' is given twice in this branch", pooled[1].pos)
    if c.role != "keys":
        raise _error(module, f"only the keys are pooled: 'keys pooled({c.func}, SIZE)'", c.pos)
    if c.func not in POOLINGS:
        raise _error(module, f"unknown pooling '{c.func}' (this version pools by {' or '.join(map(repr, POOLINGS))})",
                     c.func_pos)
    layouts = [s for s in shared if isinstance(s, ast.LayoutClause)]
    if any(s.role != "tokens" or s.layout.kind != "seq" for s in layouts):
        raise _error(module, "pooled keys need the pattern's layout to be 'tokens seq'", c.pos)
    at = c.pos
    own = [ast.LayoutClause(at, "queries", ast.Layout("seq", (), at)), ast.LayoutClause(at, "keys", ast.Layout("seq", (), at))]
    rest = [s for s in shared if not isinstance(s, ast.LayoutClause)]
    return c, own + rest + [x for x in clauses if x is not c]


def _route_clause(module: ast.Module, clauses: list[ast.Clause], earlier: dict[str, ir.Branch]):
    """``route ... by probs(NAME)`` turned into the ordinary route it is checked as, and NAME."""
    for i, c in enumerate(clauses):
        if not isinstance(c, ast.BranchRoute):
            continue
        side = c.score
        if side.func != "probs":
            raise _error(module, "a route scores by 'q @ mean(k)', 'mean(q) @ mean(k)', 'q @ bound(k)', 'q @ k', or in a branch "
                                 "by another branch's probabilities: 'probs(BRANCH)'", side.pos)
        if c.unit != "blocks":
            raise _error(module, "a route by probs(BRANCH) selects blocks: 'blocks(SIZE)'", c.unit_pos)
        source = earlier.get(side.arg)
        if source is None:
            raise _error(module, f"no earlier branch '{side.arg}' (a route reads the probabilities of a branch "
                                 "declared before it)", side.pos, hint=did_you_mean(side.arg, earlier))
        plain = source.pattern
        if source.pool is None or plain.bias is not None or plain.softcap is not None or plain.route is not None:
            raise _error(module, f"probs({side.arg}) needs a branch with pooled keys and only a mask (no bias, "
                                 "softcap or route)", side.pos)
        route = ast.Route(c.pos, c.topk, c.blocks, ast.ScoreSide(None, "q", side.pos),
                          ast.ScoreSide("mean", "k", side.pos), c.keep, c.shared)
        return clauses[:i] + [route] + clauses[i + 1:], c, source
    return clauses, None, None


def _lower_branch(module, decl, name: str, clauses, params, resolve, strict) -> tuple[ir.PatternIR, Checker]:
    sub = ast.Declaration("pattern", f"{decl.name}.{name}", decl.params, tuple(clauses), decl.pos, decl.name_pos)
    checker = Checker(module, sub, params, resolve, strict=strict)
    return checker.lower(), checker


def lower_combined(module: ast.Module, decl: ast.Declaration, params: dict, resolve: Callable,
                   strict: bool = True) -> ir.CombinedIR:
    """Check a declaration with branches and lower it to ``ir.CombinedIR``."""
    if decl.kind != "pattern":
        c = next(c for c in decl.clauses if isinstance(c, ast.Branch | ast.Combine | ast.PooledKeys | ast.BranchRoute))
        raise _error(module, "branches combine softmax attentions: declare them in a 'pattern'", c.pos)
    if not any(isinstance(c, ast.Branch | ast.Combine) for c in decl.clauses):  # a plain pattern, mistyped
        c = next(c for c in decl.clauses if isinstance(c, ast.PooledKeys | ast.BranchRoute))
        if isinstance(c, ast.BranchRoute) and c.score.func != "probs":  # `by mean(k)` alone: no '@'
            raise _error(module, "a route scores by 'q @ mean(k)', 'mean(q) @ mean(k)', 'q @ bound(k)', 'q @ k' or "
                                 "'QI @ KI'",
                         c.score.pos, hint="route topk(K) blocks(SIZE) by q @ mean(k)")
        what = "keys pooled(...)" if isinstance(c, ast.PooledKeys) else "a route by probs(...)"
        raise _error(module, f"{what} belongs to a branch", c.pos,
                     hint="open one with 'branch NAME' (a pattern with branches sums them with 'combine')")
    shared, branch_clauses, combine = _split(module, decl)
    # the shared part alone: its inputs (the gates among them) and the parameters, checked once
    _, head = _lower_branch(module, decl, "shared", shared, params, resolve, strict)
    branch_names = [b.name for b, _ in branch_clauses]
    for branch, _ in branch_clauses:
        if branch.name in head.inputs or branch.name in head.env_params:
            raise _error(module, f"branch '{branch.name}' has the name of "
                                 + ("an input" if branch.name in head.inputs else "a parameter"), branch.name_pos,
                         hint="'combine' reads gates and branches by name: give the branch its own")
    terms, gates, merge = _combine(module, combine, branch_names, head.inputs)
    gate_set = {g.name for g in gates}
    # a branch does not see the gates (the combination reads them)
    shared = [c for c in shared if not (isinstance(c, ast.Input) and c.name in gate_set)]
    done: dict[str, ir.Branch] = {}
    for branch, clauses in branch_clauses:
        pooled, clauses = _pooled(module, shared, clauses)
        clauses, by_probs, source = _route_clause(module, clauses, done)
        pat, checker = _lower_branch(module, decl, branch.name, clauses, params, resolve, strict)
        pool = None
        if pooled is not None:
            size = _pool_size(module, checker, pooled)
            pool = (pooled.func, size)
        if by_probs is not None:
            block = pat.route.block[0]
            if sympy.simplify(block - source.pool[1]) != 0:
                raise _error(module, f"the route's blocks ({block}) must be the runs that '{source.name}' pools "
                                     f"({source.pool[1]}): probs({source.name}) scores one block per run",
                             by_probs.blocks[0].pos)
            nblocks = -sympy.floor(-S.NK / block)
            # one row per query of the call (after a KV cache, the present queries only: S.NQ)
            scores = ir.InputDecl(scores_input(source.name), "float", (S.HEADS, S.NQ, nblocks),
                                  ("heads", "nq", "blocks"))
            r = pat.route.params
            route = ir.top_k_route(r.topk, r.block, r.score, r.keep, r.shared, r.indexer, scores=scores.name)
            pat = dataclasses.replace(pat, route=route, inputs=(*pat.inputs, scores))
        done[branch.name] = ir.Branch(branch.name, pat, pool, source.name if source is not None else None)
    read = {b.probs_of for b in done.values()} | {b for _, b in terms}
    for branch, _ in branch_clauses:
        if branch.name not in read:
            raise _error(module, f"branch '{branch.name}' is neither combined nor read by a route", branch.name_pos,
                         hint=f"add a term to 'combine' (G * {branch.name})")
    inputs = {g.name: g for g in gates}
    for b in done.values():
        for d in b.pattern.inputs:
            if b.probs_of is None or d.name != scores_input(b.probs_of):
                inputs.setdefault(d.name, d)
    params_ir = next(iter(done.values())).pattern.params
    return ir.CombinedIR(decl.name, tuple(done.values()), terms, gates, tuple(inputs.values()), params_ir,
                         module.filename, module.source, merge)


def _pool_size(module: ast.Module, checker: Checker, c: ast.PooledKeys) -> sympy.Expr:
    """The pooling size: an int literal or an int parameter, at least 1 when known."""
    if isinstance(c.size, int):
        size = sympy.Integer(c.size)
    else:
        typed = checker.env_params.get(c.size)
        if typed is None:
            raise _error(module, f"the pooling size must be an int or an int parameter; '{c.size}' is not a "
                                 "parameter", c.size_pos, hint=did_you_mean(c.size, checker.env_params))
        if typed.type != INT:
            raise _error(module, f"the pooling size must be an int, '{c.size}' is {typed.type}", c.size_pos)
        size = typed.expr
    if size.is_number and size < 1:
        raise _error(module, f"the pooling size must be at least 1, got {size}", c.size_pos)
    return size
