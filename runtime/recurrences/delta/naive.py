"""The delta rule token by token (spec/REFERENCE.md), the source of truth of the chunked form:

    S_t = diag(exp(g_t)) S_{t-1}
    S_t = S_t + beta_t k_t^T (v_t - k_t S_t)
    o_t = scale q_t S_t
"""

from __future__ import annotations

import torch

from ...numerics import compute_dtype, expand_kv
from ..common import gate_tensor, rate_tensor

#: The epsilon of the optional L2 normalisation of q and k, as flash-linear-attention's ``l2norm_fwd``.
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + 1e-6)`` over the last (head) dimension, as flash-linear-attention's
    ``l2norm_fwd`` (``use_qk_l2norm_in_kernel``): computed in float32 (float64 for float64 inputs),
    returned in ``x``'s dtype; differentiable."""
    y = x.to(compute_dtype(x.dtype))
    return (y * (1.0 / torch.sqrt((y * y).sum(-1, keepdim=True) + L2NORM_EPS))).to(x.dtype)


def prepare_qk(rec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the rule reads them: L2-normalised over the head dimension when the recurrence says
    ``update delta(beta, qk_l2norm = true)``; and, when ``v`` has more heads than q (grouped value
    attention, GVA, as flash-linear-attention's), repeated so that value head j reads q/k head
    ``j // (Hv // H)`` (the gradients sum back). Every backend (the naive loop, the chunked forms, the
    decoding step) runs on what this returns: its heads are the state's."""
    if getattr(rec, "qk_l2norm", False):
        q, k = l2norm(q), l2norm(k)
    if v is not None and v.shape[1] > q.shape[1]:
        q, k = expand_kv(q, v.shape[1]), expand_kv(k, v.shape[1])
    return q, k


def beta_tensor(rec, tensors: dict, B: int, H: int, T: int, dtype, device) -> torch.Tensor:
    """The rate ``beta`` as ``[B, H, T]`` in ``dtype`` (differentiable; a broadcast batch is summed back)."""
    return rate_tensor(tensors[rec.beta], B, H, T, dtype, device)


def step(q_t, k_t, v_t, g_t, beta_t, state, scale: float):
    """One token: ``q_t``, ``k_t`` ``[B, H, Dk]``, ``v_t`` ``[B, H, Dv]``, ``g_t`` ``[B, H, 1 | Dk]`` (log
    gates), ``beta_t`` ``[B, H]``, ``state`` ``[B, H, Dk, Dv]``; returns ``(o_t, new state)``."""
    state = torch.exp(g_t)[..., None] * state
    predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
    state = state + beta_t[..., None, None] * k_t[..., None] * (v_t - predicted)[..., None, :]
    return scale * torch.einsum("bhk,bhkv->bhv", q_t, state), state


def recurrence(rec, bound, q, k, v, tensors: dict, scale: float, initial_state):
    """``(out [B, H, T, Dv] in q's dtype, final state [B, H, Dk, Dv] in the compute dtype)``; ``k``, ``v``
    with H heads (GQA expanded by the caller), every tensor in the compute dtype."""
    B, H, T, Dk = q.shape
    dt = q.dtype
    g = gate_tensor(rec, bound, tensors, B, H, T, dt, q.device)
    beta = beta_tensor(rec, tensors, B, H, T, dt, q.device)
    state = torch.zeros(B, H, Dk, v.shape[-1], dtype=dt, device=q.device) if initial_state is None \
        else initial_state.to(dt)
    outs = []
    for t in range(T):
        o, state = step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], state, scale)
        outs.append(o)
    out = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return out, state
