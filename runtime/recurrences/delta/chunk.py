"""The delta rule in chunks of C tokens (torch; CPU and CUDA tensors alike), exact to rounding.

Within a chunk entered with state ``S0``, write ``G_t = sum of the log gates up to t`` and ``u_t =
beta_t (v_t - k_t S_t')`` for the increment at t (``S_t'``: the state after t's decay). Then
``S_t' = diag(exp(G_t)) S0 + sum_{s<t} diag(exp(G_t - G_s)) k_s^T u_s``, so the increments solve one
unit lower-triangular system per chunk (the WY form):

    (I + diag(beta) strict_tril(M)) U = diag(beta) (V - (K * exp(G)) S0),  M_ts = sum_c k_tc k_sc exp(G_tc - G_sc)
    O = scale ((Q * exp(G)) S0 + tril(P) U),                              P_ts = sum_c q_tc k_sc exp(G_tc - G_sc)
    S_C = diag(exp(G_C)) S0 + (K * exp(G_C - G))^T U

Every exponent is a sum of gates over tokens s < t <= C: at most 0, so nothing overflows. A scalar
gate (one value per token) makes M and P one product each; a per-channel gate (Kimi Delta Attention)
takes the [C, C, Dk] product. Gradients follow through torch's autograd (the solve included).

A gate of -inf (a hard reset: the state, or that key channel's row of it, is cleared before the token's
update) is exact: it counts 0 in the sums G, and a decay ``exp(G_t - G_s)`` is kept only where no reset
lies in ``(s, t]`` (the same count of resets up to s and up to t), the entering state's ``exp(G_t)`` only
where none lies in ``[1, t]``; its gradient is 0, as the token-by-token rule's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked(q, k, v, g, beta, scale: float, initial_state, C: int):
    """``q``, ``k`` ``[B, H, T, Dk]``, ``v`` ``[B, H, T, Dv]`` (H heads each), ``g`` ``[B, H, T, 1 | Dk]``
    log gates (finite and <= 0, or -inf: a hard reset; ``common.check_gates``), ``beta`` ``[B, H, T]``, all in the compute dtype. Returns ``(out, final state)``."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    pad = (-T) % C
    if pad:  # padded tokens: k = v = beta = g = 0, an identity step; their outputs are dropped
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = F.pad(beta, (0, pad))
    N = (T + pad) // C
    q, k, v, g = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v, g))
    beta = beta.reshape(B, H, N, C)
    reset = torch.isneginf(g)
    segments = None
    if bool(reset.any()):  # hard resets: count them (per token, or per key channel) and sum the rest
        segments = torch.cumsum(reset.to(torch.int32), dim=3)
        g = g.masked_fill(reset, 0.0)
    # in float64: a float32 sum with a gate of -1e6 in it kept the spans after that gate to its rounding (0.06 off;
    # the decay family's split prefix sums do the same, library.gates.ChunkGates)
    G = torch.cumsum(g.to(torch.float64), dim=3)
    state = torch.zeros(B, H, Dk, Dv, dtype=q.dtype, device=q.device) if initial_state is None else initial_state
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = causal.clone().fill_diagonal_(False)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    outs = []
    for n in range(N):
        qn, kn, vn, Gn, bn = q[:, :, n], k[:, :, n], v[:, :, n], G[:, :, n], beta[:, :, n]
        keep = causal[:, :, None]
        # S0's decay to t; s's decay to the chunk's end (from the float64 sums, rounded once)
        enter, leave = torch.exp(Gn).to(q.dtype), torch.exp(Gn[:, :, -1:] - Gn).to(q.dtype)
        if segments is not None:  # no reset between s and t, none before t (S0), none after s (the end)
            sn = segments[:, :, n]  # resets counted from the chunk's start
            keep = keep & (sn[:, :, :, None, :] == sn[:, :, None, :, :])
            enter = enter.masked_fill(sn != 0, 0.0)
            leave = leave.masked_fill(sn != sn[:, :, -1:], 0.0)
        diff = (Gn[:, :, :, None, :] - Gn[:, :, None, :, :]).masked_fill(~keep, -torch.inf)
        if Gn.shape[-1] == 1:  # one gate per token
            decay = torch.exp(diff[..., 0]).to(q.dtype)
            M, P = (kn @ kn.transpose(-1, -2)) * decay, (qn @ kn.transpose(-1, -2)) * decay
        else:  # one gate per key channel
            decay = torch.exp(diff).to(q.dtype)
            M = torch.einsum("btc,bsc,btsc->bts", kn.flatten(0, 1), kn.flatten(0, 1), decay.flatten(0, 1)).view(
                B, H, C, C)
            P = torch.einsum("btc,bsc,btsc->bts", qn.flatten(0, 1), kn.flatten(0, 1), decay.flatten(0, 1)).view(
                B, H, C, C)
        A = eye + bn[..., None] * M.masked_fill(~strict, 0.0)
        rhs = bn[..., None] * (vn - (kn * enter) @ state)
        U = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
        outs.append(scale * ((qn * enter) @ state + P.masked_fill(~causal, 0.0) @ U))
        # the state's decay over the chunk: S0's to the end ([B, H, 1, 1 | Dk])
        state = enter[:, :, -1:].transpose(-1, -2) * state + (kn * leave).transpose(-1, -2) @ U
    out = torch.stack(outs, dim=2).reshape(B, H, N * C, Dv)[:, :, :T]
    return out, state
