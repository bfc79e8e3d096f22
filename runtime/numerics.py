"""Numerics every backend shares: the compute dtype, GQA expansion, FoX decay prefix sums, the
outputs of an empty batch and the seeded inputs of a timed training step."""

from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulated(t: torch.Tensor) -> torch.Tensor:
    """A call-time input as the score terms read it: a float16 or bfloat16 one that takes a gradient in float32, so that
    the gradient's sum over the pairs that read an element rounds once, to the input's dtype at the end (summed
    in bfloat16 it was 5-8 units in the last place off), as the tiled backends sum it."""
    if isinstance(t, torch.Tensor) and t.requires_grad and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """GQA: repeat key/value heads so that query head h reads kv head h // (Hq // Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


#: The lowest FoX gate counted as given (``fox_prefix``): a finite gate below it counts as it.
FOX_GATE_FLOOR = -1e4


def fox_prefix(gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefix sums of Forgetting Transformer gates ``[..., N]`` in a form whose pair differences stay at
    the gates' rounding at any length: ``(hi, lo, reset)``.

    ``hi + lo`` is the float64 cumulative sum of the finite gates split into two numbers of the gates'
    dtype, so ``(hi[q] - hi[k]) + (lo[q] - lo[k])`` is ``sum(g[k+1 .. q])`` to the rounding of its own
    size (the difference of two large cumulative sums in float32 would lose ``eps * |cumsum|``, which
    grows with n). A gate of ``-inf`` is a hard reset (decay exactly 0): it adds nothing to ``hi``/``lo``
    and ``reset[t]`` is the position of the last reset at or before ``t`` (-1 if none), so a pair
    ``k < reset[q]`` has weight exactly 0, forward and backward (the reset gate's gradient is 0, the
    limit as the gate goes to -inf).

    A finite gate below ``FOX_GATE_FLOOR`` counts as the floor (gradient 0): a pair across it has a weight of
    ``exp(-10000)`` times the others', 0 in float64 as at the gate itself, unless scores differ by thousands. The
    floor keeps the sums' size, so that two keys on one side of a gate of -1e16 keep their own decay (in the sum
    with it they lost it), and two gates of float32's lowest do not overflow to -inf (NaN rows)."""
    neg = torch.isneginf(gates)
    gates = torch.clamp(gates, min=FOX_GATE_FLOOR)  # (NaN stays NaN; -inf is a reset, taken apart)
    c = torch.cumsum(torch.where(neg, torch.zeros((), dtype=gates.dtype, device=gates.device), gates)
                     .to(torch.float64), dim=-1)
    hi = c.to(gates.dtype)
    lo = (c - hi.to(torch.float64)).to(gates.dtype)
    pos = torch.arange(gates.shape[-1], device=gates.device).expand(gates.shape)
    reset = torch.cummax(torch.where(neg, pos, -1), dim=-1).values
    return hi, lo, reset


def fox_pairs(hi: torch.Tensor, lo: torch.Tensor, reset: torch.Tensor, q_index: torch.Tensor,
              k_index: torch.Tensor) -> torch.Tensor:
    """``sum(g[k+1 .. q])`` for broadcastable token indices, from ``fox_prefix``; ``-inf`` across a reset.
    Only pairs with ``k <= q`` are meaningful (FoX masks are causal)."""
    d = (hi[..., q_index] - hi[..., k_index]) + (lo[..., q_index] - lo[..., k_index])
    return torch.where(k_index >= reset[..., q_index], d, torch.full((), -math.inf, dtype=d.dtype, device=d.device))


def fox_decay(gates: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """Forgetting Transformer term ``sum(g[h, k+1 .. q])`` (``fox_prefix``: exact to rounding at any
    length, ``-inf`` across a gate of ``-inf``).

    ``gates`` is ``[B | -, H, N]``; returns ``[B | 1, H, Nq, Nk]``."""
    if gates.dim() == 2:
        gates = gates.unsqueeze(0)
    return fox_pairs(*fox_prefix(gates), q_index[:, None], k_index[None, :])


def merge_by_lse(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attentions of the same queries over disjoint keys merged into the one softmax over all their keys:
    ``out`` ``[..., N, Dv]`` and ``lse`` ``[..., N]`` of each (``merge_lse_parts``; returns new tensors)."""
    return merge_lse_parts([out, part], [lse, part_lse])


def merge_lse_parts(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attentions of the same queries over disjoint keys (``outs`` ``[..., N, Dv]``, ``lses`` ``[..., N]``) merged
    into the one softmax over all their keys: each weighted by ``exp(lse_i - top)`` over the weights' sum (``top``
    the row's largest lse), not by ``exp(lse_i - lse)``, which loses the sum's logarithm where lse reaches 1e16
    (limits.md). A row empty in every part stays 0 / -inf; differentiable, with finite gradients there too."""
    stacked = torch.stack(lses)
    some = torch.isfinite(stacked).any(0)
    zero = torch.zeros((), dtype=stacked.dtype, device=stacked.device)
    top = torch.where(some, stacked.masked_fill(~torch.isfinite(stacked), -math.inf).amax(0), zero).detach()
    weights = torch.where(some, torch.exp(stacked - top), zero)
    total = weights.sum(0)
    whole = torch.where(some, total, torch.ones_like(total))
    out = sum(w[..., None] * o for w, o in zip(weights, outs, strict=True)) / whole[..., None]
    return out, torch.where(some, top + torch.log(whole), torch.full_like(top, -math.inf))


def merge_softmax(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attentions over disjoint key sets merged into the one softmax over all their keys (``merge_by_lse``
    in turn: a branch with no key weighs 0; a row with no key in any outputs 0, lse -inf). In fp32 (fp64 for fp64
    outputs); differentiable."""
    dtype = compute_dtype(outs[0].dtype)
    out, lse = outs[0].to(dtype), lses[0].to(dtype)
    for part, part_lse in zip(outs[1:], lses[1:], strict=True):
        out, lse = merge_by_lse(out, lse, part.to(dtype), part_lse.to(dtype))
    return out, lse


def empty_batch_outputs(q: torch.Tensor, v: torch.Tensor, lse_dtype: torch.dtype):
    """``(out, lse)`` of a batch of 0 (or any size): zeros and ``-inf``, as on the other backends."""
    B, Hq, Nq, _ = q.shape
    return q.new_zeros(B, Hq, Nq, v.shape[-1]), q.new_full((B, Hq, Nq), -float("inf"), dtype=lse_dtype)


def tied_to(x: torch.Tensor, *tensors) -> torch.Tensor:
    """``x``, a result with no elements, made to depend on the float tensors among ``tensors`` that require
    grad: a backward through it then gives them zero gradients, as a call with elements does (rather
    than failing on an output that does not require grad)."""
    leaves = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves or not torch.is_grad_enabled():
        return x
    return x + (sum(t.sum() for t in leaves) * 0).to(x.dtype)


def needs_grad(*tensors) -> bool:
    """Whether autograd records this call: grad mode on and some tensor among ``tensors`` (others
    ignored) requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


#: The torch dtype of each canonical dtype name (the tuner's and the offline GPU check's).
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def timing_inputs(bound, *, head_dim: int, dtype: str, batch: int, device, kv_heads: int | None = None):
    """Random q, k, v and the output's gradient of a timed training step (``dtype`` canonical, seeded): q
    and the gradient with ``bound.heads`` heads, k and v with ``kv_heads`` (None: as many)."""
    tdtype = TORCH_DTYPES[dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    kv = bound.heads if kv_heads is None else kv_heads
    shapes = ((bound.heads, bound.n), (kv, bound.nk), (kv, bound.nk), (bound.heads, bound.n))
    return tuple(torch.randn(batch, h, n, head_dim, generator=gen).to(device=device, dtype=tdtype)
                 for h, n in shapes)


def row_weights(scores: torch.Tensor, allowed: torch.Tensor | None, empty: torch.Tensor) -> torch.Tensor:
    """Softmax weights of each row of ``scores`` (``[..., keys]``, -inf where masked) over its allowed keys,
    divided by the row's sum, not ``exp(s - lse)``: where scores reach 1e16 and more, lse's log(sum) rounds away
    (-1e30 + log 2 is -1e30) and two tied keys would weigh 1 each (limits.md). ``empty`` (``[...]``): rows with no
    key, all 0. Masked pairs are taken out after the division too, so their gradient (NaN where a value row is)
    stays out of the row's sum."""
    if not scores.shape[-1]:
        return scores
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    top = scores.masked_fill(empty[..., None], 0.0).amax(-1, keepdim=True).detach()
    e = torch.exp(scores - top)
    if allowed is not None:
        e = torch.where(allowed, e, zero)
    p = e / e.sum(-1, keepdim=True).masked_fill(empty[..., None], 1.0)
    return p if allowed is None else torch.where(allowed, p, zero)


def soft_capped(scores: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """The softcap ``cap * tanh(scores / cap)`` in ``scores``' dtype; ``cap`` broadcasts against ``scores`` (a
    head's cap per head), on the CPU or ``scores``' device. A cap beyond that dtype's range (``softcap 1e39`` over
    float32 scores, which the cpu and reference backends take) is applied in float64: held in the dtype it would
    be inf, and ``inf * tanh(s / inf)`` is NaN."""
    if torch.isinf(cap.to(scores.dtype)).any():
        wide = cap.to(device=scores.device, dtype=torch.float64)
        return (wide * torch.tanh(scores.double() / wide)).to(scores.dtype)
    cap = cap.to(device=scores.device, dtype=scores.dtype)
    return cap * torch.tanh(scores / cap)


def unnormalized_output(pat, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """The output of a pattern whose weights are not divided by their row sum (``weights F(s) ** P`` without
    ``/ sum``), from the softmax of ``log_weights`` every backend computes: ``out * exp(lse)``, the row's sum of
    weights put back (0 on a row with none). Unchanged for softmax and ``/ sum`` weights."""
    weights = getattr(pat, "weights", None)
    if weights is None or weights.normalized:
        return out
    total = torch.exp(lse).to(out.dtype)  # lse -inf: 0
    return out * total[..., None]
