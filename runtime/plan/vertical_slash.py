"""Vertical-slash routing (MInference): the columns and diagonals a call attends, selected on q's
device once per call from the softmax of its last queries, as the two derived flag inputs the checker
declared (``spec.check_vertical_slash``): ``[B, heads, n]`` (1 for a selected key column) and
``[B, heads, 2n - 1]`` (1 at ``o + n - 1`` for a selected offset ``o = q - k``). From there on the
pattern is an ordinary mask over call-time inputs on every backend.

The rule (spec/REFERENCE.md; MInference's ``vertical_and_slash_kernel``, minference/modules/
minference_forward.py at commit fb56c917): with ``nk`` keys (a self-attention sequence; queries after
a KV cache stand at the last positions) and ``L' = min(L, queries of the call)``, the last ``L'``
queries at absolute positions ``p_i`` score every key, ``s[i, j] = scale * q_i . k_j`` with
``j > p_i`` at -inf, softmax over j in fp32 (fp64 for fp64 inputs); ``vertical[j] = sum_i P[i, j]``,
``slash[o] = sum_i P[i, p_i - o]`` (terms with ``p_i - o < 0`` absent) for ``o in [0, nk)``; kept
units score +inf, NaN scores -inf; the ``min(nk, V)`` highest columns and ``min(nk, S)`` highest
offsets are selected, ties to the lower index (key, offset). Per batch row and per query head (with
GQA a query head's keys are its KV head's). Not differentiated.
"""

from __future__ import annotations

import sympy
import torch

from ...compiler.analysis.evaluate import Evaluator, as_tensor
from ...core import ir
from ...core import symbols as S
from ..compiling import compiling
from .cache import PlanCache


def rule_of(pat) -> ir.VerticalSlash | None:
    """The vertical-slash rule of ``pat`` (None when it has none)."""
    for d in getattr(pat, "inputs", ()):
        if d.derived is not None and d.derived[0] == "vertical_slash":
            return d.derived[2]
    return None


@torch.compiler.assume_constant_result  # sympy is not traceable: dynamo calls it once, as a constant
def _kept(rule, count: int, heads: int, dk: int) -> torch.Tensor:
    """The rule's forced columns and diagonals: bool ``[2, heads, count]`` (one constant for dynamo)."""
    return torch.stack([_keep(rule.keep_columns, S.K, count, heads, dk),
                        _keep(rule.keep_diagonals, S.Q, count, heads, dk)])


#: The forced flags moved to a device, per (rule, keys, heads, head dim, device): made on the host and copied
#: once, not at every call (a copy is a call to ask for). Bounded: a decoding loop has keys of every count.
_KEPT_ON = PlanCache()


def kept_on(rule, count: int, heads: int, dk: int, device: torch.device) -> torch.Tensor:
    """``_kept`` on ``device``, kept there for later calls (traced by dynamo, the constant is moved as before)."""
    if compiling():
        return _kept(rule, count, heads, dk).to(device)
    key = (rule, count, heads, dk, device)
    if key not in _KEPT_ON:
        _KEPT_ON[key] = _kept(rule, count, heads, dk).to(device)
    return _KEPT_ON[key]


def _keep(expr: sympy.Basic | None, symbol: sympy.Symbol, count: int, heads: int, dk: int) -> torch.Tensor:
    """A keep condition at ``symbol = 0 .. count - 1`` for every head: bool ``[heads, count]``."""
    if expr is None:
        return torch.zeros(heads, count, dtype=torch.bool)
    sizes = {S.N: count, S.NK: count, S.HEADS: heads, S.DK: dk}
    env = {symbol: torch.arange(count).view(1, -1), S.H: torch.arange(heads).view(-1, 1)}
    value = as_tensor(Evaluator(env, {}, set(), None)(S.substitute(expr, sizes)), torch.bool)
    return torch.broadcast_to(value, (heads, count))


def top_flags(score: torch.Tensor, count: int, forced: torch.Tensor) -> torch.Tensor:
    """int64 flags of the ``count`` highest scores along the last dimension (forced ones +inf, NaN
    -inf), ties to the lower index."""
    score = torch.where(forced, torch.inf, torch.nan_to_num(score, nan=-torch.inf))
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :count]
    return torch.zeros(score.shape, dtype=torch.int64, device=score.device).scatter_(-1, top, 1)


def rows_summed(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over its rows (dim -2) pairwise, a level at a time (log2 of the rows elementwise additions
    on a GPU): every column goes through the same additions in the same order, so columns of equal terms get
    exactly equal sums and the rule's ties stay ties. A reduction kernel sums its vector lanes and its tail in
    different orders: with all-zero queries, 19 columns that tie exactly had come out apart in the last bit,
    and the selection took column 16 for column 0."""
    while x.shape[-2] > 1:
        even = x.shape[-2] // 2 * 2
        pairs = x[..., 0:even:2, :] + x[..., 1:even:2, :]
        x = torch.cat([pairs, x[..., even:, :]], dim=-2) if even < x.shape[-2] else pairs
    return x[..., 0, :]


#: The most score elements (last queries x keys x heads) held at once: heads are scored in groups.
SCORE_ELEMENTS = 1 << 25


def scores(q: torch.Tensor, k: torch.Tensor, last: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical ``[B, H, nk]``, slash ``[B, H, nk]`` by offset) of ``q`` ``[B, H, Nq, D]`` against ``k``
    ``[B, H, nk, D]`` (same heads), the queries being the last Nq of the nk positions."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    L = min(last, Nq)
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    pos = torch.arange(Nk - L, Nk, device=q.device)
    keys = torch.arange(Nk, device=q.device)
    back = pos[:, None] - keys[None, :]  # the key of offset o on the row of query p_i
    ql, kf = q[:, :, Nq - L:].flatten(0, 1), k.flatten(0, 1)  # [B * H, ., D]
    vertical = torch.empty(B * H, Nk, dtype=dtype, device=q.device)
    slash = torch.empty_like(vertical)
    group = max(1, SCORE_ELEMENTS // (L * Nk))
    for a in range(0, B * H, group):
        b = min(B * H, a + group)
        s = (ql[a:b].to(dtype) @ kf[a:b].to(dtype).transpose(-1, -2)) * scale  # [group, L, nk]
        p = torch.softmax(s.masked_fill(back < 0, -torch.inf), dim=-1)
        vertical[a:b] = rows_summed(p)
        along = p.gather(-1, back.clamp(min=0).expand(b - a, L, Nk))
        slash[a:b] = rows_summed(torch.where(back >= 0, along, 0))
    return vertical.view(B, H, Nk), slash.view(B, H, Nk)


def derive(pat, q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> dict[str, torch.Tensor]:
    """The two flag inputs of this call (names as the checker declared them), on q's device:
    ``q`` ``[B, Hq, Nq, D]``, ``k`` ``[B, Hkv, nk, D]``; ``scale`` the call's (default ``D ** -0.5``)."""
    rule = rule_of(pat)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    with torch.no_grad():
        kk = k.detach().repeat_interleave(Hq // Hkv, dim=1) if Hkv != Hq else k.detach()
        vertical, slash = scores(q.detach(), kk, int(rule.last), scale)
        keep_cols, keep_diags = kept_on(rule, Nk, Hq, D, q.device).unbind(0)
        cols = top_flags(vertical, min(Nk, int(rule.vertical)), keep_cols)
        by_offset = top_flags(slash, min(Nk, int(rule.slash)), keep_diags)
        diags = torch.cat([by_offset.new_zeros(B, Hq, Nk - 1), by_offset], dim=-1)  # index o + nk - 1
    names = {d.derived[1]: d.name for d in pat.inputs if d.derived is not None and d.derived[0] == "vertical_slash"}
    return {names["columns"]: cols, names["diagonals"]: diags}
