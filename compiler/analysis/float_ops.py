"""Float ``**``, ``min`` and ``max`` that give the same bits in every element of a tensor.

torch's CPU kernels compute the vector lanes of a contiguous output with one code
path and the remaining (tail) elements with another, and for these operations the
two disagree: ``pow``'s vectorised approximation differs from libm's ``pow`` in the
last place (``0.5 ** 0.5``), and ``minimum``/``maximum`` order ``-0.0`` and ``0.0``
differently. A mask's answer would then depend on the token's position in the
tensor (``q ** (2 * k) % q ** 1.5`` turns the ulp into another remainder; ``1.0 /
max(x, 0.0)`` the zero's sign into an infinity's).
"""

from __future__ import annotations

import math

import torch


def float_pow(base, exp) -> torch.Tensor:
    """``torch.pow`` of float operands (tensors or Python floats), libm's ``pow`` in every element:
    an output whose innermost stride is not 1 is computed element by element, as a single element is."""
    tensors = [x for x in (base, exp) if isinstance(x, torch.Tensor)]
    if not tensors:
        return torch.pow(torch.tensor(float(base), dtype=torch.float64), exp)
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    device = tensors[0].device
    if math.prod(shape) <= 1 or device.type != "cpu":  # (one element, or one GPU code path for all)
        return torch.pow(base, exp)
    dtype = torch.result_type(base, exp)
    out = torch.empty((*shape, 2), dtype=dtype, device=device)[..., 0]  # innermost stride 2
    with torch.no_grad():
        exact = torch.pow(base, exp, out=out).contiguous()
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return exact
    # a gradient (a bias's): torch's differentiable pow, moved onto the exact value; two finite values an
    # ulp or so apart differ exactly (Sterbenz), so fast + (exact - fast) is exact
    fast = torch.pow(base, exp)
    near = torch.isfinite(fast) & torch.isfinite(exact)
    moved = torch.where(near, fast + (exact - fast).detach(), exact)
    return torch.where(fast == exact, fast, moved)


def min_max(vals: list[torch.Tensor], is_min: bool) -> torch.Tensor:
    """``min``/``max`` of tensors, NaN propagated, ``-0.0 < 0.0`` (IEEE 754's minimum and maximum)."""
    fn = torch.minimum if is_min else torch.maximum
    out = vals[0]
    for v in vals[1:]:
        m = fn(out, v)
        if m.dtype.is_floating_point:
            # two zeros: max is -0.0 only if both are (the sign of their sum), min 0.0 only if both are;
            # halved, a tie's gradient is split evenly, as torch's minimum and maximum split it
            both = (out == 0) & (v == 0)
            m = torch.where(both, ((-out) + (-v)) * -0.5 if is_min else (out + v) * 0.5, m)
        out = m
    return out
