"""The front door of a softmax call: every check and refusal that depends on the bound sizes, applied
once, the same on every path a call can take.

A call reaches a runner two ways: eagerly (``api.Attention._bind_call``) or through a custom op under
``torch.compile`` (``runtime.ops``: sympy is not traceable, so the op binds the sizes when it runs).
Both call ``admit`` with the bound sizes and the tensors, so a backend, or the compiled path, cannot
skip a refusal: a backend that does not serve queries after a KV cache, a per-head softcap that is not
positive, a route's size-dependent block sizes, a route that cannot be padded, work that cannot fit.
"""

from __future__ import annotations

import torch

from ..compiler import evaluate as E
from ..core import ir
from ..core.errors import SpecError
from .checks import check_fits, check_softcap
from .numerics import compute_dtype
from .plan import routing
from .runner import refusal


def padding_refusal(pat: ir.PatternIR) -> str | None:
    """Why queries after a KV cache cannot run with zero queries in front (``frontends.kv_cache``):
    a route that scores blocks of queries would score the zeros too. None where padding is exact."""
    route = pat.route
    if route is None or route.score == "token":
        return None
    if route.score == "antidiagonal":
        return (f"'{pat.name}' selects blocks by antidiagonal scoring over every query of a block: "
                "queries after a KV cache (nk > n) are not supported")
    return (f"'{pat.name}' routes by the mean of query blocks, which needs every query of a block: "
            "queries after a KV cache (nk > n) are not supported")


def admit(runner, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Refuse a softmax call of ``runner`` (bound as ``bound``) that it cannot serve, with the error every
    path gives; errors name the argument at fault."""
    pat = runner.pattern
    why = refusal(runner, "softmax", q.device, bound.q_offset)
    if why is not None:
        if bound.q_offset:
            raise SpecError(f"{bound.nk} keys but {bound.n} queries: {why}", where="argument k",
                            hint="use backend='cpu' or 'triton' for decoding")
        raise SpecError(why, where="argument q")
    if bound.q_offset and runner.support.query_offset == "padded":
        why = padding_refusal(pat)
        if why is not None:
            raise SpecError(why, where="argument k", hint="call with all the queries (nk == n)")
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
