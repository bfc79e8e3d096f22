"""Titans' neural memory, ``update titans(theta, eta)`` (``naive``), registered (``recurrences.rules``): the
token-by-token reference, the chunked form in torch (``chunk``), its Triton kernels (``triton``) and its
decoding step."""

from __future__ import annotations

import inspect

import torch

from ....core.errors import SpecError
from ....core.recurrence_rules import TITANS
from ...numerics import compute_dtype, expand_kv
from .. import rules
from ..common import choose_chunk, gate_tensor
from ..rules import resolve_backend
from . import chunk as titans_chunk
from . import naive

#: The torch form's chunk (its gamma one [C+1, C+1] product per chunk, its solve C x C): 32, where the forward
#: took 94 ms against 96 at 16 and the training step about a third less (2 CPU cores, 8 heads, d 64, 4K tokens).
TITANS_CHUNK = 32


def run(backend, rec, bound, q, k, v, tensors, scale, s0, chunk, hardware, native):
    """In chunks: torch on q's device; Triton's kernels for 'triton', and for 'auto' on CUDA tensors."""
    B, H, T, _ = q.shape
    dt = compute_dtype(q.dtype)
    g = gate_tensor(rec, bound, tensors, B, H, T, dt, q.device)
    theta, eta = naive.rates(rec, tensors, B, H, T, dt, q.device)
    on_triton = resolve_backend(backend, q.device) == "triton"
    if on_triton:
        from . import triton as titans_triton

        # 'auto' past the kernels' key head dim runs the torch form; 'triton' there is refused (``configs``)
        on_triton = backend == "triton" or q.shape[-1] <= titans_triton.MAX_DK
    if on_triton:
        # the chunk the cost model picks for these shapes (``compiler.cost.recurrence_cost.titans_kernels``)
        C = chunk or choose_chunk(rec, T, H, q.shape[-1], B, q.device, q.dtype, hardware)
        out, state = titans_triton.run(q, k.to(q.dtype), v.to(q.dtype), g[..., 0], theta, eta, scale,
                                       None if s0 is None else s0.to(dt), C, False if native else None)
        return out.to(q.dtype), state, C
    C = chunk or TITANS_CHUNK
    out, state = titans_chunk.chunked(q.to(dt), expand_kv(k, H).to(dt), expand_kv(v, H).to(dt), g, theta, eta,
                                      scale, None if s0 is None else s0.to(dt), C)
    return out.to(q.dtype), state, C


def decode(rec, tensors, q_t, k_t, v_t, g_t, state, scale):
    B, H = q_t.shape[:2]
    theta, eta = (r[:, :, 0] for r in naive.rates(rec, tensors, B, H, 1, q_t.dtype, q_t.device))
    return naive.step(q_t, k_t, v_t, g_t, theta, eta, state, scale)


def describe(rec, backend: str, chunk: int | None) -> str:
    how = {"reference": "token by token",
           "triton": f"chunked, Triton kernels, chunk {chunk or 'chosen by the cost model'}",
           "auto": "chunked: Triton kernels on CUDA tensors (key head dims up to 128), torch otherwise"}.get(
        backend, f"chunked in torch, chunk {chunk or TITANS_CHUNK}")
    theta, eta = rec.rates
    head = (f"# {backend} backend: Titans' neural memory '{rec.name}' ({rec.gate} gate, learning rate '{theta}', "
            f"momentum '{eta}'), {how}\n"
            f"# u_t = v_t - k_t S_(t-1); m_t = eta_t m_(t-1) + theta_t k_t^T u_t; S_t = exp(decay_t) S_(t-1) + m_t; "
            f"o_t = scale q_t S_t\ndecay = {rec.decay}\n")
    if backend == "triton":
        from . import triton as titans_triton

        return head + "\n".join(inspect.getsource(fn).rstrip() + "\n"
                                for fn in titans_triton._HELPERS + titans_triton._KERNELS)
    return head + inspect.getsource(naive.step if backend == "reference" else titans_chunk.chunked)


def check_rates(rec, tensors: dict) -> None:
    """theta finite; eta in (0, 1] (a momentum: the chunked form's sums of log eta are then at most 0), each
    naming the input. A CUDA graph being captured reads no value: eager calls check."""
    theta, eta = (tensors[name] for name in rec.rates)
    if theta.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    for name, t, bad, rule in ((rec.rates[0], theta, ~torch.isfinite(theta), "finite"),
                               (rec.rates[1], eta, ~((eta > 0) & (eta <= 1)), "in (0, 1]")):
        if bool(bad.any()):
            at = [int(i) for i in torch.nonzero(bad)[0]]
            raise SpecError(f"Titans' {'learning rate' if t is theta else 'momentum'} must be {rule}; '{name}' is "
                            f"{float(t[tuple(at)].detach())!r} at index {at}", where=f"argument {name}")


RULE = rules.register(rules.RecurrenceRule(TITANS, rules.unchanged_qk, rules.loop_reference(naive.recurrence), run, decode, describe,
                                           rules.matrix_entering_map, check_rates))
