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
from .common import bind, gate_tensor
from .rules import rule_of


def run(backend: str, rec: ir.RecurrenceIR, bound: E.Bound, q, k, v, tensors: dict, scale: float,
        initial_state, chunk: int | None, hardware=None, native: bool = False):
    """The recurrence on a backend ('cpu': chunked torch, 'triton', 'auto'), by its rule (``rules.rule_of``).
    Returns (out in q's dtype, final state in the compute dtype, the chunk size used). ``hardware``: choose the
    chunk for this GPU model; ``native``: Triton's compiled kernels even for CPU tensors (the offline GPU check)."""
    return rule_of(rec).run(backend, rec, bound, q, k, v, tensors, scale, initial_state, chunk, hardware, native)


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

    rule = rule_of(rec)
    check_qkv(q, k, v, gva=rule.facts.grouped_values)
    q, k = rule.prepare(rec, q, k, v)  # the rule's options on q and k, and GVA, as the forward's
    B, H, T, Dk = q.shape
    if T != 1 or k.shape[2] != 1:
        raise SpecError(f"step takes one token, got {T} (use the module's forward for a sequence)",
                        where="argument q")
    Dv = v.shape[-1]
    scale = resolve_scale(scale, Dk)
    bound, tensors = bind(rec, sizes, inputs, n=1, heads=H, dk=Dk, batch=B, device=q.device)
    dt = compute_dtype(q.dtype)
    rows = rule.facts.state_rows * Dk  # Titans: the memory, then its momentum
    if state is None:
        state = torch.zeros(B, H, rows, Dv, dtype=dt, device=q.device)
    else:
        check_state(state, q, "state", (B, H, rows, Dv))
    g = gate_tensor(rec, bound, tensors, B, H, 1, dt, q.device)[:, :, 0]
    out, new = rule.step(rec, tensors, q[:, :, 0].to(dt), expand_kv(k, H)[:, :, 0].to(dt),
                         expand_kv(v, H)[:, :, 0].to(dt), g, state.to(dt), float(scale))
    out = out.to(q.dtype)
    return (out if squeeze else out.unsqueeze(2)), new


class RecurrenceRunner(Registered):
    """What a recurrence module runs: the pattern, the backend ('reference': the naive loop; 'cpu':
    chunked torch; 'triton'; 'auto': Triton on CUDA tensors, else chunked torch) and a forced chunk
    size (or None); eager calls and ``attnc::recurrence`` both run it."""

    op = "recurrence"
    support = Support(kinds=frozenset({"recurrence"}), query_offset=None, routing=False, decode_step=True)

    def __init__(self, pattern: ir.RecurrenceIR, backend: str, chunk: int | None, *, hardware=None,
                 native: bool = False):
        self.pattern, self.backend, self.chunk = pattern, backend, chunk
        rule = rule_of(pattern)
        if backend == "triton" and not rule.has_triton:
            raise SpecError(f"'{pattern.name}' runs {rule.facts.title}, which has no Triton kernels yet",
                            where="argument backend",
                            hint="backend='cpu' or 'auto' runs its chunked torch form, on CUDA tensors too")
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
        return rule_of(self.pattern).describe(self.pattern, self.backend, self.chunk or self.last_chunk)

    def run(self, q, k, v, inputs: dict, sizes: dict, scale: float, initial_state):
        """``(out, final state, chunk or None)``: binds the sizes and inputs (errors name the argument),
        then runs the naive loop ('reference') or the chunked form ('cpu', 'triton', 'auto')."""
        rec = self.pattern
        rule = rule_of(rec)
        q, k = rule.prepare(rec, q, k, v)  # the rule's options on q and k, and GVA, here for every backend
        bound, tensors = bind(rec, sizes, inputs, n=q.shape[2], heads=q.shape[1], dk=q.shape[3], batch=q.shape[0],
                              device=q.device)
        if self.backend == "reference":
            return (*rule.reference(rec, bound, q, k, v, tensors, scale, initial_state), None)
        return rule.run(self.backend, rec, bound, q, k, v, tensors, scale, initial_state, self.chunk, self.hardware,
                        self.native)

