"""``return_block_max=SIZE`` (issue 44, SeerAttention): the block-wise max-pooled attention map a gate is trained
against, made by the forward that attends, with no second pass over the scores.

The map of a call is ``[B, Hq, ceil(Nq / SIZE), ceil(Nk / SIZE)]``: for each block of SIZE query rows (the call's
rows, ``i // SIZE``) and SIZE keys (``j // SIZE``), the largest attention probability of its pairs,
``max exp(s - lse)`` (a ``weights`` pattern's normalised weight), 0 where no pair is attended. In float32 (float64 for
float64 inputs), not differentiated.

A call asks for it with ``requesting(SIZE)``; the forward that runs reads ``requested()`` and hands its map to
``record``; the call takes what was recorded. Each backend makes it where its probabilities are: the reference from
its dense probabilities (``from_probabilities``), the CPU executor per chunk of tiles (``scatter_max``), the Triton
forward from each row's largest score per group of keys, stored by the kernel as it goes, with the row's final lse
(``from_row_maxima``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

_REQUEST: contextvars.ContextVar[tuple[int, list] | None] = contextvars.ContextVar("attnc_block_max", default=None)


@contextlib.contextmanager
def requesting(size: int):
    """Ask the forwards run while open for their map of ``size``-blocks: yields the list they are recorded in."""
    made: list[torch.Tensor] = []
    token = _REQUEST.set((size, made))
    try:
        yield made
    finally:
        _REQUEST.reset(token)


def requested(nq: int | None = None, nk: int | None = None) -> int | None:
    """The block size a forward is asked to pool its probabilities by, or None. With the call's query and key counts,
    a size beyond both is taken as the larger of them: the map is the same ``[.., 1, 1]``, and
    the rows padded to the size (``from_probabilities``) stay the call's (a size of 65,536 over 16 tokens padded
    the probabilities to 16 GiB; 2**63 overflowed)."""
    request = _REQUEST.get()
    if request is None:
        return None
    size = request[0]
    if nq is not None and nk is not None:
        size = min(size, max(nq, nk, 1))
    return size


def record(block_max: torch.Tensor) -> None:
    request = _REQUEST.get()
    if request is not None:
        request[1].append(block_max.detach())


def empty(B: int, H: int, nq: int, nk: int, size: int, dtype, device) -> torch.Tensor:
    return torch.zeros(B, H, math.ceil(nq / size), math.ceil(nk / size), dtype=dtype, device=device)


def from_probabilities(p: torch.Tensor, size: int) -> torch.Tensor:
    """The map of dense probabilities ``p`` ``[B, H, Nq, Nk]`` (0 on pairs not attended)."""
    B, H, nq, nk = p.shape
    qb, kb = math.ceil(nq / size), math.ceil(nk / size)
    padded = torch.nn.functional.pad(p.detach(), (0, kb * size - nk, 0, qb * size - nq))
    return padded.view(B, H, qb, size, kb, size).amax(dim=(3, 5))


def scatter_max(out: torch.Tensor, p: torch.Tensor, q_tok: torch.Tensor, k_tok: torch.Tensor, size: int) -> None:
    """Pool the probabilities ``p`` ``[B, H, C, R, K]`` of a chunk of tiles into ``out`` ``[B, H, QB, KB]`` (in
    place, by max): ``q_tok`` ``[C, R]`` and ``k_tok`` ``[C, K]`` are the rows' and keys' token indices (a padded
    slot's probability is 0, wherever it points)."""
    B, H, QB, KB = out.shape
    cell = (q_tok // size)[:, :, None] * KB + (k_tok // size)[:, None, :]  # [C, R, K]
    flat = out.view(B, H, QB * KB)
    flat.scatter_reduce_(2, cell.reshape(1, 1, -1).expand(B, H, -1).to(out.device),
                         p.detach().reshape(B, H, -1).to(out.dtype), reduce="amax")


def from_row_maxima(row_max_l2: torch.Tensor, lse: torch.Tensor, size: int, group: int, nk: int) -> torch.Tensor:
    """The map from each row's largest score (log2 units) per group of ``group`` keys, ``[B, H, Nq, groups]`` (-inf
    where the kernel attended no pair of the group), and the rows' natural-log lse ``[B, H, Nq]``: ``exp2(max -
    lse_2)`` per row and group, pooled over ``size`` rows and the groups of ``size`` keys (``size`` a multiple of
    ``group``)."""
    B, H, nq, groups = row_max_l2.shape
    lse_l2 = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse * (1 / math.log(2)))
    p = torch.exp2(row_max_l2 - lse_l2[..., None])  # a row with no key: exp2(-inf - inf) = 0
    per = size // group
    qb, kb = math.ceil(nq / size), math.ceil(nk / size)
    p = torch.nn.functional.pad(p, (0, max(kb * per - groups, 0), 0, qb * size - nq))[..., :kb * per]
    return p.view(B, H, qb, size, kb, per).amax(dim=(3, 5))
