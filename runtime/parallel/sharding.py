"""Which tokens each rank holds.

The sequence (a grid's tokens in row-major order) is cut into equal chunks. A ring of ``r`` ranks
holds ``chunks / r`` chunks each: contiguous runs (rank i: chunks i*c .. i*c + c - 1), or the zigzag
(head-tail) order of causal patterns (rank i: chunks i and 2r-1-i), which gives every rank the same
work under a causal mask. With Ulysses (``u`` ranks per ring position) a ring position's tokens are
split again into ``u`` contiguous parts, one per rank of its Ulysses group; the all-to-all gathers
them back before attention. ``positions(i)`` are the absolute token positions a ring position
holds, in the order its tensors hold them; ``shard`` and ``unshard`` are exact inverses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardOrder:
    """``n`` tokens in ``chunks`` equal chunks over ``ring`` ring positions of ``ulysses`` ranks each;
    ``zigzag``: head-tail order (2 chunks per ring position)."""

    n: int
    chunks: int
    ring: int
    ulysses: int
    zigzag: bool

    @property
    def chunk_len(self) -> int:
        return self.n // self.chunks

    def chunks_of(self, ring_index: int) -> list[int]:
        if self.zigzag:
            return [ring_index, 2 * self.ring - 1 - ring_index]
        per = self.chunks // self.ring
        return list(range(ring_index * per, (ring_index + 1) * per))

    def positions(self, ring_index: int) -> torch.Tensor:
        """Absolute positions held by a ring position (after the Ulysses all-to-all), int64."""
        c = self.chunk_len
        return torch.cat([torch.arange(i * c, (i + 1) * c) for i in self.chunks_of(ring_index)])

    def rank_positions(self, rank: int) -> torch.Tensor:
        """Absolute positions held by a rank of the group before the all-to-all (its ``shard``)."""
        pos = self.positions(rank // self.ulysses)
        part = len(pos) // self.ulysses
        j = rank % self.ulysses
        return pos[j * part:(j + 1) * part]

    def tail_rows(self, rank: int, last: int) -> torch.Tensor:
        """Which rows of a rank's shard hold one of the last ``last`` positions (bool)."""
        return self.rank_positions(rank) >= self.n - last

    def tail_width(self, last: int) -> int:
        """The most rows any rank holds among the last ``last`` positions."""
        return max(int(self.tail_rows(r, last).sum()) for r in range(self.ring * self.ulysses))

    def shard(self, t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
        return t.index_select(dim, self.rank_positions(rank).to(t.device))

    def unshard(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The whole tensor from every rank's shard (in rank order)."""
        index = torch.cat([self.rank_positions(r) for r in range(len(parts))]).to(parts[0].device)
        joined = torch.cat(parts, dim=dim)
        inverse = torch.empty_like(index)
        inverse[index] = torch.arange(len(index), device=index.device)
        return joined.index_select(dim, inverse)
