"""``backend="auto"`` on CUDA tensors: attnc's Triton kernels, or the Flex lowering where the
autotuner (``tuning.autotune``, when installed) timed it faster for the call's shape bucket."""

from __future__ import annotations

import torch

from ...compiler.analysis import evaluate as E
from ..backends.triton.runner import TritonRunner


def flex_won(auto, bound: E.Bound, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the Flex lowering beat attnc's kernels for this shape bucket (the tuner times it beside
    them and records the winner; ``autotune.tuned_winner``, keyed by the K/V heads of ``k`` too). A known
    winner is remembered per shapes on ``auto.cuda_winner``."""
    if auto.flex is None:
        return False
    if TritonRunner.config_hook is None:  # no tuning: attnc's kernels with the simulator's schedule
        return False
    key = (tuple(sorted(bound.axis_sizes.items())), bound.n, bound.nk, bound.heads, k.shape[1], *q.shape[::3], q.dtype)
    if key not in auto.cuda_winner:
        from ..tuning import autotune

        winner = autotune.tuned_winner(auto.pattern, bound, head_dim=int(q.shape[-1]), dtype=q.dtype,
                                       batch=int(q.shape[0]), device=q.device, kv_heads=int(k.shape[1]))
        if winner is None:  # not tuned yet: the Triton runner tunes this bucket at this call
            return False
        auto.cuda_winner[key] = winner
    return auto.cuda_winner[key] == "flex"
