"""``backend="flex"`` (and ``auto``'s runtime choice on CPU) as a ``torch.library`` custom op,
so that a model calling such a module compiles with ``torch.compile(fullgraph=True)``.

``attnc::runner_attention(q, k, v, inputs, key, names, sizes, scale, need_lse) -> (out, lse)``
calls the runner registered under ``key`` (``custom_op.register``: a ``FlexRunner`` or an
``AutoRunner``): planning, the BlockMask and Flex's own compiled kernel run inside the op
implementation, where dynamo does not trace (sympy, the tile analysis and Flex's compile are not
traceable from a user's graph). ``attnc::runner_attention_backward`` is its autograd formula: it
recomputes the forward with autograd on (Flex's dense implementation on CPU; its compiled
backward on CUDA) and differentiates it, so gradients reach q, k, v and float inputs (bias
tables, FoX gates). Without ``need_lse`` the fused CPU kernel gives no lse: the op then returns
zeros in its place (the module does not return it).

The key, input names and sizes travel as strings, as for ``attnc::tiled_attention``
(``runtime.ops``, whose registry, encoders and op helpers this module reuses).
"""

from __future__ import annotations

import torch

from . import common as C


def _forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor], key: str, names: str, sizes: str,
    scale: float, need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    runner = C._runner(key)
    bound = C._bind(runner, q, k, v, inputs, names, sizes)
    if q.shape[0] == 0:
        return C.empty_batch_outputs(q, v, C._lse_dtype(q))
    with C.eager_dispatch(), torch.no_grad():
        out, lse = runner(bound, q, k, v, C._named(names, inputs), scale, need_lse)
    if lse is None:
        lse = q.new_zeros(q.shape[:3], dtype=C._lse_dtype(q))
    return out.contiguous(), lse.to(C._lse_dtype(q)).contiguous()


def _forward_fake(q, k, v, inputs, key, names, sizes, scale, need_lse):
    return C.attention_fake(q, v, C._lse_dtype(q))


def _backward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None,
    inputs: list[torch.Tensor], key: str, names: str, sizes: str, scale: float, wrt: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dq, dk, dv, [gradient of inputs[i] for i in wrt]) by recomputation under autograd."""
    runner = C._runner(key)
    if q.shape[0] == 0:
        return C.gradients_like(q, k, v, inputs, wrt, torch.Tensor.new_zeros)
    bound = C._bound(runner, q, k, sizes)

    def forward(q, k, v, *tensors):
        return runner(bound, q, k, v, C._named(names, list(tensors)), scale, dlse is not None)

    grads = C.recompute_gradients(forward, [q, k, v, *inputs], [0, 1, 2, *(3 + i for i in wrt)], [dout, dlse],
                                  guard=C.eager_dispatch)
    return grads[0], grads[1], grads[2], grads[3:]


def _backward_fake(q, k, v, dout, dlse, inputs, key, names, sizes, scale, wrt):
    return C.gradients_like(q, k, v, inputs, wrt)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, key, names, sizes, scale, need_lse = inputs
    ctx.save_for_backward(q, k, v, *tensors)
    ctx.names, ctx.sizes, ctx.scale, ctx.need_lse = names, sizes, scale, need_lse
    C.remember_runner(ctx, key, len(tensors))


def _backward(ctx, dout, dlse):
    q, k, v, *tensors = ctx.saved_tensors
    wrt = C.wanted_inputs(ctx, tensors, 3)
    if dout is None:
        dout = q.new_zeros(*q.shape[:3], v.shape[-1])
    dq, dk, dv, d_list = runner_attention_backward(q, k, v, dout, dlse if ctx.need_lse else None, tensors, ctx.key,
                                                   ctx.names, ctx.sizes, ctx.scale, wrt)
    return dq, dk, dv, C.placed(ctx.count, wrt, d_list), None, None, None, None, None


#: ``torch.ops.attnc.runner_attention`` and ``torch.ops.attnc.runner_attention_backward``
runner_attention, runner_attention_backward = C.defined_once("flex_ops", lambda: C.define_ops(
    "runner_attention", _forward_impl, _forward_fake, _backward_impl, _backward_fake, _backward, _setup_context))
