"""The ``torch.library`` custom ops of attnc, every one of them: softmax runners (``common``:
``attnc::tiled_attention``, ``attnc::triton_attention``), runners called as a whole
(``flex``: ``attnc::runner_attention``), recurrences (``recurrence``) and packed sequences
(``varlen``). They know no backend: each calls the runner registered under its key."""

from __future__ import annotations

from .common import encode_sizes, register, tiled_attention, triton_attention
from .flex import runner_attention

__all__ = ["encode_sizes", "register", "runner_attention", "tiled_attention", "traced_attention", "triton_attention"]


def traced_attention(runner, q, k, v, inputs: dict, sizes: dict, scale: float, need_lse: bool):
    """``(out, lse)`` of a softmax call traced by dynamo: the op the runner declares (``runner.op``)
    with the runner's key; sizes and inputs are bound inside the op (sympy is not traceable)."""
    args = (q, k, v, list(inputs.values()), runner.op_key, ",".join(inputs), encode_sizes(sizes), float(scale))
    if runner.op == "runner":
        return runner_attention(*args, need_lse)
    return {"tiled": tiled_attention, "triton": triton_attention}[runner.op](*args)
