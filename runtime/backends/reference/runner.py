"""The reference backend as a runner: the dense, exact computation (``dense.attention``), the source
of truth every other backend is tested against."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....core import ir
from ...checks import check_fits
from ...numerics import compute_dtype
from ...ops.common import Registered
from ...runner import Call, Support
from . import dense


class ReferenceRunner(Registered):
    """Dense scores, probabilities and mask, ``B x H x Nq x Nk`` each: any device, every feature. Eager calls are
    plain torch autograd (differentiable again); under ``torch.compile`` the call is ``attnc::runner_attention``
    (sympy binds the sizes inside it; its backward recomputes the forward under autograd)."""

    name = "reference"
    support = Support(query_offset="native", double_backward=True)
    op = "runner"

    def __init__(self, pattern: ir.PatternIR):
        self.pattern = pattern
        self.register_op()

    @property
    def last_schedule(self):
        return None

    def forward(self, call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self(call.bound, q, k, v, call.inputs, call.scale)

    def __call__(self, bound: E.Bound, q, k, v, inputs: dict, scale: float, need_lse: bool = True):
        """``(out, lse)`` of one call (``attnc::runner_attention`` calls it so), dense."""
        item = torch.finfo(compute_dtype(q.dtype)).bits // 8
        B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        check_fits(f"the reference backend at batch {B}, heads {Hq}, {Nq} x {Nk} tokens needs dense "
                   f"scores of {float(B * Hq * Nq * Nk * item):.3g} bytes",
                   B * Hq * Nq * Nk * (3 * item + 1), "argument q", q.device)
        return dense.attention(self.pattern, bound, q, k, v, inputs, scale)

    def describe(self) -> str:
        p = self.pattern
        return "\n".join([f"# reference backend: dense attention '{p.name}'", *p.describe_terms()]) + "\n"
