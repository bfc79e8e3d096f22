"""What a call may ask for beside its output (the seam: the requests' rules, apart from the call that serves them):
a route's selection given or returned (``selection=``, ``return_selection=``), the block max of its probabilities
(``return_block_max=``), a route's key summaries kept across decode steps (``key_summary=``); each refused by name
where it has no meaning or is not served."""

from __future__ import annotations

import torch

from ..core import ir
from ..core.errors import SpecError
from .compiling import compiling
from .plan import kept_summary


def check_block_max(pattern, backend: str, size, cu_seqlens, block_table, cache_seqlens) -> int:
    """``return_block_max``: a positive int, of a softmax pattern's call on a backend that pools it."""
    where = "argument return_block_max"
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SpecError(f"expected a positive int (the block size), got {size!r}", where=where)
    if not isinstance(pattern, ir.PatternIR):
        raise SpecError(f"'{pattern.name}' is a {pattern.kind} pattern: return_block_max pools the "
                        "probabilities of one softmax attention", where=where)
    if backend == "flex":
        raise SpecError("backend 'flex' gives no probabilities to pool: return_block_max is served by the "
                        "reference, cpu, triton and auto backends", where=where)
    if cu_seqlens is not None or block_table is not None or cache_seqlens is not None:
        raise SpecError("return_block_max is not served with packed sequences or paged caches in this version",
                        where=where)
    if compiling():
        raise SpecError("return_block_max is not served under torch.compile", where=where)
    return size


def check_key_summary(pat, summary, selection, cu_seqlens, block_table, cache_seqlens) -> None:
    """Refuse ``key_summary=`` where the call keeps no block summary."""
    where = kept_summary.WHERE
    if not isinstance(summary, kept_summary.KeySummary):
        raise SpecError(f"expected an attnc.KeySummary, got {type(summary).__name__}", where=where)
    why = (kept_summary.keeps(pat) if isinstance(pat, ir.PatternIR)
           else f"'{pat.name}' is a {pat.kind} pattern, with no route")
    if why is not None:
        raise SpecError(f"{why}: it has no key block summary to keep", where=where,
                        hint="key_summary= is for routes scored by q @ bound(k) or q @ mean(k) (quest, moba)")
    if selection is not None:
        raise SpecError("a given selection reads no summary of the keys", where=where,
                        hint="pass selection= or key_summary=, not both")
    if cu_seqlens is not None or (block_table is None) != (cache_seqlens is None):
        raise SpecError("a key summary is kept for a KV cache ([B, H, N, D], or a paged pool with block_table= "
                        "and cache_seqlens=): not with packed sequences in this version", where=where)
    if compiling():
        raise SpecError("key_summary= is not served under torch.compile (it is updated in place)", where=where)


def check_selection(pat, selection, return_selection: bool, cu_seqlens, block_table, cache_seqlens) -> None:
    """Refuse ``selection=`` / ``return_selection=True`` where they have no meaning or are not served."""
    what = "argument selection" if selection is not None else "argument return_selection"
    if not isinstance(pat, ir.PatternIR) or pat.route is None:
        raise SpecError(f"'{pat.name}' has no route whose selection could be given or returned", where=what,
                        hint="selection= and return_selection= are for routed patterns (moba, quest, vmoba, ...)")
    if cu_seqlens is not None or block_table is not None or cache_seqlens is not None:
        raise SpecError("a route's selection is not given or returned with packed sequences or paged caches in "
                        "this version", where=what, hint="call each sequence as a batch row")
    if compiling() and return_selection:
        raise SpecError("return_selection=True is not served under torch.compile", where=what,
                        hint="return the selection from an eager call; selection= works under compile")
    if selection is not None and (not isinstance(selection, torch.Tensor) or selection.dtype != torch.bool):
        got = selection.dtype if isinstance(selection, torch.Tensor) else type(selection).__name__
        raise SpecError(f"a selection is a bool tensor [B, Hq, Nq, blocks] (as return_selection=True gives), "
                        f"got {got}", where=what)
