"""Longest-first placement of CTA work on a GPU's SMs: the makespan estimate the cost model takes where
the launch order is not placed CTA by CTA (``cost.launch_makespan``), and the decode model's split
placement (``decode_cost``).
"""

from __future__ import annotations

import math

import torch

#: Beyond this many CTAs per SM the sorted CTAs are merged into buckets first.
MAX_ROUNDS = 256


def makespan(work: torch.Tensor, sms: int, repeat: int | float = 1) -> float:
    """Longest-first placement of CTA work (seconds, any shape), each CTA
    launched ``repeat`` times, on ``sms`` SMs: the finishing time of the
    busiest SM. Vectorised LPT: the CTAs, sorted longest first, are placed a
    wave of ``sms`` at a time, the longest of the wave on the least-loaded SM
    (exactly LPT for the first wave; within a few per cent of it after). Above
    ``MAX_ROUNDS`` waves, consecutive sorted CTAs are merged into one
    placement unit (the total is kept). The repeated CTAs are never
    materialised, so ``repeat`` may be huge (a batch of 10**18)."""
    w = torch.sort(work.reshape(-1).to(torch.float64), descending=True).values
    if w.numel() == 0 or repeat == 0:
        return 0.0
    count = w.numel() * repeat  # CTAs in all (a Python number: never overflows)
    if count <= sms:
        return float(w[0])
    rounds = math.ceil(count / sms)
    if bool(w[0] == w[-1]):  # identical CTAs (dense attention): LPT is exact in closed form
        return rounds * float(w[0])
    if rounds > MAX_ROUNDS or repeat != 1:
        # Units of `group` consecutive CTAs of the sorted, repeated sequence, summed from its
        # prefix sums: CTA j of that sequence is w[j // repeat].
        group = max(1, math.ceil(rounds / MAX_ROUNDS)) if rounds > MAX_ROUNDS else 1
        units = math.ceil(count / group)
        bounds = torch.arange(units + 1, dtype=torch.float64) * group
        bounds[-1] = float(count)
        prefix = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])

        def upto(j: torch.Tensor) -> torch.Tensor:
            i = torch.clamp(torch.floor(j / repeat), max=w.numel() - 1).to(torch.int64)
            return prefix[i] * repeat + (j - i.to(torch.float64) * repeat) * w[i]

        w = upto(bounds[1:]) - upto(bounds[:-1])
        w = torch.sort(w, descending=True).values
        if w.numel() <= sms:
            return float(w[0])
        rounds = -(-w.numel() // sms)
    pad = rounds * sms - w.numel()
    waves = torch.cat([w, w.new_zeros(pad)]).view(rounds, sms)
    load = torch.zeros(sms, dtype=torch.float64)
    for wave in waves:
        load = torch.sort(load).values + wave  # ascending loads + descending work
    return float(load.max())


__all__ = ["MAX_ROUNDS", "makespan"]
