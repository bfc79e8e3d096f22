"""Ulysses: an all-to-all that trades sequence shards for head shards, and back.

Each of ``u`` ranks holds ``[B, H, L/u, D]`` (its part of the tokens, every head); after the swap it
holds ``[B, H/u, L, D]`` (every token of the group, its share of the heads: rank j heads
``j*H/u .. (j+1)*H/u - 1``). Differentiable: the backward of one swap is the other.
"""

from __future__ import annotations

import torch

from .collectives import all_to_all


def seq_to_heads(x: torch.Tensor, group, u: int) -> torch.Tensor:
    B, H, L, D = x.shape
    parts = x.reshape(B, u, H // u, L, D).permute(1, 0, 2, 3, 4)  # [u (head group), B, H/u, L, D]
    got = all_to_all(parts, group)  # [u (source rank = token part), B, H/u, L, D]
    return got.permute(1, 2, 0, 3, 4).reshape(B, H // u, u * L, D)


def heads_to_seq(x: torch.Tensor, group, u: int) -> torch.Tensor:
    B, h, L, D = x.shape
    parts = x.reshape(B, h, u, L // u, D).permute(2, 0, 1, 3, 4)  # [u (token part), B, h, L/u, D]
    got = all_to_all(parts, group)  # [u (source rank = head group), B, h, L/u, D]
    return got.permute(1, 0, 2, 3, 4).reshape(B, u * h, L // u, D)


class Swap(torch.autograd.Function):
    """``Swap.apply(x, group, u, to_heads)``: ``seq_to_heads`` (True) or ``heads_to_seq`` (False);
    the backward is the other one."""

    @staticmethod
    def forward(ctx, x, group, u, to_heads):
        ctx.group, ctx.u, ctx.to_heads = group, u, to_heads
        return (seq_to_heads if to_heads else heads_to_seq)(x, group, u)

    @staticmethod
    def backward(ctx, grad):
        return (heads_to_seq if ctx.to_heads else seq_to_heads)(grad, ctx.group, ctx.u), None, None, None
