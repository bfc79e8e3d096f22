"""The decay rule, ``S_t = diag(exp(decay_t)) S_(t-1) + k_t^T v_t``, ``o_t = scale q_t S_t`` (RetNet, Lightning,
Mamba2, GLA), registered (``recurrences.rules``): ``naive`` the token-by-token reference, ``chunk`` the chunked
form in torch, ``triton`` its kernels."""

from __future__ import annotations

import inspect

import torch

from ....core.recurrence_rules import DECAY
from ...numerics import compute_dtype, expand_kv
from .. import rules
from ..common import choose_chunk, gate_tensor, head_gates
from ..rules import resolve_backend
from . import naive
from .chunk import chunked, step


def reference(rec, bound, q, k, v, tensors, scale, s0):
    return naive.recurrence(rec, bound, q, k, v, tensors, scale, s0)


def run(backend, rec, bound, q, k, v, tensors, scale, s0, chunk, hardware, native):
    B, H, T, Dk = q.shape
    dt = compute_dtype(q.dtype)
    backend = resolve_backend(backend, q.device)
    C = chunk or choose_chunk(rec, T, H, Dk, B, q.device, q.dtype, hardware)
    s0 = None if s0 is None else s0.to(dt)
    if backend == "triton":
        from . import triton as triton_recurrence

        if rec.gate == "head":
            g = head_gates(rec, bound, H, dt, q.device)
        else:
            g = gate_tensor(rec, bound, tensors, B, H, T, dt, q.device)
            if rec.gate == "scalar":
                g = g.squeeze(-1)
        if rec.gate == "vector":
            C = triton_recurrence.VECTOR_CHUNK
        # k, v keep their Hkv heads: the kernels read kv head h // (H // Hkv) by index (GQA)
        out, state = triton_recurrence.run(q, k, v, g, scale, s0, C, rec.gate, False if native else None)
        return out.to(q.dtype), state, C
    kx, vx = expand_kv(k, H), expand_kv(v, H)
    g = gate_tensor(rec, bound, tensors, B, H, T, dt, q.device).contiguous()
    out, state = chunked(q.to(dt).contiguous(), kx.to(dt).contiguous(), vx.to(dt).contiguous(), g, scale, s0, C)
    return out.to(q.dtype), state, C


def decode(rec, tensors, q_t, k_t, v_t, g_t, state, scale):
    return step(q_t, k_t, v_t, g_t, state, scale)


def describe(rec, backend: str, chunk: int | None) -> str:
    if backend == "reference":
        return (f"# reference backend: naive recurrence '{rec.name}' ({rec.gate} gate)\n"
                f"# S_t = diag(exp(decay_t)) S_(t-1) + k_t^T v_t ; o_t = scale * q_t S_t\n"
                f"decay = {rec.decay}\n")
    lines = [f"# {backend} backend: chunked recurrence '{rec.name}' ({rec.gate} gate), chunk "
             f"{chunk if chunk else '(chosen by the simulator at the first call)'}",
             "# S_t = diag(exp(decay_t)) S_(t-1) + k_t^T v_t ; o_t = scale * q_t S_t",
             f"decay = {rec.decay}"]
    if backend == "triton":
        from . import triton as triton_recurrence

        for fn in triton_recurrence._HELPERS + triton_recurrence._KERNELS:
            lines += ["", inspect.getsource(fn).rstrip()]
    return "\n".join(lines) + "\n"


def entering_map(run_part, bind_part, rec, q, k, v, dtype):
    """A part multiplies the state it starts from by its decays' product, per key channel: ``[B, H, 1 | Dk, 1]``."""
    B, H, T, _ = q.shape
    bound, tensors = bind_part()
    return "scale", torch.exp(gate_tensor(rec, bound, tensors, B, H, T, dtype, q.device).sum(2))[..., None]


RULE = rules.register(rules.RecurrenceRule(DECAY, rules.unchanged_qk, reference, run, decode, describe, entering_map))
