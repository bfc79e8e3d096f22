"""HyperAttention's non-causal approximation (sortLSH plus sampled keys) with attnc: a recipe.

HyperAttention (Han, Avron, Shoham, Woodruff, Zandieh, ICLR 2024, "HyperAttention: Long-context Attention in
Near-Linear Time"; code github.com/insuhan/hyper-attn at 68b91e9b, ``HyperAttention.forward_no_causal_mask``)
approximates softmax attention by two attentions merged by their log-sum-exp:

1. sortLSH: queries and keys are hashed by angular LSH (``r`` random projections, the sign bits read as a Gray
   code), stably sorted by hash, and each query attends the keys of its block in sorted order (block-diagonal
   attention there, ``block`` keys a block, as many queries);
2. sampled keys: ``samples`` key positions of the sorted order drawn uniformly with replacement; each query
   attends those outside its own block (a key drawn twice counts twice), the sum weighted by ``nk / samples``.

Both are attnc patterns over call-time inputs, so the hashing and sampling stay in torch and the attention is
compiled: the block of every query and key (its sorted rank // block), and how many times each key was drawn::

    pattern sorted_blocks                       pattern sampled_keys
      tokens seq                                  tokens seq
      input qb: int[heads, n]                     input qb: int[heads, n]
      input kb: int[heads, nk]                    input kb: int[heads, nk]
      mask qb[h, q] == kb[h, k]                   input times: float[heads, nk]
                                                  mask times[h, k] > 0 and qb[h, q] != kb[h, k]
                                                  bias log(times[h, k])

The weight ``nk / samples`` adds ``log(nk / samples)`` to the second's log-sum-exp; the merge is the code's
``add_self_attentions``. The causal form (the code's recursion over halves, exact below ``min_seq_len``) is
built of the same two calls plus a causal one; this recipe covers the non-causal form, for sequence lengths the
block divides (the code pads otherwise).

How far from exact softmax: on random inputs it is an approximation, not a bound; ``python
docs/examples/hyper_attention.py`` prints the relative error against exact attention at a few sizes.
"""

from __future__ import annotations

import math

import torch

import attnc

SORTED_BLOCKS = ("pattern sorted_blocks\n  tokens seq\n  input qb: int[heads, n]\n  input kb: int[heads, nk]\n"
                 "  mask qb[h, q] == kb[h, k]\n")
SAMPLED_KEYS = ("pattern sampled_keys\n  tokens seq\n  input qb: int[heads, n]\n  input kb: int[heads, nk]\n"
                "  input times: float[heads, nk]\n  mask times[h, k] > 0 and qb[h, q] != kb[h, k]\n"
                "  bias log(times[h, k])\n")


def gray_code(bits: int) -> torch.Tensor:
    """The reflected Gray code of ``bits`` bits (the code's ``_unit_hamming_distance_array``): neighbouring
    hashes differ in one projection's sign."""
    code = torch.tensor([0, 1])
    for b in range(1, bits):
        code = torch.cat([code, code.flip(0) + 2 ** b])
    return code


def lsh_hash(x: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Angular LSH: the signs of ``x @ projections`` ``[D, r]`` as bits, read through the Gray code: ``[B, H, N]``."""
    bits = (x @ projections > 0).long()
    return gray_code(projections.shape[-1])[(bits * 2 ** torch.arange(projections.shape[-1])).sum(-1)]


class HyperAttention:
    """Non-causal HyperAttention with attnc's patterns (see the module docstring). ``projections`` ``[D, r]``
    and the sampled positions are given so that a run is reproducible; ``backend`` is attnc's."""

    def __init__(self, block: int = 256, samples: int = 256, backend: str = "cpu"):
        self.block, self.samples = block, samples
        self.blocks = attnc.compile_attention(SORTED_BLOCKS, backend=backend)
        self.sampled = attnc.compile_attention(SAMPLED_KEYS, backend=backend)

    def __call__(self, q, k, v, projections: torch.Tensor, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) for q ``[B, H, N, D]``, k, v ``[B, H, Nk, D]``; ``sampled`` ``[B, H, samples]`` positions of the
        keys' sorted order (the code's ``sampled_set``)."""
        B, H, n, _ = q.shape
        nk = k.shape[2]
        if n % self.block or nk % self.block:
            raise ValueError(f"the block ({self.block}) must divide the sequence lengths ({n}, {nk})")
        q_rank = torch.argsort(torch.sort(lsh_hash(q, projections), dim=2, stable=True).indices, dim=2, stable=True)
        k_order = torch.sort(lsh_hash(k, projections), dim=2, stable=True).indices
        k_rank = torch.argsort(k_order, dim=2, stable=True)
        q_block = q_rank // (n // (nk // self.block))  # as many query blocks as key blocks
        k_block = k_rank // self.block
        times = torch.zeros(B, H, nk, dtype=q.dtype).scatter_add_(
            2, k_order.gather(2, sampled), torch.ones(sampled.shape, dtype=q.dtype))  # draws of each key
        out1, lse1 = self.blocks(q, k, v, qb=q_block, kb=k_block, return_lse=True)
        out2, lse2 = self.sampled(q, k, v, qb=q_block, kb=k_block, times=times, return_lse=True)
        lse2 = lse2 + math.log(nk / self.samples)
        lse = torch.logaddexp(lse1, lse2)
        out = out1 * (lse1 - lse).exp()[..., None] + out2 * (lse2 - lse).exp()[..., None]
        return out, lse


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    for n, block, samples in ((1024, 64, 64), (2048, 128, 256)):
        for keys in ("independent", "near the queries"):
            q, k, v = (torch.randn(1, 4, n, 64, generator=g, dtype=torch.float64) for _ in range(3))
            if keys == "near the queries":  # heavy entries: each query's own key dominates its row
                k = q + 0.3 * torch.randn(q.shape, generator=g, dtype=torch.float64)
            projections = torch.randn(64, 7, generator=g, dtype=torch.float64)
            sampled = torch.randint(n, (1, 4, samples), generator=g)
            out, _ = HyperAttention(block, samples)(q, k, v, projections, sampled)
            exact = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
            error = float((out - exact).norm() / exact.norm())
            print(f"n {n}, block {block}, samples {samples}, keys {keys}: relative error {error:.3f}")
