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

from ...core.recurrence_rules import RULES
from ..numerics import compute_dtype
from . import common as custom_op


# ------------------------------------------------------------------ forward
def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                  initial_state: torch.Tensor | None, key: str, names: str, sizes: str,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    runner = custom_op._runner(key)
    out, state, chunk = runner.run(q, k, v, custom_op._named(names, inputs), custom_op._decode_sizes(sizes), scale,
                                   initial_state)
    # the shapes of a compiled call, for Attention.report() (an eager call keeps its own in the module)
    runner.traced_call = {"n": q.shape[2], "heads": max(q.shape[1], v.shape[1]), "head_dim": q.shape[3],
                          "batch": q.shape[0], "q_tile": chunk}
    return out.contiguous(), state.contiguous()


def _forward_fake(q, k, v, inputs, initial_state, key, names, sizes, scale):
    B, _, T, Dk = q.shape
    H = max(q.shape[1], v.shape[1])  # q's heads, or v's under grouped value attention (the delta rule)
    rows = RULES[custom_op._runner(key).pattern.rule].state_rows * Dk  # Titans: the memory, then its momentum
    state = q.new_empty(B, H, rows, v.shape[-1], dtype=compute_dtype(q.dtype))
    return q.new_empty(B, H, T, v.shape[-1]), state


# ----------------------------------------------------------------- backward
def _backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor],
                   initial_state: torch.Tensor | None, dout: torch.Tensor, dstate: torch.Tensor, key: str,
                   names: str, sizes: str, scale: float,
                   wrt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(dq, dk, dv, [gradient of inputs[i] for i in wrt], d initial_state (empty without one))."""
    runner = custom_op._runner(key)

    def forward(q, k, v, s0, *tensors):
        out, state, _ = runner.run(q, k, v, custom_op._named(names, list(tensors)), custom_op._decode_sizes(sizes),
                                   scale, s0)
        return out, state

    with_state = initial_state is not None
    positions = [0, 1, 2, *(4 + i for i in wrt), *([3] if with_state else [])]
    grads = custom_op.recompute_gradients(forward, [q, k, v, initial_state, *inputs], positions, [dout, dstate])
    ds0 = grads.pop() if with_state else q.new_empty(0)
    return grads[0], grads[1], grads[2], grads[3:], ds0


def _backward_fake(q, k, v, inputs, initial_state, dout, dstate, key, names, sizes, scale, wrt):
    ds0 = initial_state.new_empty(initial_state.shape) if initial_state is not None else q.new_empty(0)
    return (*custom_op.gradients_like(q, k, v, inputs, wrt), ds0)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, initial_state, key, names, sizes, scale = inputs
    ctx.save_for_backward(q, k, v, initial_state, *tensors)
    ctx.names, ctx.sizes, ctx.scale = names, sizes, scale
    custom_op.remember_runner(ctx, key, len(tensors))
    ctx.shapes = (output[0].shape, output[1].shape, output[1].dtype)


def _backward(ctx, dout, dstate):
    q, k, v, initial_state, *tensors = ctx.saved_tensors
    wrt = custom_op.wanted_inputs(ctx, tensors, 3)
    out_shape, state_shape, state_dtype = ctx.shapes
    if dout is None:
        dout = q.new_zeros(out_shape)
    if dstate is None:
        dstate = q.new_zeros(state_shape, dtype=state_dtype)
    dq, dk, dv, d_list, ds0 = recurrence_backward(q, k, v, tensors, initial_state, dout, dstate, ctx.key,
                                                  ctx.names, ctx.sizes, ctx.scale, wrt)
    return (dq, dk, dv, custom_op.placed(ctx.count, wrt, d_list), (ds0 if initial_state is not None else None),
            None, None, None, None)


#: ``torch.ops.attnc.recurrence`` and ``torch.ops.attnc.recurrence_backward``
recurrence_op, recurrence_backward = custom_op.defined_once("recurrence_ops", lambda: custom_op.define_ops(
    "recurrence", _forward_impl, _forward_fake, _backward_impl, _backward_fake, _backward, _setup_context))
