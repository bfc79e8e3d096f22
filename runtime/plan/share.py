"""Top-p block selection by the cumulative share of min-max normalised scores (VMoBA): the rule of
``route topp(P) blocks(...) by minmax(q @ mean(k)) over GROUP [keep EXPR]``.

As KwaiVGI/VMoBA's ``moba_attn_varlen`` with ``select_mode='threshold'`` computes it (``src/vmoba.py`` at
commit 4da72ff2, the ``_select_threshold_*`` functions), for every group of (query, head, block) entries of
a batch row: one query's blocks (GROUP ``query``, the code's ``query_head``), one head's (query, block)
pairs (``head``, ``head_global``), one block's (head, query) pairs (``block``) or all of them (``all``,
``overall``):

- an entry is valid where the mask lets the query reach some key of the block; forced where ``keep``
  holds too (VMoBA: the query's own block);
- scores (``q . mean(k_block)``, unscaled, fp32; fp64 for fp64 inputs) are min-max normalised over the
  group's valid entries (a spread of at most 1e-6 divides by 1), invalid entries count 0;
- ``needed = max(0, P - forced / (total + 1e-6))``, with ``forced`` and ``total`` the sums of the
  normalised scores of the forced and of all entries of the group;
- the entries are ranked by normalised score, descending, the forced and invalid ones at 0 (as the code
  zeroes them; ``all`` ranks the valid unforced entries alone, as its code does), ties to the lower index in
  the group's order: (block) for ``query``, (block, query) for ``head``, (head, query) for ``block`` and
  (block, head, query) for ``all``;
- the first entries of that ranking are taken up to and including the first at which their running sum
  reaches ``needed * (total + 1e-6)`` (so at least one, even when the forced entries alone reach P), or all
  of them where none does; then the forced entries, and valid entries only.

Nothing here is differentiated; nothing is read on the host (the selection runs where the scores are).
"""

from __future__ import annotations

import torch

#: The code's epsilon: a spread at most this is no spread, and it is added to every share's total
EPS = 1e-6

#: Per group: the permutation of ``[B, Hq, Nq, nblocks]`` that puts the group's members last, and how many
#: leading dimensions of the permuted shape index the groups
_GROUPS = {"query": ((0, 1, 2, 3), 3), "head": ((0, 1, 3, 2), 2), "block": ((0, 3, 1, 2), 2),
           "all": ((0, 3, 1, 2), 1)}


def threshold(score: torch.Tensor, valid: torch.Tensor, forced: torch.Tensor | None, p: float, group: str
              ) -> torch.Tensor:
    """The selection ``[B, Hq, Nq, nblocks]`` of the rule above from the scores ``[B, Hq, Nq, nblocks]``, the
    valid entries and the forced ones (each broadcastable to it; ``forced`` None forces nothing)."""
    shape = score.shape
    valid = torch.broadcast_to(valid, shape)
    forced = torch.zeros_like(valid) if forced is None else torch.broadcast_to(forced, shape) & valid
    order, lead = _GROUPS[group]
    permuted = tuple(shape[d] for d in order)

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [groups, members]
        return t.permute(order).reshape(*permuted[:lead], -1)

    x, ok, own = grouped(score), grouped(valid), grouped(forced)
    low = torch.where(ok, x, torch.inf).amin(-1, keepdim=True)
    high = torch.where(ok, x, -torch.inf).amax(-1, keepdim=True)
    spread = high - low
    spread = torch.where(spread <= EPS, torch.ones_like(spread), spread)
    norm = torch.where(ok, (x - low) / spread, torch.zeros_like(x))
    total = norm.sum(-1, keepdim=True)
    needed = (p - (norm * own).sum(-1, keepdim=True) / (total + EPS)).clamp(min=0)
    others = torch.where(own, torch.zeros_like(norm), norm)
    candidate = ok & ~own
    # the ranking: the code's zeros for forced and invalid entries, or (``all``) those entries after every other
    rank_key = torch.where(candidate, others, torch.full_like(others, -1.0)) if group == "all" else others
    index = torch.sort(rank_key, dim=-1, descending=True, stable=True).indices
    taken = torch.where(candidate, others, torch.zeros_like(others)).gather(-1, index) if group == "all" else \
        others.gather(-1, index)
    reached = taken.cumsum(-1) / (total + EPS) >= needed
    members = reached.shape[-1]
    first = torch.where(reached.any(-1, keepdim=True), reached.to(torch.int8).argmax(-1, keepdim=True),
                        torch.full_like(needed, members - 1, dtype=torch.int64))
    places = torch.arange(members, device=score.device)
    chosen = torch.zeros_like(ok).scatter(-1, index, places <= first)
    chosen = ok & (chosen | own)
    return chosen.reshape(permuted).permute(_inverse(order))


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    back = [0] * len(order)
    for i, d in enumerate(order):
        back[d] = i
    return tuple(back)
