"""The reference backend as a runner: the dense, exact computation (``dense.attention``), the source
of truth every other backend is tested against."""

from __future__ import annotations

import torch

from ....core import ir
from ...checks import check_fits
from ...numerics import compute_dtype
from ...runner import Call, Support
from . import dense


class ReferenceRunner:
    """Dense scores, probabilities and mask, ``B x H x Nq x Nk`` each: any device, every feature."""

    name = "reference"
    support = Support(query_offset="native", compile=False, double_backward=True)  # plain torch autograd
    op = None

    def __init__(self, pattern: ir.PatternIR):
        self.pattern = pattern

    @property
    def last_schedule(self):
        return None

    def forward(self, call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        item = torch.finfo(compute_dtype(q.dtype)).bits // 8
        B, Hq, Nq, Nk = call.batch, call.heads, q.shape[2], k.shape[2]
        check_fits(f"the reference backend at batch {B}, heads {Hq}, {Nq} x {Nk} tokens needs dense "
                   f"scores of {float(B * Hq * Nq * Nk * item):.3g} bytes",
                   B * Hq * Nq * Nk * (3 * item + 1), "argument q", q.device)
        return dense.attention(self.pattern, call.bound, q, k, v, call.inputs, call.scale)

    def describe(self) -> str:
        p = self.pattern
        return "\n".join([f"# reference backend: dense attention '{p.name}'", *p.describe_terms()]) + "\n"
