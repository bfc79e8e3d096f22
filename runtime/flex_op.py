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
(``runtime.custom_op``, whose registry and encoders this module reuses).
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import custom_op as C

_SHARED = sys.modules.setdefault("_attnc_flex_op_state", types.ModuleType("_attnc_flex_op_state"))


#: The dispatch key sets of plain eager code (taken at import, outside any op).
_EAGER_KEYS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


@contextlib.contextmanager
def _plain():
    """The runner as in eager mode: an op implementation runs with autograd and functorch's keys
    excluded (Flex's BlockMask helpers use vmap; the recomputed backward uses autograd), and on its
    first compiled call under AOTAutograd's checking ``TorchDispatchMode``; the op's own inputs and
    outputs are still what the caller's modes see."""
    with torch._C._ForceDispatchKeyGuard(*_EAGER_KEYS), _disable_current_modes():
        yield


def _forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor], key: str, names: str, sizes: str,
    scale: float, need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    runner = C._runner(key)
    B, Hq, Nq, _ = q.shape
    if B == 0:
        return q.new_zeros(B, Hq, Nq, v.shape[-1]), q.new_full((B, Hq, Nq), -float("inf"), dtype=C._lse_dtype(q))
    bound = C._bind(runner, q, k, inputs, names, sizes)
    with _plain(), torch.no_grad():
        out, lse = runner(bound, q, k, v, C._named(names, inputs), scale, need_lse)
    if lse is None:
        lse = q.new_zeros(B, Hq, Nq, dtype=C._lse_dtype(q))
    return out.contiguous(), lse.to(C._lse_dtype(q)).contiguous()


def _forward_fake(q, k, v, inputs, key, names, sizes, scale, need_lse):
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=C._lse_dtype(q))


def _backward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None,
    inputs: list[torch.Tensor], key: str, names: str, sizes: str, scale: float, wrt: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dq, dk, dv, [gradient of inputs[i] for i in wrt]) by recomputation under autograd."""
    runner = C._runner(key)
    if q.shape[0] == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                [torch.zeros_like(inputs[i]) for i in wrt])
    bound = C._bind(runner, q, k, inputs, names, sizes)
    with _plain(), torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        tensors = [t.detach().requires_grad_() if i in wrt else t for i, t in enumerate(inputs)]
        out, lse = runner(bound, *leaves, C._named(names, tensors), scale, dlse is not None)
        targets = [out] if dlse is None else [out, lse]
        grads_out = [dout] if dlse is None else [dout, dlse.to(lse.dtype)]
        grads = torch.autograd.grad(targets, leaves + [tensors[i] for i in wrt], grads_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g.contiguous()
             for g, t in zip(grads, leaves + [tensors[i] for i in wrt], strict=True)]
    return grads[0], grads[1], grads[2], grads[3:]


def _backward_fake(q, k, v, dout, dlse, inputs, key, names, sizes, scale, wrt):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), [inputs[i].new_empty(inputs[i].shape)
                                                                             for i in wrt]


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, key, names, sizes, scale, need_lse = inputs
    ctx.save_for_backward(q, k, v, *tensors)
    ctx.key, ctx.names, ctx.sizes, ctx.scale, ctx.need_lse = key, names, sizes, scale, need_lse
    ctx.runner = C._REGISTRY.get(key)  # the graph keeps the runner alive (the module may be gone)
    ctx.count = len(tensors)


def _backward(ctx, dout, dlse):
    q, k, v, *tensors = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_inputs = need[3] if isinstance(need[3], list | tuple) else [need[3]] * ctx.count
    wrt = [i for i, t in enumerate(tensors) if t.dtype.is_floating_point and need_inputs[i]]
    if ctx.runner is not None:
        C._REGISTRY.setdefault(ctx.key, ctx.runner)
    if dout is None:
        dout = q.new_zeros(*q.shape[:3], v.shape[-1])
    dq, dk, dv, d_list = runner_attention_backward(q, k, v, dout, dlse if ctx.need_lse else None, tensors, ctx.key,
                                                   ctx.names, ctx.sizes, ctx.scale, wrt)
    d_inputs: list = [None] * ctx.count
    for i, g in zip(wrt, d_list, strict=True):
        d_inputs[i] = g
    return dq, dk, dv, d_inputs, None, None, None, None, None


def _define():
    fwd = torch.library.custom_op("attnc::runner_attention", _forward_impl, mutates_args=())
    fwd.register_fake(_forward_fake)
    bwd = torch.library.custom_op("attnc::runner_attention_backward", _backward_impl, mutates_args=())
    bwd.register_fake(_backward_fake)
    fwd.register_autograd(_backward, setup_context=_setup_context)
    return fwd, bwd


if not hasattr(_SHARED, "ops"):  # a second copy of the package uses the first one's ops
    _SHARED.ops = _define()
#: ``torch.ops.attnc.runner_attention`` and ``torch.ops.attnc.runner_attention_backward``
runner_attention, runner_attention_backward = _SHARED.ops
