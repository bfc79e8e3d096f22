"""Titans' neural memory token by token (spec/REFERENCE.md, "update titans"), the source of truth of the
chunked form. The memory ``S`` ``[Dk, Dv]`` maps a key to its value; each token takes one step of gradient
descent on ``1/2 ||k_t S - v_t||^2`` with momentum ``m`` and weight decay:

    u_t = v_t - k_t S_{t-1}                       (the negative gradient is k_t^T u_t)
    m_t = eta_t m_{t-1} + theta_t k_t^T u_t
    S_t = exp(g_t) S_{t-1} + m_t                  (exp(g_t) = 1 - alpha_t, the decay clause's log gate)
    o_t = scale q_t S_t

The state holds ``S`` and ``m``: ``[B, H, 2 Dk, Dv]``, S's rows first.
"""

from __future__ import annotations

import torch

from ....core import ir
from ..common import gate_tensor, rate_tensor


def split(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, m)`` of a state ``[..., 2 Dk, Dv]``."""
    dk = state.shape[-2] // 2
    return state[..., :dk, :], state[..., dk:, :]


def step(q_t, k_t, v_t, g_t, theta_t, eta_t, state, scale: float):
    """One token: ``q_t``, ``k_t`` ``[B, H, Dk]``, ``v_t`` ``[B, H, Dv]``, ``g_t`` ``[B, H, 1]`` (log decay),
    ``theta_t``, ``eta_t`` ``[B, H]``, ``state`` ``[B, H, 2 Dk, Dv]``; returns ``(o_t, new state)``."""
    S, m = split(state)
    u = v_t - torch.einsum("bhk,bhkv->bhv", k_t, S)
    m = eta_t[..., None, None] * m + theta_t[..., None, None] * k_t[..., None] * u[..., None, :]
    S = torch.exp(g_t)[..., None] * S + m
    return scale * torch.einsum("bhk,bhkv->bhv", q_t, S), torch.cat([S, m], dim=-2)


def rates(rec: ir.RecurrenceIR, tensors: dict, B: int, H: int, T: int, dtype, device):
    """``(theta, eta)``, each ``[B, H, T]`` in ``dtype`` (differentiable)."""
    return tuple(rate_tensor(tensors[name], B, H, T, dtype, device) for name in rec.rates)


def recurrence(rec, bound, q, k, v, tensors: dict, scale: float, initial_state):
    """``(out [B, H, T, Dv], final state [B, H, 2 Dk, Dv])``; ``k``, ``v`` with q's H heads, every tensor in the
    compute dtype."""
    B, H, T, Dk = q.shape
    dt = q.dtype
    g = gate_tensor(rec, bound, tensors, B, H, T, dt, q.device)
    theta, eta = rates(rec, tensors, B, H, T, dt, q.device)
    state = torch.zeros(B, H, 2 * Dk, v.shape[-1], dtype=dt, device=q.device) if initial_state is None \
        else initial_state.to(dt)
    outs = []
    for t in range(T):
        o, state = step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], theta[:, :, t], eta[:, :, t], state, scale)
        outs.append(o)
    out = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return out, state
