"""Titans' neural memory in chunks of C tokens (torch; CPU and CUDA tensors alike), exact to rounding.

Within a chunk entered with ``(S0, m0)``, index the tokens 1..C (0: the chunk's start) and write
``A(t, r) = exp(g_(r+1) + ... + g_t)`` (S's decay from r to t) and ``E(r, s) = eta_(s+1) ... eta_r`` (m's). The
momentum after r holds ``E(r, 0) m0 + sum_{s <= r} E(r, s) theta_s k_s^T u_s``, and the memory

    S_t = A(t, 0) S0 + c_t m0 + sum_{s <= t} gamma(t, s) theta_s k_s^T u_s
    gamma(t, s) = sum_{s <= r <= t, r >= 1} A(t, r) E(r, s),   c_t = gamma(t, 0)

so the residuals ``u_t = v_t - k_t S_(t-1)`` solve one unit lower-triangular system per chunk:

    (I + L) U = V - A(t-1, 0) K S0 - c_(t-1) K m0,   L_ts = gamma(t-1, s) theta_s k_t . k_s   (s < t)
    O = scale (A(t, 0) Q S0 + c_t Q m0 + (gamma o Q K^T) (theta U))
    S_C, m_C from the sums above at t = C.

Every exponent is a sum of log gates and log momenta (each <= 0: ``common.check_gates``, the rule's rate
check), so nothing overflows; gamma is one [C+1, C+1] product per chunk (chunks of 32 by default). The
solve's inverse and the in-chunk products are made for every chunk at once; only the state pass is
sequential. Gradients follow through torch's autograd (the solve included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .naive import split


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """``seg[..., t, r] = x_(r+1) + ... + x_t`` for positions 0..C of ``x`` ``[..., C]`` (token t is ``x[t - 1]``);
    0 where ``r >= t``. A difference of prefix sums, -inf where the span holds a -inf (a hard reset: the prefix
    sums count it 0 and a prefix count of resets says which spans cross one; never NaN)."""
    reset = torch.isneginf(x)
    prefix = F.pad(torch.where(reset, torch.zeros_like(x), x).cumsum(-1), (1, 0))  # position 0 holds nothing
    resets = F.pad(reset.to(torch.int32).cumsum(-1), (1, 0))
    i = torch.arange(x.shape[-1] + 1, device=x.device)
    after = i[None, :] < i[:, None]  # [t, r]: r < t
    crossed = resets[..., :, None] > resets[..., None, :]
    seg = torch.where(crossed, torch.full_like(prefix[..., None], -math.inf), prefix[..., :, None] - prefix[..., None, :])
    return torch.where(after, seg, torch.zeros_like(seg))


def chunked(q, k, v, g, theta, eta, scale: float, initial_state, C: int):
    """``q``, ``k`` ``[B, H, T, Dk]``, ``v`` ``[B, H, T, Dv]`` (H heads each), ``g`` ``[B, H, T, 1]`` log decays,
    ``theta``, ``eta`` ``[B, H, T]`` (eta in (0, 1]), all in the compute dtype; ``initial_state`` ``[B, H, 2 Dk,
    Dv]`` or None. Returns ``(out, final state)``. The tokens after the last whole chunk are one shorter chunk
    (no padding: a padded token would still add the momentum to the memory)."""
    B, H, T, Dk = q.shape
    if initial_state is None:
        S = torch.zeros(B, H, Dk, v.shape[-1], dtype=q.dtype, device=q.device)
        m = torch.zeros_like(S)
    else:
        S, m = split(initial_state.to(q.dtype))
    whole = T - T % C
    outs = []
    for lo, hi, size in ((0, whole, C), (whole, T, T - whole)):
        if hi > lo:
            out, S, m = _chunks(*(x[:, :, lo:hi] for x in (q, k, v, g, theta, eta)), scale, S, m, size)
            outs.append(out)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return out, torch.cat([S, m], dim=-2)


def _chunks(q, k, v, g, theta, eta, scale: float, S, m, C: int):
    """``(out, S, m)`` of a sequence of whole chunks of C tokens entered with memory ``S`` and momentum ``m``."""
    B, H, T, _ = q.shape
    n = T // C
    qc, kc, vc = (x.reshape(B, H, n, C, -1) for x in (q, k, v))
    thc = theta.reshape(B, H, n, C)
    SA = segment_sums(g.reshape(B, H, n, C))  # [B, H, n, C+1, C+1]
    SE = segment_sums(torch.log(eta).reshape(B, H, n, C))
    i = torch.arange(C + 1, device=q.device)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    # gamma(t, s) = sum_{s <= r <= t, r >= 1} A(t, r) E(r, s): one product of the two masked decay matrices
    A = torch.where((i[None, :] <= i[:, None]) & (i[None, :] >= 1), torch.exp(SA), zero)  # [t, r]
    gamma = A @ torch.where(i[None, :] <= i[:, None], torch.exp(SE), zero)  # [.., t, s]
    decay = torch.exp(SA[..., :, 0])  # A(t, 0), t = 0..C
    momentum_end = torch.exp(SE[..., C, :])  # E(C, s), s = 0..C
    kk = kc @ kc.transpose(-1, -2)
    lower = gamma[..., :-1, 1:] * thc[..., None, :] * kk  # L_ts = gamma(t-1, s) theta_s k_t . k_s (0 for s >= t)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    inverse = torch.linalg.solve_triangular(eye + lower, eye.expand_as(lower), upper=False, unitriangular=True)
    u0 = inverse @ vc  # U = u0 - from_s @ S0 - from_m @ m0
    from_s = inverse @ (decay[..., :-1, None] * kc)
    from_m = inverse @ (gamma[..., :-1, 0, None] * kc)
    scores = gamma[..., 1:, 1:] * (qc @ kc.transpose(-1, -2))  # gamma(t, s) q_t . k_s, s <= t
    outs = []
    for c in range(n):
        u = u0[:, :, c] - from_s[:, :, c] @ S - from_m[:, :, c] @ m
        w = thc[:, :, c, :, None] * u  # theta_s u_s
        qs, qm = qc[:, :, c] @ S, qc[:, :, c] @ m
        outs.append(scale * (decay[:, :, c, 1:, None] * qs + gamma[:, :, c, 1:, 0, None] * qm + scores[:, :, c] @ w))
        S, m = (decay[:, :, c, C, None, None] * S + gamma[:, :, c, C, 0, None, None] * m
                + (kc[:, :, c] * gamma[:, :, c, C, 1:, None]).transpose(-1, -2) @ w,
                momentum_end[:, :, c, 0, None, None] * m
                + (kc[:, :, c] * momentum_end[:, :, c, 1:, None]).transpose(-1, -2) @ w)
    return torch.cat(outs, dim=2), S, m
