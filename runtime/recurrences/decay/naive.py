"""The naive recurrence: the token-by-token definition (spec/REFERENCE.md), the source of truth of
the chunked forms."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....core import ir
from ...numerics import compute_dtype, expand_kv


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
