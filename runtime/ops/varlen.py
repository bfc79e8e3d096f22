"""Packed batches (``cu_seqlens=``) as a ``torch.library`` custom op, so that a model calling an attnc
module on packed sequences compiles with ``torch.compile(fullgraph=True)``.

The packing is data: the eager path (``runtime.frontends.varlen``) reads the offsets on the host and groups the
sequences by length, which dynamo cannot trace. ``attnc::varlen_attention(q, k, v, cu_seqlens, inputs,
initial_state, key, names, sizes, scale, return_lse, return_state) -> (out, second)`` takes the offsets
as a tensor input and runs that eager path inside its implementation, whatever the module's backend.
``second`` is the lse ``[1, Hq, total]`` of a softmax pattern (zeros without ``return_lse``: the module
then returns only ``out``) or a recurrence's final states ``[num_seqs, Hq, Dk, Dv]``; both shapes follow
from the inputs' shapes (``num_seqs`` is ``cu_seqlens.numel() - 1``), which is all the fake
implementation needs. ``attnc::varlen_attention_backward`` is its autograd formula: it recomputes the
packed forward under autograd and differentiates it (gradients reach q, k, v, float inputs and
``initial_state``).

``key`` names the module itself in ``custom_op``'s registry; ``names`` and ``sizes`` are encoded as there.
Every check of the eager path (``varlen.check_cu_seqlens``, the module's own) runs inside the op, at the
call, so a bad argument raises the eager call's ``SpecError`` naming it: a ``SpecError`` raised while
dynamo traces would reach the user buried in dynamo's own error. The fake implementation therefore
only computes shapes, whatever the arguments.
"""

from __future__ import annotations

import torch

from ...core import ir
from ..frontends import varlen
from . import common as C


def _packed(module, q, k, v, cu_seqlens, inputs: list, initial_state, names: str, sizes: str, scale: float,
            return_lse: bool):
    """``(out, second)`` of the eager packed call (``runtime.frontends.varlen``) with the module's backend."""
    pat = module.pattern
    recurrence = isinstance(pat, ir.RecurrenceIR)
    packing = varlen.check_cu_seqlens(cu_seqlens, pat, q, k)
    result = varlen.run(module._forward, pat, packing, q, k, v, scale=scale, return_lse=return_lse,
                        initial_state=initial_state, return_state=recurrence, sizes=C._decode_sizes(sizes),
                        **C._named(names, inputs))
    if recurrence or return_lse:  # an lse and a recurrence's state: fp64 for fp64 inputs, else fp32
        out, second = result
        return out, second.to(C._lse_dtype(q))
    return result, q.new_zeros(q.shape[:3], dtype=C._lse_dtype(q))


# ------------------------------------------------------------------ forward
def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  inputs: list[torch.Tensor], initial_state: torch.Tensor | None, key: str, names: str, sizes: str,
                  scale: float, return_lse: bool, return_state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    module = C._runner(key)
    with C.eager_dispatch(), torch.no_grad():  # the module's eager path, as in an eager call
        out, second = _packed(module, q, k, v, cu_seqlens, inputs, initial_state, names, sizes, scale, return_lse)
    return out.contiguous(), second.contiguous()


def _forward_fake(q, k, v, cu_seqlens, inputs, initial_state, key, names, sizes, scale, return_lse, return_state):
    B, Hq, N, Dk = q.shape
    if isinstance(C._runner(key).pattern, ir.RecurrenceIR):  # bad offsets are refused by the op, at the call
        second = q.new_empty(max(cu_seqlens.numel() - 1, 0), Hq, Dk, v.shape[-1], dtype=C._lse_dtype(q))
    else:
        second = q.new_empty(B, Hq, N, dtype=C._lse_dtype(q))
    return q.new_empty(B, Hq, N, v.shape[-1]), second


# ----------------------------------------------------------------- backward
def _backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   inputs: list[torch.Tensor], initial_state: torch.Tensor | None, dout: torch.Tensor,
                   dsecond: torch.Tensor | None, key: str, names: str, sizes: str, scale: float, return_lse: bool,
                   wrt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(dq, dk, dv, [gradient of inputs[i] for i in wrt], d initial_state (empty without one))."""
    module = C._runner(key)
    with_state = initial_state is not None

    def forward(q, k, v, s0, *tensors):
        return _packed(module, q, k, v, cu_seqlens, list(tensors), s0, names, sizes, scale, return_lse)

    primals = [q, k, v, initial_state, *inputs]
    positions = [0, 1, 2, *(4 + i for i in wrt), *([3] if with_state else [])]
    grads = C.recompute_gradients(forward, primals, positions, [dout, dsecond], guard=C.eager_dispatch)
    ds0 = grads.pop() if with_state else q.new_empty(0)
    return grads[0], grads[1], grads[2], grads[3:], ds0


def _backward_fake(q, k, v, cu_seqlens, inputs, initial_state, dout, dsecond, key, names, sizes, scale, return_lse,
                   wrt):
    ds0 = initial_state.new_empty(initial_state.shape) if initial_state is not None else q.new_empty(0)
    return (*C.gradients_like(q, k, v, inputs, wrt), ds0)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, tensors, initial_state, key, names, sizes, scale, return_lse, _ = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, initial_state, *tensors)
    ctx.names, ctx.sizes, ctx.scale, ctx.return_lse = names, sizes, scale, return_lse
    C.remember_runner(ctx, key, len(tensors))
    ctx.recurrence = ctx.runner is not None and isinstance(ctx.runner.pattern, ir.RecurrenceIR)
    ctx.shapes = (output[0].shape, output[1].shape, output[1].dtype)


def _backward(ctx, dout, dsecond):
    q, k, v, cu_seqlens, initial_state, *tensors = ctx.saved_tensors
    wrt = C.wanted_inputs(ctx, tensors, 4)
    out_shape, second_shape, second_dtype = ctx.shapes
    if dout is None:
        dout = q.new_zeros(out_shape)
    if ctx.recurrence and dsecond is None:
        dsecond = q.new_zeros(second_shape, dtype=second_dtype)
    if not (ctx.recurrence or ctx.return_lse):
        dsecond = None  # the zeros in place of the lse take no gradient
    dq, dk, dv, d_list, ds0 = varlen_attention_backward(q, k, v, cu_seqlens, tensors, initial_state, dout, dsecond,
                                                        ctx.key, ctx.names, ctx.sizes, ctx.scale, ctx.return_lse, wrt)
    return (dq, dk, dv, None, C.placed(ctx.count, wrt, d_list), (ds0 if initial_state is not None else None),
            None, None, None, None, None, None)


#: ``torch.ops.attnc.varlen_attention`` and ``torch.ops.attnc.varlen_attention_backward``
varlen_attention, varlen_attention_backward = C.defined_once("varlen_ops", lambda: C.define_ops(
    "varlen_attention", _forward_impl, _forward_fake, _backward_impl, _backward_fake, _backward, _setup_context))


def run(module, cu_seqlens: torch.Tensor, q, k, v, *, scale: float, return_lse: bool, initial_state,
        return_state: bool, sizes, **inputs):
    """The packed call under ``torch.compile``, with the signature of the module's ``_forward`` (``scale``
    already resolved): the arguments' checks and the packed work happen in the op."""
    out, second = varlen_attention(q, k, v, cu_seqlens, list(inputs.values()), initial_state, module._varlen_key,
                                   ",".join(inputs), C.encode_sizes({**module.sizes, **(sizes or {})}), scale,
                                   return_lse, return_state)
    return (out, second) if return_lse or return_state else out
