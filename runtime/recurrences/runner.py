"""The recurrence runner: runs a recurrence rule on a backend (chunked torch, Triton), its decoding
step, and the runner the custom op and ``Attention`` call."""

from __future__ import annotations

import dataclasses

import torch

from ...compiler import evaluate as E
from ...core import ir
from ...core.errors import SpecError
from ..checks import check_qkv, check_state, resolve_scale
from ..numerics import compute_dtype, expand_kv
from ..ops.common import Registered
from ..runner import Support
from .common import bind, choose_chunk, gate_tensor, head_gates
from .decay import naive
from .decay.chunk import chunked, step


def resolve_backend(backend: str, device) -> str:
    """'auto' is Triton on CUDA tensors (when installed) and the chunked torch path otherwise."""
    if backend != "auto":
        return backend
    from .decay import triton as triton_recurrence

    return "triton" if torch.device(device).type == "cuda" and triton_recurrence.available() else "cpu"


def run(backend: str, rec: ir.RecurrenceIR, bound: E.Bound, q, k, v, tensors: dict, scale: float,
        initial_state, chunk: int | None, hardware=None, native: bool = False):
    """The recurrence on a backend ('cpu': chunked torch, 'triton', 'auto'). Returns (out in q's dtype,
    final state in the compute dtype, the chunk size used). ``hardware``: choose the chunk for this GPU
    model; ``native``: Triton's compiled kernels even for CPU tensors (the offline GPU check)."""
    B, H, T, Dk = q.shape
    dt = compute_dtype(q.dtype)
    if rec.rule == "delta":
        return _delta(rec, bound, q, k, v, tensors, scale, initial_state, chunk, backend, native)
    backend = resolve_backend(backend, q.device)
    C = chunk or choose_chunk(rec, T, H, Dk, B, q.device, q.dtype, hardware)
    s0 = None if initial_state is None else initial_state.to(dt)
    if backend == "triton":
        from .decay import triton as triton_recurrence

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


def decode_step(rec: ir.RecurrenceIR, sizes: dict, q, k, v, state, scale, inputs: dict):
    """``Attention.step``: one token of the recurrent form, for inference loops.

    ``q`` ``[B, Hq, Dk]`` (or ``[B, Hq, 1, Dk]``), ``k`` ``[B, Hkv, Dk]``, ``v`` ``[B, Hkv, Dv]`` (same
    rank as q), ``state`` ``[B, Hq, Dk, Dv]`` or None (zeros); gate inputs for this one token, with their
    declared shape at n = 1 (``[heads, 1]``, ``[heads, 1, dk]``, optionally with a batch dimension).
    Returns ``(o, new_state)``: ``o`` of q's rank and dtype, the state in the compute dtype."""

    if not isinstance(q, torch.Tensor) or q.dim() not in (3, 4):
        got = list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise SpecError(f"expected one token: q [B, H, Dk] or [B, H, 1, Dk], got {got}", where="argument q")
    squeeze = q.dim() == 3
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != q.dim():
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise SpecError(f"expected {q.dim()} dimensions like q, got {got}", where=f"argument {name}")
    if squeeze:
        q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)

    check_qkv(q, k, v, gva=rec.rule == "delta")
    if rec.rule == "delta":  # the rule's options on q and k (qk_l2norm) and GVA, as the forward's
        from .delta.naive import prepare_qk

        q, k = prepare_qk(rec, q, k, v)
    B, H, T, Dk = q.shape
    if T != 1 or k.shape[2] != 1:
        raise SpecError(f"step takes one token, got {T} (use the module's forward for a sequence)",
                        where="argument q")
    Dv = v.shape[-1]
    scale = resolve_scale(scale, Dk)
    bound, tensors = bind(rec, sizes, inputs, n=1, heads=H, dk=Dk, batch=B, device=q.device)
    dt = compute_dtype(q.dtype)
    if state is None:
        state = torch.zeros(B, H, Dk, Dv, dtype=dt, device=q.device)
    else:
        check_state(state, q, "state", (B, H, Dk, Dv))
    g = gate_tensor(rec, bound, tensors, B, H, 1, dt, q.device)[:, :, 0]
    if rec.rule == "delta":
        from .delta import naive as delta_naive

        beta = delta_naive.beta_tensor(rec, tensors, B, H, 1, dt, q.device)[:, :, 0]
        out, new = delta_naive.step(q[:, :, 0].to(dt), expand_kv(k, H)[:, :, 0].to(dt),
                                    expand_kv(v, H)[:, :, 0].to(dt), g, beta, state.to(dt), float(scale))
        out = out.to(q.dtype)
        return (out if squeeze else out.unsqueeze(2)), new
    out, new = step(q[:, :, 0].to(dt), expand_kv(k, H)[:, :, 0].to(dt), expand_kv(v, H)[:, :, 0].to(dt), g,
                    state.to(dt), float(scale))
    out = out.to(q.dtype)
    return (out if squeeze else out.unsqueeze(2)), new


#: The delta rule's chunk (the triangular solve is C x C per chunk; 64 as flash-linear-attention). A
#: per-channel gate (KDA) costs C x C x Dk per chunk in the torch form, i.e. T x C x Dk in all: 16 there
#: (its Triton kernels take chunks of 64 in sub-chunks of 16, ``delta.triton_kda.KDA_CHUNK``).
DELTA_CHUNK = 64
DELTA_VECTOR_CHUNK = 16


def _delta(rec, bound, q, k, v, tensors: dict, scale: float, initial_state, chunk: int | None, backend: str = "cpu",
           native: bool = False):
    """The delta rule in chunks (torch on q's device; Triton's kernels for 'triton', and for 'auto' on CUDA
    tensors): ``(out, final state, chunk)``."""
    from .delta import chunk as delta_chunk
    from .delta.naive import beta_tensor

    B, H, T, _ = q.shape
    dt = compute_dtype(q.dtype)
    # the gates were checked when the call was bound (common.check_gates: <= 0, or -inf, a hard reset,
    # which the torch chunked form and the Triton kernels cut the decays across, exactly)
    g = gate_tensor(rec, bound, tensors, B, H, T, dt, q.device)
    triton = resolve_backend(backend, q.device) == "triton"
    beta = beta_tensor(rec, tensors, B, H, T, dt, q.device)
    s0 = None if initial_state is None else initial_state.to(dt)
    if triton and rec.gate == "vector":
        from .delta import triton_kda

        C = chunk or triton_kda.KDA_CHUNK
        out, state = triton_kda.run(q, k.to(q.dtype), v.to(q.dtype), g, beta, scale, s0, C,
                                    False if native else None)
        return out.to(q.dtype), state, C
    C = chunk or (DELTA_VECTOR_CHUNK if rec.gate == "vector" else DELTA_CHUNK)
    if triton:
        from .delta import triton as delta_triton

        # no gate (a constant 0 per head): the kernels skip the gate terms; k, v keep their Hkv heads (GQA by index)
        gates = None if rec.gate == "head" and rec.decay == 0 else g[..., 0]
        out, state = delta_triton.run(q, k.to(q.dtype), v.to(q.dtype), gates, beta, scale, s0, C,
                                      False if native else None)
        return out.to(q.dtype), state, C
    out, state = delta_chunk.chunked(q.to(dt), expand_kv(k, H).to(dt), expand_kv(v, H).to(dt), g, beta, scale, s0, C)
    return out.to(q.dtype), state, C


class RecurrenceRunner(Registered):
    """What a recurrence module runs: the pattern, the backend ('reference': the naive loop; 'cpu':
    chunked torch; 'triton'; 'auto': Triton on CUDA tensors, else chunked torch) and a forced chunk
    size (or None); eager calls and ``attnc::recurrence`` both run it."""

    op = "recurrence"
    support = Support(kinds=frozenset({"recurrence"}), query_offset=None, routing=False, decode_step=True)

    def __init__(self, pattern: ir.RecurrenceIR, backend: str, chunk: int | None, *, hardware=None,
                 native: bool = False):
        self.pattern, self.backend, self.chunk = pattern, backend, chunk
        # the naive loop is plain torch autograd: its gradients are differentiable again
        self.support = dataclasses.replace(RecurrenceRunner.support, double_backward=backend == "reference")
        # the offline GPU check injects a runner whose chunk is chosen for a GPU model (``hardware``) and
        # whose Triton kernels compile natively (``native``) although its tensors are on the CPU
        self.hardware, self.native = hardware, native
        self.last_chunk: int | None = None
        self.register_op()  # under torch.compile: attnc::recurrence

    @property
    def name(self) -> str:
        return self.backend

    @property
    def last_schedule(self):
        return None  # chunks, not tiles

    def describe(self) -> str:
        rec = self.pattern
        if rec.rule == "delta":
            import inspect

            from .delta import chunk as delta_chunk
            from .delta import naive as delta_naive

            how = {"reference": "token by token", "triton": "chunked, Triton kernels"}.get(self.backend,
                                                                                          "chunked in torch")
            head = (f"# {self.backend} backend: delta-rule recurrence '{rec.name}' ({rec.gate} gate, rate "
                    f"'{rec.beta}'), {how}\n"
                    f"# S_t = diag(exp(decay_t)) S_(t-1); S_t += beta_t k_t^T (v_t - k_t S_t); o_t = scale q_t S_t\n"
                    f"decay = {rec.decay}\n")
            if self.backend == "triton":
                from .delta import triton as delta_triton
                from .delta import triton_kda

                module = triton_kda if rec.gate == "vector" else delta_triton
                return head + "\n".join(inspect.getsource(fn).rstrip() + "\n"
                                        for fn in module._HELPERS + module._KERNELS)
            body = delta_naive.step if self.backend == "reference" else delta_chunk.chunked
            return head + inspect.getsource(body)
        if self.backend == "reference":
            return (f"# reference backend: naive recurrence '{rec.name}' ({rec.gate} gate)\n"
                    f"# S_t = diag(exp(decay_t)) S_(t-1) + k_t^T v_t ; o_t = scale * q_t S_t\n"
                    f"decay = {rec.decay}\n")
        return describe(rec, self.backend, self.chunk or self.last_chunk)

    def run(self, q, k, v, inputs: dict, sizes: dict, scale: float, initial_state):
        """``(out, final state, chunk or None)``: binds the sizes and inputs (errors name the argument),
        then runs the naive loop ('reference') or the chunked form ('cpu', 'triton', 'auto')."""
        rec = self.pattern
        if rec.rule == "delta":  # the rule's options on q and k (qk_l2norm) and GVA, here for every backend
            from .delta.naive import prepare_qk

            q, k = prepare_qk(rec, q, k, v)
        bound, tensors = bind(rec, sizes, inputs, n=q.shape[2], heads=q.shape[1], dk=q.shape[3], batch=q.shape[0],
                              device=q.device)
        if self.backend == "reference" and rec.rule == "delta":
            from .delta import naive as delta_naive

            dt = compute_dtype(q.dtype)
            H = q.shape[1]
            out, state = delta_naive.recurrence(rec, bound, q.to(dt), expand_kv(k, H).to(dt), expand_kv(v, H).to(dt),
                                                tensors, scale, initial_state)
            return out.to(q.dtype), state, None
        if self.backend == "reference":
            return (*naive.recurrence(rec, bound, q, k, v, tensors, scale, initial_state), None)
        return run(self.backend, rec, bound, q, k, v, tensors, scale, initial_state, self.chunk, self.hardware,
                   self.native)


def describe(rec: ir.RecurrenceIR, backend: str, chunk: int | None) -> str:
    """``Attention.source`` of a recurrence on the chunked backends (and the Triton kernels' text)."""
    import inspect

    lines = [f"# {backend} backend: chunked recurrence '{rec.name}' ({rec.gate} gate), chunk "
             f"{chunk if chunk else '(chosen by the simulator at the first call)'}",
             "# S_t = diag(exp(decay_t)) S_(t-1) + k_t^T v_t ; o_t = scale * q_t S_t",
             f"decay = {rec.decay}"]
    if backend == "triton":
        from .decay import triton as triton_recurrence

        for fn in triton_recurrence._HELPERS + triton_recurrence._KERNELS:
            lines += ["", inspect.getsource(fn).rstrip()]
    return "\n".join(lines) + "\n"
