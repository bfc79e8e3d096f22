"""Chunked recurrences as ``torch.library`` custom ops, so that a model calling a recurrence module compiles
with ``torch.compile(fullgraph=True)`` (the softmax path does the same in ``custom_op``).

``attnc::recurrence(q, k, v, inputs, initial_state, key, names, sizes, scale) -> (out, final_state)`` runs
the forward; ``attnc::recurrence_backward`` the backward (registered as its autograd formula). Everything
dynamo cannot trace (sympy when binding sizes, inputs and head gates; the cost model choosing the chunk)
runs inside the op implementations, so the traced graph only sees tensors and constants. ``key`` names
the module's ``RecurrenceRunner`` in ``custom_op``'s registry; ``names`` and ``sizes`` are encoded as
there. The backward recomputes the forward under autograd (the chunked node saves only what it needs)
and differentiates it: one extra forward, under compilation only (eager calls do not go through the op).
"""

from __future__ import annotations

import torch

from ..compiler import evaluate as E
from ..compiler import ir
from . import custom_op, recurrence, reference


class RecurrenceRunner:
    """What a recurrence module runs: the pattern, the backend and a forced chunk size (or None); eager
    calls and ``attnc::recurrence`` both run it."""

    def __init__(self, pattern: ir.RecurrenceIR, backend: str, chunk: int | None):
        self.pattern, self.backend, self.chunk = pattern, backend, chunk

    def run(self, q, k, v, inputs: dict, sizes: dict, scale: float, initial_state):
        """``(out, final state, chunk or None)``: binds the sizes and inputs (errors name the argument),
        then runs the naive loop ('reference') or the chunked form ('cpu', 'triton', 'auto')."""
        rec = self.pattern
        bound = E.bind_sizes(rec, n=q.shape[2], heads=q.shape[1], sizes=sizes, dk=q.shape[3])
        tensors, _ = E.bind_inputs(rec, bound, inputs, batch=q.shape[0], device=q.device)
        if self.backend == "reference":
            return (*reference.recurrence(rec, bound, q, k, v, tensors, scale, initial_state), None)
        return recurrence.run(self.backend, rec, bound, q, k, v, tensors, scale, initial_state, self.chunk)


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ forward
def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                  initial_state: torch.Tensor | None, key: str, names: str, sizes: str,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    runner = custom_op._runner(key)
    out, state, _ = runner.run(q, k, v, custom_op._named(names, inputs), custom_op._decode_sizes(sizes), scale,
                               initial_state)
    return out.contiguous(), state.contiguous()


def _forward_fake(q, k, v, inputs, initial_state, key, names, sizes, scale):
    B, H, T, Dk = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, Dk, v.shape[-1], dtype=_state_dtype(q))


# ----------------------------------------------------------------- backward
def _backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                   initial_state: torch.Tensor | None, dout: torch.Tensor, dstate: torch.Tensor, key: str,
                   names: str, sizes: str, scale: float,
                   wrt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(dq, dk, dv, [gradient of inputs[i] for i in wrt], d initial_state (empty without one))."""
    runner = custom_op._runner(key)
    with custom_op._autograd_dispatch(), torch.enable_grad():
        lq, lk, lv = (t.detach().requires_grad_() for t in (q, k, v))
        leaves = [t.detach().requires_grad_() if i in wrt else t for i, t in enumerate(inputs)]
        s0 = None if initial_state is None else initial_state.detach().requires_grad_()
        out, state, _ = runner.run(lq, lk, lv, custom_op._named(names, leaves), custom_op._decode_sizes(sizes),
                                   scale, s0)
        targets = [lq, lk, lv, *(leaves[i] for i in wrt), *([s0] if s0 is not None else [])]
        grads = torch.autograd.grad((out, state), targets, (dout, dstate), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(targets, grads, strict=True)]
    ds0 = grads.pop() if s0 is not None else q.new_empty(0)
    return grads[0], grads[1], grads[2], grads[3:], ds0


def _backward_fake(q, k, v, inputs, initial_state, dout, dstate, key, names, sizes, scale, wrt):
    ds0 = initial_state.new_empty(initial_state.shape) if initial_state is not None else q.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            [inputs[i].new_empty(inputs[i].shape) for i in wrt], ds0)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, initial_state, key, names, sizes, scale = inputs
    ctx.save_for_backward(q, k, v, initial_state, *tensors)
    ctx.key, ctx.names, ctx.sizes, ctx.scale = key, names, sizes, scale
    ctx.runner = custom_op._REGISTRY.get(key)  # the graph keeps the runner alive
    ctx.count = len(tensors)
    ctx.shapes = (output[0].shape, output[1].shape, output[1].dtype)


def _backward(ctx, dout, dstate):
    q, k, v, initial_state, *tensors = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_inputs = need[3] if isinstance(need[3], list | tuple) else [need[3]] * ctx.count
    wrt = [i for i, t in enumerate(tensors) if t.dtype.is_floating_point and need_inputs[i]]
    out_shape, state_shape, state_dtype = ctx.shapes
    if dout is None:
        dout = q.new_zeros(out_shape)
    if dstate is None:
        dstate = q.new_zeros(state_shape, dtype=state_dtype)
    if ctx.runner is not None:
        custom_op._REGISTRY.setdefault(ctx.key, ctx.runner)
    dq, dk, dv, d_list, ds0 = recurrence_backward(q, k, v, tensors, initial_state, dout, dstate, ctx.key,
                                                  ctx.names, ctx.sizes, ctx.scale, wrt)
    d_inputs: list = [None] * ctx.count
    for i, g in zip(wrt, d_list, strict=True):
        d_inputs[i] = g
    return dq, dk, dv, d_inputs, (ds0 if initial_state is not None else None), None, None, None, None


def _define():
    fwd = torch.library.custom_op("attnc::recurrence", _forward_impl, mutates_args=())
    fwd.register_fake(_forward_fake)
    bwd = torch.library.custom_op("attnc::recurrence_backward", _backward_impl, mutates_args=())
    bwd.register_fake(_backward_fake)
    fwd.register_autograd(_backward, setup_context=_setup_context)
    return fwd, bwd


if not hasattr(custom_op._SHARED, "recurrence_ops"):  # one definition per process (see custom_op)
    custom_op._SHARED.recurrence_ops = _define()
#: ``torch.ops.attnc.recurrence`` and ``torch.ops.attnc.recurrence_backward``
recurrence_op, recurrence_backward = custom_op._SHARED.recurrence_ops
