"""The delta rule, ``S_t = diag(exp(decay_t)) S_(t-1); S_t += beta_t k_t^T (v_t - k_t S_t)``, ``o_t = scale q_t
S_t`` (DeltaNet, Gated DeltaNet, Kimi Delta Attention), registered (``recurrences.rules``): ``naive`` the
token-by-token reference, ``chunk`` the chunked WY form in torch, ``triton`` and ``triton_kda`` its kernels."""

from __future__ import annotations

import inspect

from ....core.recurrence_rules import DELTA
from ...numerics import compute_dtype, expand_kv
from .. import rules
from ..common import gate_tensor
from ..rules import resolve_backend
from . import chunk as delta_chunk
from . import naive
from .naive import beta_tensor, prepare_qk

#: The delta rule's chunk (the triangular solve is C x C per chunk; 64 as flash-linear-attention). A
#: per-channel gate (KDA) costs C x C x Dk per chunk in the torch form, i.e. T x C x Dk in all: 16 there
#: (its Triton kernels take chunks of 64 in sub-chunks of 16, ``delta.triton_kda.KDA_CHUNK``).
DELTA_CHUNK = 64
DELTA_VECTOR_CHUNK = 16


def run(backend, rec, bound, q, k, v, tensors, scale, s0, chunk, hardware, native):
    """In chunks: torch on q's device; Triton's kernels for 'triton', and for 'auto' on CUDA tensors."""
    B, H, T, _ = q.shape
    dt = compute_dtype(q.dtype)
    # the gates were checked when the call was bound (common.check_gates: <= 0, or -inf, a hard reset,
    # which the torch chunked form and the Triton kernels cut the decays across, exactly)
    g = gate_tensor(rec, bound, tensors, B, H, T, dt, q.device)
    triton = resolve_backend(backend, q.device) == "triton"
    beta = beta_tensor(rec, tensors, B, H, T, dt, q.device)
    s0 = None if s0 is None else s0.to(dt)
    if triton and rec.gate == "vector":
        from . import triton_kda

        C = chunk or triton_kda.KDA_CHUNK
        out, state = triton_kda.run(q, k.to(q.dtype), v.to(q.dtype), g, beta, scale, s0, C,
                                    False if native else None)
        return out.to(q.dtype), state, C
    C = chunk or (DELTA_VECTOR_CHUNK if rec.gate == "vector" else DELTA_CHUNK)
    if triton:
        from . import triton as delta_triton

        # no gate (a constant 0 per head): the kernels skip the gate terms; k, v keep their Hkv heads (GQA by index)
        gates = None if rec.gate == "head" and rec.decay == 0 else g[..., 0]
        out, state = delta_triton.run(q, k.to(q.dtype), v.to(q.dtype), gates, beta, scale, s0, C,
                                      False if native else None)
        return out.to(q.dtype), state, C
    out, state = delta_chunk.chunked(q.to(dt), expand_kv(k, H).to(dt), expand_kv(v, H).to(dt), g, beta, scale, s0, C)
    return out.to(q.dtype), state, C


def decode(rec, tensors, q_t, k_t, v_t, g_t, state, scale):
    B, H = q_t.shape[:2]
    beta = beta_tensor(rec, tensors, B, H, 1, q_t.dtype, q_t.device)[:, :, 0]
    return naive.step(q_t, k_t, v_t, g_t, beta, state, scale)


def describe(rec, backend: str, chunk: int | None) -> str:
    how = {"reference": "token by token", "triton": "chunked, Triton kernels"}.get(backend, "chunked in torch")
    head = (f"# {backend} backend: delta-rule recurrence '{rec.name}' ({rec.gate} gate, rate '{rec.beta}'), {how}\n"
            f"# S_t = diag(exp(decay_t)) S_(t-1); S_t += beta_t k_t^T (v_t - k_t S_t); o_t = scale q_t S_t\n"
            f"decay = {rec.decay}\n")
    if backend == "triton":
        from . import triton as delta_triton
        from . import triton_kda

        module = triton_kda if rec.gate == "vector" else delta_triton
        return head + "\n".join(inspect.getsource(fn).rstrip() + "\n" for fn in module._HELPERS + module._KERNELS)
    return head + inspect.getsource(naive.step if backend == "reference" else delta_chunk.chunked)


RULE = rules.register(rules.RecurrenceRule(DELTA, prepare_qk, rules.loop_reference(naive.recurrence), run, decode, describe,
                                           rules.matrix_entering_map))
