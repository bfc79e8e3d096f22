"""Input indices of the bias, checked on the attended pairs for ``backend="flex"``.

REFERENCE.md: an index outside its input is a ``SpecError`` naming the input, checked in the bias on
the (query, key) pairs the pattern attends only. A Flex ``score_mod`` cannot report anything (a pure
function: the generated reads clamp their indices), so the runner checks before the call, with the
Triton kernels' rule for which indices need a check (``compiler.codegen.triton.bias.bias_index_checks``:
literal indices are checked at generation, indices of positions only are proven by intervals over the
whole matrix, an index that reads an input is never proven):

- an index of positions only that the intervals do not prove (``rpb[h, q - k + W]`` beside a band
  mask) is checked once per plan (its sizes, and the inputs of a data-dependent mask), on the host:
  later calls pay nothing;
- an index that reads an input (``w[idx[k]]``) is checked at every call, on the host (one copy of
  the inputs it reads, as the Triton backend reads its error buffer after each launch).

The pairs are those of the plan's tile lists (``runtime.plan.tile_plan``: the mask evaluated on
PARTIAL tiles, the routing selection applied), never N x N. The error names the first offending
pair in (batch, head, query, key) order, as the reference does.
"""

from __future__ import annotations

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....compiler.codegen.triton.bias import bias_index_checks
from ....core import ir
from ....core import symbols as S
from ....core.errors import SpecError
from ...plan.tile_plan import Plan, TileBlock, chunks, trim_lists, visited_lists

#: An index to check: (the input read, the dimension, the input's name, the dimension's size).
Check = tuple[sympy.Basic, int, str, int]


def index_checks(pat: ir.PatternIR, bound: E.Bound) -> tuple[tuple[Check, ...], tuple[Check, ...]]:
    """(checks once per plan: indices of positions only, checks at every call: indices that read an
    input), in ``bias_index_checks``' order; both empty when every index is proven in range."""
    static, dynamic = [], []
    for site, dim in bias_index_checks(pat, bound):
        name = S.input_name(site.func)
        size = int(sympy.sympify(pat.input(name).dims[dim]).subs(bound.subs))
        (dynamic if E.input_names(site.args[dim]) else static).append((site, dim, name, size))
    return tuple(static), tuple(dynamic)


def inputs_read(pat: ir.PatternIR, checks: tuple[Check, ...]) -> frozenset[str]:
    """The inputs a check reads: those of the mask (the attended pairs), the indices and the sites."""
    names = set(E.input_names(pat.mask))
    for site, dim, name, _ in checks:
        names |= E.input_names(site.args[dim]) | {name}
    return frozenset(names)


def first_error(plan: Plan, checks: tuple[Check, ...], inputs: dict, batched: frozenset) -> SpecError | None:
    """The error of the first check (in order) with an index out of range on a pair ``plan``
    attends, at its first such pair in (batch, head, query, key) order; None when there is none.
    ``inputs``: host tensors (a batch row per call batch element where ``batched``)."""
    if not checks:
        return None
    bound, sched = plan.bound, plan.schedule
    H, n, nk = bound.heads, bound.n, bound.nk
    found: list[tuple[int, int] | None] = [None] * len(checks)  # (linear position, index value)
    nQ, Tq = plan.q_tokens.index.shape
    Tk = plan.k_tokens.index.shape[1]
    with torch.no_grad():
        for cls, bsel, heads in plan.groups():
            ins = {name: t[bsel] if name in batched else t for name, t in inputs.items()}
            head = torch.tensor(heads).view(1, -1, 1, 1, 1)
            first_b = bsel.start or 0
            width = max(1, int((sched.full_count[cls] + sched.partial_count[cls]).max()) if nQ else 1)
            for own in chunks(nQ, len(heads) * Tq * width * Tk):
                lists = trim_lists(visited_lists(sched, cls, own, False))
                if sum(idx.shape[1] for idx, _ in lists) == 0:
                    continue
                blk = TileBlock(plan, heads, own, lists, False, ins, set(batched), bsel)
                allowed = blk.allowed()
                env = E.token_env(plan.pattern, bound, blk.q_tok, blk.k_tok, head)
                ev = E.Evaluator(env, ins, set(batched), None, allowed)  # nested reads checked there too
                for i, (site, dim, _, size) in enumerate(checks):
                    index = E.as_tensor(ev(site.args[dim]))
                    bad = ((index < 0) | (index >= size)) & allowed
                    if not bool(bad.any()):
                        continue
                    rows = torch.arange(bad.shape[0]).view(-1, 1, 1, 1, 1) + first_b
                    b, h, q, k, bad, index = torch.broadcast_tensors(rows, head, blk.q_tok, blk.k_tok, bad, index)
                    where = (((b * H + h) * n + q) * nk + k)[bad]
                    j = int(where.argmin())
                    pos, value = int(where[j]), int(index[bad][j])
                    if found[i] is None or pos < found[i][0]:
                        found[i] = (pos, value)
    for (_, dim, name, size), hit in zip(checks, found, strict=True):
        if hit is not None:
            return E.index_error(name, dim, hit[1], size, guarded=True)
    return None
