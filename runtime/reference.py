"""The reference backend: dense, exact, differentiable, slow. The one source
of truth later backends are tested against.

Softmax patterns: ``softmax(scale * q.k -> softcap + bias + decay, masked) @ v``
on the full [B, H, Nq, Nk] score matrix; a query with no allowed key gives 0
and lse -inf. Recurrences: the step-by-step loop of DESIGN.md section 2.
Computation is in float64 for float64 inputs and float32 otherwise.
"""

from __future__ import annotations

import math

import torch

from ..compiler import evaluate as E
from ..compiler import ir
from . import routing


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: repeat key/value heads so that query head h reads kv head h // (Hq // Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def fox_prefix(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix sums of Forgetting Transformer gates ``[..., N]`` in a form whose pair differences stay at
    the gates' rounding at any length: ``(hi, lo, reset)``.

    ``hi + lo`` is the float64 cumulative sum of the finite gates split into two numbers of the gates'
    dtype, so ``(hi[q] - hi[k]) + (lo[q] - lo[k])`` is ``sum(g[k+1 .. q])`` to the rounding of its own
    size (the difference of two large cumulative sums in float32 would lose ``eps * |cumsum|``, which
    grows with n). A gate of ``-inf`` is a hard reset (decay exactly 0): it adds nothing to ``hi``/``lo``
    and ``reset[t]`` is the position of the last reset at or before ``t`` (-1 if none), so a pair
    ``k < reset[q]`` has weight exactly 0, forward and backward (the reset gate's gradient is 0, the
    limit as the gate goes to -inf)."""
    neg = torch.isneginf(gates)
    c = torch.cumsum(torch.where(neg, torch.zeros((), dtype=gates.dtype, device=gates.device), gates)
                     .to(torch.float64), dim=-1)
    hi = c.to(gates.dtype)
    lo = (c - hi.to(torch.float64)).to(gates.dtype)
    pos = torch.arange(gates.shape[-1], device=gates.device).expand(gates.shape)
    reset = torch.cummax(torch.where(neg, pos, -1), dim=-1).values
    return hi, lo, reset


def fox_pairs(hi: torch.Tensor, lo: torch.Tensor, reset: torch.Tensor, q_index: torch.Tensor,
              k_index: torch.Tensor) -> torch.Tensor:
    """``sum(g[k+1 .. q])`` for broadcastable token indices, from ``fox_prefix``; ``-inf`` across a reset.
    Only pairs with ``k <= q`` are meaningful (FoX masks are causal)."""
    d = (hi[..., q_index] - hi[..., k_index]) + (lo[..., q_index] - lo[..., k_index])
    return torch.where(k_index >= reset[..., q_index], d, torch.full((), -math.inf, dtype=d.dtype, device=d.device))


def fox_decay(gates: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """Forgetting Transformer term ``sum(g[h, k+1 .. q])`` (``fox_prefix``: exact to rounding at any
    length, ``-inf`` across a gate of ``-inf``).

    ``gates`` is ``[B | -, H, N]``; returns ``[B | 1, H, Nq, Nk]``."""
    if gates.dim() == 2:
        gates = gates.unsqueeze(0)
    return fox_pairs(*fox_prefix(gates), q_index[:, None], k_index[None, :])


def attention(
    pat: ir.PatternIR,
    bound: E.Bound,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: dict,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] in the compute dtype). Tensors on
    another device (CUDA) are evaluated on the CPU, the oracle every backend is tested against, and
    the results (and gradients, through the copies) come back on q's device."""
    if q.device.type != "cpu":
        host = {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
        out, lse = attention(pat, bound, q.cpu(), k.cpu(), v.cpu(), host, scale)
        return out.to(q.device), lse.to(q.device)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    dt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dt), expand_kv(k.to(dt), Hq), expand_kv(v.to(dt), Hq)
    ev = E.evaluator(pat, bound, inputs, batch=B)
    mask = torch.broadcast_to(E.as_tensor(ev(E.substitute(pat.mask, bound)), torch.bool), (ev.batch or 1, Hq, Nq, Nk))
    if pat.route is not None:
        mask = routing.select_blocks(pat, bound, q, k, mask, inputs)
    scores = scale * (qc @ kc.transpose(-1, -2))
    if pat.softcap is not None:
        cap = E.head_values(pat.softcap, bound.subs, Hq).to(dt).view(1, Hq, 1, 1)
        scores = cap * torch.tanh(scores / cap)
    bias = E.score_bias(pat, bound, ev, mask)  # input indices read (and checked) on attended pairs only
    if bias is not None:
        scores = scores + (bias.to(dt) if isinstance(bias, torch.Tensor) else bias)
    if pat.decay is not None:
        # gates are indexed by absolute position: the query rows start at q_offset (a KV cache)
        scores = scores + fox_decay(ev.inputs[pat.decay].to(dt), torch.arange(Nq) + bound.q_offset, torch.arange(Nk))
    scores = scores.masked_fill(~mask, -math.inf)
    # a row with no key of nonzero weight (masked, or every key behind a FoX reset): lse -inf, and
    # logsumexp never sees the all -inf row (its backward would give nan)
    empty = torch.isneginf(scores).all(-1)
    lse = torch.logsumexp(scores.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, -math.inf)
    safe_lse = torch.where(empty, torch.zeros_like(lse), lse)
    p = torch.where(mask, torch.exp(scores - safe_lse[..., None]), torch.zeros((), dtype=dt))
    out = p @ vc
    return out.to(q.dtype), lse


def recurrence(
    rec: ir.RecurrenceIR,
    bound: E.Bound,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: dict,
    scale: float,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive loop ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``.

    Returns (out [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] in the compute dtype)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    dt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dt), expand_kv(k.to(dt), H), expand_kv(v.to(dt), H)
    if rec.gate == "head":
        g = E.head_values(rec.decay, bound.subs, H).to(dt).view(1, H, 1, 1).expand(B, H, T, 1)
    else:
        gates = inputs[rec.decay].to(dt)
        if gates.dim() == (3 if rec.gate == "scalar" else 4) - 1:
            gates = gates.unsqueeze(0)
        g = gates.expand(B, *gates.shape[1:])
        if rec.gate == "scalar":
            g = g.unsqueeze(-1)
    state = torch.zeros(B, H, Dk, Dv, dtype=dt, device=q.device) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        state = torch.exp(g[:, :, t])[..., None] * state + kc[:, :, t, :, None] * vc[:, :, t, None, :]
        outs.append(scale * (qc[:, :, t, None, :] @ state).squeeze(-2))
    out = torch.stack(outs, dim=2) if outs else torch.zeros(B, H, 0, Dv, dtype=dt, device=q.device)
    return out.to(q.dtype), state
