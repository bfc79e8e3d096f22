"""The weights of ``weights F(s) ** P [/ sum]`` (``ir.Weights``) as the logarithms every backend takes the softmax
of: ``log(F(s) ** P)``, elementwise, differentiable, with a derivative finite everywhere (0 where the weight is 0).
One function per F, plain torch ops: the reference and CPU backends call them on score tensors, FlexAttention's
score_mod calls them by name (its generated text reads ``s = log_sigmoid_weight(s, 1.0)``), and the Triton kernels'
lines (``codegen.triton``) compute the same formulas. ``s`` is in natural units."""

from __future__ import annotations

import math

import torch

#: Below this argument ``log(softplus(x))`` is ``x`` to the last bit (softplus(x) = e^x (1 - e^x / 2 ...), e^-80 ~
#: 2e-35), and the direct form would lose its digits to float32's denormals.
SOFTPLUS_LOG_LINEAR = -80.0


def log_exp_weight(s: torch.Tensor, power: float) -> torch.Tensor:
    """``log(exp(s) ** P) = P s``."""
    return power * s


def log_sigmoid_weight(s: torch.Tensor, power: float) -> torch.Tensor:
    """``log(sigmoid(s) ** P) = -P softplus(-s) = P (min(s, 0) - log1p(exp(-|s|)))``."""
    return power * (torch.clamp(s, max=0.0) - torch.log1p(torch.exp(-torch.abs(s))))


def log_softplus_weight(s: torch.Tensor, power: float) -> torch.Tensor:
    """``log(softplus(s) ** P)``, softplus(s) = max(s, 0) + log1p(exp(-|s|)); ``P s`` below ``SOFTPLUS_LOG_LINEAR``."""
    softplus = torch.clamp(s, min=0.0) + torch.log1p(torch.exp(-torch.abs(s)))
    linear = s < SOFTPLUS_LOG_LINEAR
    return power * torch.where(linear, s, torch.log(torch.where(linear, torch.ones_like(softplus), softplus)))


def log_relu_weight(s: torch.Tensor, power: float) -> torch.Tensor:
    """``log(relu(s) ** P) = P log(s)``, -inf where ``s <= 0`` (its derivative 0 there)."""
    positive = s > 0
    return torch.where(positive, power * torch.log(torch.where(positive, s, torch.ones_like(s))),
                       torch.full_like(s, -math.inf))


#: ``F`` -> its function, by the name the generated Flex code calls it.
LOG_WEIGHTS = {"exp": log_exp_weight, "sigmoid": log_sigmoid_weight, "softplus": log_softplus_weight,
               "relu": log_relu_weight}


def log_weights(weights, s: torch.Tensor) -> torch.Tensor:
    """``log(F(s) ** P)`` of the pattern's ``weights`` (``ir.Weights``)."""
    return LOG_WEIGHTS[weights.function](s, float(weights.power))
