"""Decay-gated linear recurrences (RetNet, Lightning, Mamba2 / simple GLA, GLA): the chunked algorithm in torch.

The recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` is run chunk by chunk
(chunks of ``C`` tokens, C in 16/32/64, chosen by the simulator). Inside chunk ``n`` with the state ``S_n``
entering it and ``b_t = g_{c0} + ... + g_t`` the log gates summed from the chunk start (re-centred on the
chunk, so they stay small and no exponent below is positive when the gates are log decays, ``g <= 0``)::

    o_t     = scale * ( (q_t * exp(b_t)) S_n  +  sum_{j <= t in chunk} (sum_d q_td k_jd exp(b_td - b_jd)) v_j )
    S_{n+1} = exp(b_last) * S_n  +  (k * exp(b_last - b))^T v

The intra-chunk part is an attention-like product with relative decays: a ``[C, C]`` decay matrix for head
and scalar gates (one matmul), an elementwise ``[C, C, Dk]`` product for per-channel (GLA) gates.
State and gate arithmetic are in float32 (float64 for float64 inputs).

Backward runs the same chunks: the state gradient is carried backwards
(``dS_n = exp(b_last) dS_{n+1} + scale (q * exp(b))^T do``), and the gate gradient follows from the
identity ``dL/db_t = q_t * dq_t - k_t * dk_t`` (plus ``sum_e dS_T * S_T`` at the last step, for the final
state): ``dg_t = sum_{s >= t} dL/db_s``. Memory is O(T x D + chunks x Dk x Dv): q, k, v, g and the states
entering each chunk are saved; the rest is recomputed.
"""

from __future__ import annotations

import torch

from ....core.errors import SpecError
from ..common import CHUNKS
from ..library.gates import ChunkGates, split_chunks

#: Elements of the ``[.., C, C, Dk]`` temporary of per-channel gates processed at once (memory bound).
_VECTOR_BLOCK_ELEMS = 1 << 23


def _unchunked(x: torch.Tensor, T: int) -> torch.Tensor:
    B, H, N, C, D = x.shape
    return x.reshape(B, H, N * C, D)[:, :, :T]


def _causal(C: int, device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


def _vector_blocks(N: int, per_chunk: int):
    step = max(1, _VECTOR_BLOCK_ELEMS // max(1, per_chunk))
    for n0 in range(0, N, step):
        yield slice(n0, min(N, n0 + step))


def _intra_scores(qc, kc, gates: ChunkGates, causal, vector: bool) -> torch.Tensor:
    """``A_tj = sum_d q_td k_jd exp(b_td - b_jd)`` for ``j <= t`` in each chunk: ``[B, H, N, C, C]``."""
    if not vector:
        return (qc @ kc.transpose(-1, -2)) * gates.pairs(causal)
    B, H, N, C, Dk = qc.shape
    A = qc.new_empty(B, H, N, C, C)
    for sl in _vector_blocks(N, B * H * C * C * Dk):
        Ed = gates.vector_pairs(sl, causal)
        A[:, :, sl] = torch.einsum("bhntd,bhntjd->bhntj", qc[:, :, sl], Ed * kc[:, :, sl].unsqueeze(-3))
    return A


# ----------------------------------------------------------------- forward / backward
def chunked_forward(q, k, v, g, scale: float, initial_state, C: int):
    """``q [B, H, T, Dk]``, ``k`` (expanded to H heads), ``v [B, H, T, Dv]``, ``g [B, H, T, 1 | Dk]``, all in
    the compute dtype. Returns (out ``[B, H, T, Dv]``, final state ``[B, H, Dk, Dv]``, states entering each
    chunk ``[B, H, N, Dk, Dv]``)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    vector = g.shape[-1] != 1
    qc, kc, vc, gc = (split_chunks(x, C) for x in (q, k, v, g))
    N = qc.shape[2]
    causal = _causal(C, q.device)
    gates = ChunkGates(gc)
    qe = qc * gates.from_start()
    ke = kc * gates.to_end()
    decay = gates.total().transpose(-1, -2)  # [B, H, N, Dg, 1]
    kv = ke.transpose(-1, -2) @ vc  # [B, H, N, Dk, Dv]
    states = q.new_empty(B, H, N, Dk, Dv)
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state
    for n in range(N):
        states[:, :, n] = S
        S = decay[:, :, n] * S + kv[:, :, n]
    A = _intra_scores(qc, kc, gates, causal, vector)
    out = scale * (qe @ states + A @ vc)
    return _unchunked(out, T), S, states


def chunked_backward(q, k, v, g, scale: float, states, final_state, do, dS_T, C: int, need_gate: bool):
    """Gradients ``(dq, dk, dv, dg | None, dS0)`` of the chunked forward (k, v expanded)."""
    B, H, T, Dk = q.shape
    vector = g.shape[-1] != 1
    qc, kc, vc, gc, doc = (split_chunks(x, C) for x in (q, k, v, g, do))
    N = qc.shape[2]
    causal = _causal(C, q.device)
    gates = ChunkGates(gc)
    eb, ebl = gates.from_start(), gates.to_end()
    qe, ke = qc * eb, kc * ebl
    decay = gates.total().transpose(-1, -2)
    qdo = scale * (qe.transpose(-1, -2) @ doc)  # [B, H, N, Dk, Dv]
    dstates = torch.empty_like(states)  # gradient of the state leaving chunk n
    dS = torch.zeros_like(states[:, :, 0]) if dS_T is None else dS_T
    for n in reversed(range(N)):
        dstates[:, :, n] = dS
        dS = decay[:, :, n] * dS + qdo[:, :, n]
    dS0 = dS
    dq = scale * (doc @ states.transpose(-1, -2)) * eb
    dk = (vc @ dstates.transpose(-1, -2)) * ebl
    dv = ke @ dstates
    dP = scale * (doc @ vc.transpose(-1, -2))  # [B, H, N, C(t), C(j)]
    # a token's own pair (j = t, decay exp(0) = 1) adds dP_tt k_t to dq_t and dP_tt q_t to dk_t: terms that cancel
    # exactly in the gate's gradient (q dq - k dk) but not in float once summed into dq and dk, where under strong
    # decay they are all there is of size. So dq and dk are summed without them first (the gate's gradient is
    # taken from those) and the pair is added after.
    own = dP.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [B, H, N, C, 1]
    earlier = causal.tril(-1)
    if not vector:
        Dm = gates.pairs(causal)
        dv += scale * ((qc @ kc.transpose(-1, -2)) * Dm).transpose(-1, -2) @ doc
        W = dP * Dm.masked_fill(~earlier, 0.0)
        dq += W @ kc
        dk += W.transpose(-1, -2) @ qc
    else:
        dP = dP.masked_fill(~causal, 0.0)
        dPe = dP.masked_fill(~earlier, 0.0)
        for sl in _vector_blocks(N, B * H * C * C * Dk):
            Ed = gates.vector_pairs(sl, causal)  # [B, H, n, C(t), C(j), Dk]
            qs, ks = qc[:, :, sl], kc[:, :, sl]
            A = torch.einsum("bhntd,bhntjd->bhntj", qs, Ed * ks.unsqueeze(-3))
            dv[:, :, sl] += scale * A.transpose(-1, -2) @ doc[:, :, sl]
            WE = dPe[:, :, sl].unsqueeze(-1) * Ed
            dq[:, :, sl] += torch.einsum("bhntjd,bhnjd->bhntd", WE, ks)
            dk[:, :, sl] += torch.einsum("bhntjd,bhntd->bhnjd", WE, qs)
    dg = None
    if need_gate:
        dg = gate_grad(q, k, _unchunked(dq, T), _unchunked(dk, T), final_state, dS_T, g.shape[-1])
        # a reset gate (-inf) gets exactly 0, the limit: every term through it has weight 0 (the sums of
        # the identity only cancel, up to rounding)
        dg = dg.masked_fill(torch.isneginf(g), 0.0)
    dq, dk = dq + own * kc, dk + own * qc
    dq, dk, dv = (_unchunked(x, T) for x in (dq, dk, dv))
    return dq, dk, dv, dg, dS0


def gate_grad(q, k, dq, dk, final_state, dS_T, Dg: int) -> torch.Tensor:
    """``dg_t = sum_{s >= t} (q_s * dq_s - k_s * dk_s) + sum_e dS_T * S_T`` (summed over channels for
    scalar gates): the gradient of the log gates from those of q and k."""
    db = q * dq - k * dk
    if Dg == 1:
        db = db.sum(-1, keepdim=True)
    dg = db.flip(2).to(torch.float64).cumsum(2).flip(2).to(db.dtype)  # float64: rounding does not grow with T
    if dS_T is not None:
        last = (dS_T * final_state).sum(-1)  # [B, H, Dk]
        if Dg == 1:
            last = last.sum(-1, keepdim=True)
        dg = dg + last.unsqueeze(2)
    return dg


class ChunkedRecurrence(torch.autograd.Function):
    """The chunked torch recurrence as one autograd node (saves q, k, v, g and the per-chunk states)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale: float, C: int):
        out, final, states = chunked_forward(q, k, v, g, scale, initial_state, C)
        ctx.save_for_backward(q, k, v, g, states, final)
        ctx.scale, ctx.C = scale, C
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, g, states, final = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        dq, dk, dv, dg, dS0 = chunked_backward(q, k, v, g, ctx.scale, states, final, do.contiguous(), dS_T,
                                               ctx.C, ctx.needs_input_grad[3])
        return dq, dk, dv, dg, (dS0 if ctx.needs_input_grad[4] else None), None, None


def chunked(q, k, v, g, scale: float, initial_state, C: int):
    """Run the chunked recurrence (inputs in the compute dtype, k/v expanded). Returns (out, final state)."""
    if C not in CHUNKS:
        raise SpecError(f"chunk size must be one of {', '.join(map(str, CHUNKS))}, got {C!r}", where="argument chunk")
    return ChunkedRecurrence.apply(q, k, v, g, initial_state, scale, C)


# ----------------------------------------------------------------- one decoding step
def step(q_t, k_t, v_t, g_t, state, scale: float):
    """One step of the recurrent form: ``S' = diag(exp(g_t)) S + k_t^T v_t``, ``o_t = scale q_t S'``.

    ``q_t [B, H, Dk]``, ``k_t``/``v_t`` already expanded to H heads, ``g_t [B, H, 1 | Dk]`` and ``state
    [B, H, Dk, Dv]`` in the compute dtype. Returns ``(o_t [B, H, Dv], new state)``."""
    new = torch.exp(g_t).unsqueeze(-1) * state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    out = scale * (q_t.unsqueeze(-2) @ new).squeeze(-2)
    return out, new




