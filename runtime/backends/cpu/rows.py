"""Decoding rows: the CPU backend's path for a few queries after a KV cache.

A decode step has ``n`` (<= ``DECODE_ROWS``) queries at the END of ``nk`` keys
(``Bound.q_offset = nk - n``) and a new ``nk`` every step, so a tile schedule
(``compiler.analysis.tiles.classify_tiles``: interval reasoning over the sympy mask) would
be rebuilt at every step. Instead the plan of those rows is their exact mask,
evaluated once per (n, nk) on the ``n x nk`` positions with torch (no
classification, no interval analysis): O(n * nk) elementwise work, the order of
reading the KV cache once, which the attention does anyway. The keys some row
may attend form the visited columns: a contiguous run (causal, sliding window)
is a view of the cache, no copy; a few runs (sinks + window) are attended run
by run and merged by their log-sum-exp; many runs are gathered, or read
through their span when they fill most of it.

Why not a tile schedule extended step by step: for one row the exact allowed
set costs what a pass over the cache costs, whereas the interval analysis of
the last Q tile would still be sympy work per step, be only tile-exact, and
need the same mask evaluation on its PARTIAL tiles.

The forward runs torch's fused CPU attention kernel on the visited keys (the
mask and the bias/decay terms as a float mask; plain torch with a softcap);
grouped query heads share their key head as one block of rows, without
repeating the cache. The backward recomputes the rows with plain torch under
autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.weights import log_weights
from ....core import ir
from ...numerics import fox_pairs, fox_prefix, merge_lse_parts, row_weights, soft_capped
from ...plan import block_max, routing
from . import fused

#: Visited keys in at most this many runs (e.g. sinks + window) are attended run by run
#: (views of the cache, no copy); more are gathered.
MAX_RUNS = 4
Cols = slice | tuple | torch.Tensor

#: Query rows after a KV cache (``nk > n``) up to which the CPU backend takes this path.
DECODE_ROWS = 16
#: Substituted expressions a runner keeps for its decoding rows (then cleared).
SUBSTITUTION_MEMO = 64
#: A sparse column set is read through the span of its first and last key (a view,
#: masked) when it holds at least this fraction of that span, else gathered.
SPAN_FILL = 0.5


def applies(bound: E.Bound) -> bool:
    """Whether a call takes the decoding-rows path: a few queries after a KV cache."""
    return bound.q_offset > 0 and not bound.is_block and bound.n <= DECODE_ROWS


@dataclass
class RowPlan:
    """The plan of ``n`` query rows against all ``nk`` keys (see the module docstring).

    ``allowed``: the exact mask ``[B | 1, H | 1, n, nk]`` for a mask without call-time
    inputs (None: evaluated per call); ``cols``/``col_allowed``: the visited keys and the
    mask on them (None: all allowed), for a static mask without routing."""

    pattern: ir.PatternIR
    bound: E.Bound
    mask: sympy.Basic
    bias: sympy.Basic | None
    softcap: torch.Tensor | None
    allowed: torch.Tensor | None
    cols: Cols | None = None
    col_allowed: torch.Tensor | None = None
    schedule = None  # no tile schedule (``Attention.schedule`` is None for decoding rows)

    @property
    def static_mask(self) -> bool:
        return not E.input_names(self.mask)

    @classmethod
    def build(cls, pat: ir.PatternIR, bound: E.Bound, tensors: dict, batched: set[str],
              memo: dict | None = None) -> RowPlan:
        """``memo``: substituted expressions kept across steps (by the sizes they read: a mask
        that does not mention ``n``/``nk`` is substituted once for every step)."""
        memo = {} if memo is None else memo

        def sub(expr):
            if expr is None:
                return None
            key = (expr, tuple(sorted((str(s), v) for s, v in bound.subs.items() if s in expr.free_symbols)))
            if key not in memo:
                if len(memo) >= SUBSTITUTION_MEMO:
                    memo.clear()
                memo[key] = E.substitute(expr, bound)
            return memo[key]

        softcap = E.head_values(pat.softcap, bound.subs, bound.heads) if pat.softcap is not None else None
        plan = cls(pat, bound, sub(pat.mask), sub(pat.bias), softcap, None)
        if plan.static_mask:
            plan.allowed = plan.row_mask(tensors, batched)
            if pat.route is None:
                plan.cols, plan.col_allowed = visited_columns(plan.allowed)
        return plan

    def env(self, keys: torch.Tensor) -> dict:
        """Symbol values over ``[1, H, n, K]`` for the query rows and the given keys."""
        rows = torch.arange(self.bound.n).view(1, 1, -1, 1)
        return E.token_env(self.pattern, self.bound, rows, keys.view(1, 1, 1, -1),
                           torch.arange(self.bound.heads).view(1, -1, 1, 1))

    def row_mask(self, tensors: dict, batched: set[str]) -> torch.Tensor:
        """The exact mask of the rows over every key: bool ``[B | 1, H | 1, n, nk]``."""
        batch = next((tensors[n].shape[0] for n in batched), None)
        value = E.Evaluator(self.env(torch.arange(self.bound.nk)), tensors, batched, batch)(self.mask)
        value = E.as_tensor(value, torch.bool)
        value = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape)) if value.dim() < 4 else value
        # a mask that reads neither q nor k (`true`, `h == 0`, `t[q] > 0` along rows) evaluates to
        # size 1 along those axes: every key is a column of the rows' plan all the same
        return value.expand(*value.shape[:2], self.bound.n, self.bound.nk)


def visited_columns(allowed: torch.Tensor) -> tuple[Cols, torch.Tensor | None]:
    """(the keys some row may attend: a slice (a view of the cache), a tuple of at most
    ``MAX_RUNS`` slices (views attended one by one and merged by their lse) or an index
    (gathered); the mask on those columns, None when it allows every one)."""
    nk = allowed.shape[-1]
    hit = allowed.reshape(-1, nk).any(0)
    idx = torch.nonzero(hit).flatten()
    if len(idx) == 0:
        return slice(0, 0), None
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    cols: Cols
    if len(idx) >= SPAN_FILL * (hi - lo):
        cols = slice(lo, hi)
    else:
        breaks = (torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1).tolist()
        starts, ends = [0, *breaks], [*breaks, len(idx)]
        cols = (tuple(slice(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, ends, strict=True))
                if len(starts) <= MAX_RUNS else idx)
    sub = allowed[..., key_index(cols)]
    return cols, None if bool(sub.all()) else sub


def key_index(cols: Cols) -> torch.Tensor | slice:
    """The visited keys as one index (a slice stays a slice)."""
    if isinstance(cols, tuple):
        return torch.cat([torch.arange(c.start, c.stop) for c in cols])
    return cols


def take(x: torch.Tensor, cols: Cols) -> torch.Tensor:
    """The visited keys of ``x [B, H, nk, D]`` (a view for a slice)."""
    if isinstance(cols, tuple):
        return torch.cat([x[:, :, c] for c in cols], dim=2)
    return x[:, :, cols]


def _call_mask(plan: RowPlan, q, k, tensors: dict, batched: set[str]):
    """(cols, mask on cols or None) of this call: the plan's, or evaluated now
    (call-time mask inputs) and restricted to the routed blocks."""
    if plan.cols is not None:
        return plan.cols, plan.col_allowed
    allowed = plan.allowed if plan.allowed is not None else plan.row_mask(tensors, batched)
    if plan.pattern.route is not None:
        allowed = routing.select_blocks(plan.pattern, plan.bound, q, k, allowed, tensors)
    return visited_columns(allowed)


def _terms(plan: RowPlan, keys: torch.Tensor, tensors: dict, batched: set[str], allowed, dt):
    """bias + FoX decay on the rows and the visited keys, broadcastable to ``[B, Hq, n, C]``, or None."""
    if plan.bias is None and plan.pattern.decay is None:
        return None
    add = torch.zeros((), dtype=dt)
    guard = torch.ones((), dtype=torch.bool) if allowed is None else allowed
    batch = next((tensors[name].shape[0] for name in batched), None)
    if plan.bias is not None:  # input indices checked on the attended pairs only (see Evaluator)
        add = add + E.as_tensor(E.Evaluator(plan.env(keys), tensors, batched, batch, guard)(plan.bias), dt).to(dt)
    if plan.pattern.decay is not None:  # gates indexed by absolute position
        gates = tensors[plan.pattern.decay].to(dt)
        hi, lo, reset = fox_prefix(gates if gates.dim() == 3 else gates.unsqueeze(0))
        rows = torch.arange(plan.bound.n) + plan.bound.q_offset
        add = add + fox_pairs(hi, lo, reset, rows[:, None], keys[None, :])
    return add


def _attend(plan: RowPlan, q, k, v, tensors: dict, batched: set[str], scale: float, cols, allowed):
    """(out in the compute dtype ``[B, Hq, n, Dv]``, lse ``[B, Hq, n]``); plain torch, differentiable."""
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kc, vc = take(k, cols).to(dt), take(v, cols).to(dt)
    C = kc.shape[2]
    # grouped heads read their key head as one [g * n] block of rows: no copy of the cache
    s = ((q.to(dt) * scale).reshape(B, Hkv, g * n, D) @ kc.transpose(-1, -2)).view(B, Hq, n, C)
    if plan.softcap is not None:
        s = soft_capped(s, plan.softcap.view(1, Hq, 1, 1))
    add = _terms(plan, torch.arange(plan.bound.nk)[key_index(cols)], tensors, batched, allowed, dt)
    if add is not None:
        s = s + add
    if plan.pattern.weights is not None:  # weights F(s) ** P: the softmax of their logarithms
        s = log_weights(plan.pattern.weights, s)
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    empty = torch.isneginf(s).all(-1) if C else torch.ones(s.shape[:-1], dtype=torch.bool)
    lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, -math.inf)
    p = row_weights(s, allowed, empty)
    size = block_max.requested(n, plan.bound.nk)
    if size is not None:  # return_block_max: the rows' probabilities, over the keys they visit
        pooled = block_max.empty(B, Hq, n, plan.bound.nk, size, dt, p.device)
        keys = torch.arange(plan.bound.nk)[key_index(cols)].view(1, -1)
        block_max.scatter_max(pooled, p.expand(B, Hq, n, C)[:, :, None], torch.arange(n).view(1, -1), keys, size)
        block_max.record(pooled)
    out = (p.reshape(p.shape[0], Hkv, g * n, C) @ vc).view(-1, Hq, n, vc.shape[-1])
    return out.expand(B, Hq, n, vc.shape[-1]), lse.expand(B, Hq, n)


def _fused(plan: RowPlan, q, k, v, tensors: dict, batched: set[str], scale: float, cols, allowed):
    """The forward through torch's fused CPU attention kernel (online softmax, with lse), the mask and
    the additive terms as a float mask, run by run of visited keys and merged by lse; None where it
    does not apply (softcap, Dv != D, CUDA, no visited key)."""

    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    if fused.flash_op() is None or q.is_cuda or plan.softcap is not None or plan.pattern.weights is not None or v.shape[-1] != D or \
            block_max.requested() is not None:  # return_block_max: the plain path's probabilities are pooled
        return None
    runs = cols if isinstance(cols, tuple) else (cols,)
    if any(isinstance(c, slice) and c.stop <= c.start for c in runs) or (isinstance(cols, torch.Tensor) and not len(cols)):
        return None  # no visited key: every row is empty (the plain path says so)
    g = Hq // Hkv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    add = None
    if plan.bias is not None or plan.pattern.decay is not None:
        keys = torch.arange(plan.bound.nk)[key_index(cols)]
        add = _terms(plan, keys, tensors, batched, allowed, dt)
        # a term that reads no key (a constant bias) has one column: cut into runs, it spans them all
        add = add.reshape((1,) * (4 - add.dim()) + tuple(add.shape))
        add = add.expand(*add.shape[:-1], len(keys))
    if allowed is not None:
        add = (torch.zeros((), dtype=dt) if add is None else add).masked_fill(~allowed, -math.inf)
    qg = q.to(dt).reshape(B, Hkv, g * n, D)
    parts, start = [], 0
    for c in runs:
        kc, vc = k[:, :, c].to(dt), v[:, :, c].to(dt)
        width = kc.shape[2]
        a = None if add is None else add[..., start:start + width].expand(B, Hq, n, width)
        start += width
        rows_ok = None if a is None else (a != -math.inf).any(-1)  # a row with no key here: 0, lse -inf
        out, lse = fused.flash_attention(qg, kc, vc, None if a is None else a.reshape(B, Hkv, g * n, width), scale)
        out, lse = out.reshape(B, Hq, n, D), lse.to(dt).reshape(B, Hq, n)
        if rows_ok is not None and not bool(rows_ok.all()):
            out = torch.where(rows_ok[..., None], out, torch.zeros((), dtype=out.dtype))
            lse = torch.where(rows_ok, lse, torch.full((), -math.inf, dtype=dt))
        parts.append((out, lse))
    if len(parts) == 1:
        return parts[0]
    return merge_lse_parts([p[0] for p in parts], [p[1] for p in parts])


def forward(plan: RowPlan, q, k, v, inputs: dict, batched: set[str], scale: float):
    """(out ``[B, Hq, n, Dv]`` in q's dtype, lse ``[B, Hq, n]`` fp32/fp64)."""
    # (autocast is off: executor.forward's wrapper)
    cols, allowed = _call_mask(plan, q, k, inputs, batched)
    result = _fused(plan, q, k, v, inputs, batched, scale, cols, allowed)
    out, lse = result if result is not None else _attend(plan, q, k, v, inputs, batched, scale, cols, allowed)
    return out.to(q.dtype), lse


def backward(plan: RowPlan, q, k, v, out, lse, dout, dlse, inputs: dict, batched: set[str], scale: float,
             wrt: list[str]):
    """(dq, dk, dv, {input: grad}) by recomputing the rows under autograd."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.enable_grad():  # (autocast is off: executor.backward's wrapper)
        cols, allowed = _call_mask(plan, q, k, inputs, batched)
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        floats = {name: inputs[name].detach().to(dt).requires_grad_() for name in wrt}
        o, l_ = _attend(plan, *leaves, {**inputs, **floats}, batched, scale, cols, allowed)
        outs, grads = [o], [dout.to(dt)]
        if dlse is not None:
            outs.append(l_)
            grads.append(torch.where(torch.isneginf(l_), torch.zeros((), dtype=dt), dlse.to(dt)))
        got = torch.autograd.grad(outs, [*leaves, *floats.values()], grads, allow_unused=True)
    dq, dk, dv = (torch.zeros_like(x) if g is None else g.to(x.dtype) for x, g in zip((q, k, v), got[:3], strict=True))
    d_in = {name: g.to(inputs[name].dtype) for name, g in zip(floats, got[3:], strict=True) if g is not None}
    return dq, dk, dv, d_in
