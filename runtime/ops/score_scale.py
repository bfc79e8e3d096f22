"""A pattern's ``scale E`` clause as a ``torch.library`` custom op, so that a model calling a module of
such a pattern (``stdlib:softplus``) compiles with ``torch.compile(fullgraph=True)``.

The scale of every (head, query row) is evaluated from the pattern's sympy expression and the call's
bound sizes, which dynamo cannot trace. ``attnc::score_scale(key, nq, nk, hq, d, sizes, device, dtype)
-> [1, hq, nq, 1]`` evaluates it inside its implementation (the module's eager path, with its checks
and its cache of values); its only inputs are sizes, so its output needs no gradient and the op no
autograd formula. The fake implementation only makes the shape. ``key`` names the module itself in
``custom_op``'s registry; ``sizes`` is encoded as there.
"""

from __future__ import annotations

import torch

from . import common as C


def _impl(key: str, nq: int, nk: int, hq: int, d: int, sizes: str, device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    module = C._runner(key)
    # a copy: the module keeps its values cached, and a compiled graph may reuse an op's output buffer
    return module._score_scale_of(nq, nk, hq, d, C._decode_sizes(sizes), device, dtype).clone()


def _fake(key, nq, nk, hq, d, sizes, device, dtype):
    return torch.empty((1, hq, nq, 1), device=device, dtype=dtype)


def _define():
    op = torch.library.custom_op("attnc::score_scale", _impl, mutates_args=())
    op.register_fake(_fake)
    return op


#: ``torch.ops.attnc.score_scale``
score_scale = C.defined_once("score_scale_op", _define)
