"""The front door of a softmax call: every check and refusal that depends on the bound sizes, applied
once, the same on every path a call can take.

A call reaches a runner two ways: eagerly (``api.Attention._bind_call``) or through a custom op under
``torch.compile`` (``runtime.ops``: sympy is not traceable, so the op binds the sizes when it runs).
Both call ``admit`` with the bound sizes and the tensors, so a backend, or the compiled path, cannot
skip a refusal: a backend that does not serve queries after a KV cache, a per-head softcap that is not
positive, a route's size-dependent block sizes, a route that needs the queries in the cache, work that cannot fit.
"""

from __future__ import annotations

import torch

from ..compiler.analysis import evaluate as E
from ..core.errors import SpecError
from .checks import check_fits, check_softcap
from .numerics import compute_dtype
from .plan import forms, routing
from .runner import refusal


def admit(runner, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict) -> None:
    """Refuse a softmax call of ``runner`` (bound as ``bound``, with call-time ``inputs`` by name) that it
    cannot serve, with the error every path gives, in the same order; errors name the argument at fault."""
    pat = runner.pattern
    E.bind_inputs(pat, bound, inputs, batch=q.shape[0], device=q.device)  # missing, unknown, misshapen inputs
    why = refusal(runner, "softmax", q.device, bound.q_offset)
    if why is not None:
        if bound.q_offset:
            raise SpecError(f"{bound.nk} keys but {bound.n} queries: {why}", where="argument k",
                            hint="use backend='cpu' or 'triton' for decoding")
        raise SpecError(why, where="argument q")
    if bound.q_offset:
        forms.refuse_query_offset(pat)  # a route selecting across queries needs the cached ones
    check_softcap(pat, bound)
    if pat.route is not None:
        routing.route_sizes(pat, bound)  # size-dependent block sizes and topk, refused before any work
    # every backend holds q, k, v, the output and its accumulator in fp32 (fp64): refuse
    # sizes that cannot fit (q, k, v may be zero-stride views that cost nothing themselves)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    item = torch.finfo(compute_dtype(q.dtype)).bits // 8
    check_fits(f"batch {B}, heads {Hq}, {Nq} tokens need an output of {float(B * Hq * Nq * Dv * item):.3g} bytes",
               item * (B * Hq * Nq * (D + 2 * Dv) + B * Hkv * Nk * (D + Dv)), "argument q", q.device)


class _FirstOrder(torch.autograd.Function):
    """Identity on a call's differentiable arguments. Where a graph of their gradients is asked for
    (``create_graph=True``), each gradient goes through ``_NotTwice``: differentiating it raises."""

    @staticmethod
    def forward(ctx, backend: str, *xs):
        ctx.backend = backend
        ctx.save_for_backward(*xs)
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True
            # each gradient hangs on the arguments too: a runner's gradients may hold no graph of them
            # at all, and a node off the path to what is differentiated would never run
            xs = ctx.saved_tensors
            grads = tuple(None if g is None else _NotTwice.apply(ctx.backend, g, *xs) for g in grads)
        return (None, *grads)


class _NotTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: str, grad, *xs):
        ctx.backend = backend
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise SpecError(f"the {ctx.backend} backend's gradients cannot be differentiated again (a double "
                        "backward through create_graph=True)", where="backward",
                        hint="use backend='reference' for higher-order gradients (dense, exact)")


def first_order(runner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: dict) -> tuple:
    """``(q, k, v, inputs)``, unchanged, except that where ``runner`` has no double backward
    (``Support.double_backward``) their gradients refuse to be differentiated again with one clear error,
    the same on every backend, instead of second-order gradients that come back None, first-order
    gradients that do not require grad, or torch's own error from inside a runner."""
    if runner.support.double_backward or not torch.is_grad_enabled():
        return q, k, v, inputs
    args = {"q": q, "k": k, "v": v, **{n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)}}
    args = {n: t for n, t in args.items() if t.requires_grad}
    if not args:
        return q, k, v, inputs
    # each tensor once (q, q, q for self-attention: dynamo traces no Function given one tensor twice),
    # found by `is`: id() would make dynamo guard on each tensor's identity and recompile every call
    unique: list = []
    for t in args.values():
        if not any(t is u for u in unique):
            unique.append(t)
    wrapped = _FirstOrder.apply(runner.name, *unique)
    out = {n: next(w for u, w in zip(unique, wrapped, strict=True) if u is t) for n, t in args.items()}
    return out.pop("q", q), out.pop("k", k), out.pop("v", v), {**inputs, **out}
