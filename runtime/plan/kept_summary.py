"""Block summaries of the keys kept across the decode steps of one sequence (``KeySummary``).

A block route scores each key block by a summary of its keys: Quest's per-dimension extremes (``q @ bound(k)``),
MoBA's mean key (``q @ mean(k)``). Made at every call, that summary reads every key of the cache, once per step:
the one pass of a decode step that does not shrink with the route. A KV cache only appends, so a complete
block's summary never changes; ``KeySummary`` keeps the complete blocks' and a step summarises only the keys
from its first incomplete block on (at most ``block - 1`` kept keys plus the new ones).

The caller's promise, which is not checked (it would mean reading the keys): the keys a summary covers do not
change between the calls that pass it (``KeySummary.keys`` of them, always a whole number of blocks). So one
``KeySummary`` serves one layer's cache of one sequence: every layer keeps its own (their shapes match, so a
shared one is not caught), and a new sequence in the same buffer starts with ``reset()`` or a new one.

On a paged pool (``block_table=``, ``cache_seqlens=``, the one-launch path: ``backends.triton.paged_routes``) a
``KeySummary`` keeps every table row's complete blocks instead, on the device (``paged``), with the page ids they were
made from: a block whose pages are not the row's pages now (rows reordered between steps, as vLLM's and SGLang's
batches are, a row given to a new sequence on other pages) and a row that shrinks are summarised again by themselves
(a table of another width keeps the blocks of the pages it shares; one of another row count is another summary's); a row that starts a new sequence on the very pages of its old one, at the same or a greater length, is the
caller's to say (``reset_rows``).

``keeping`` opens a summary for the calls inside it; ``summaries`` is what the top-k-blocks form reads: the kept
summary where one is open and the route keeps one (``keeps``), else ``route_scores.key_summary`` of every key.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.route_blocks import route_sizes
from ...core import ir
from ...core.errors import SpecError
from .route_scores import key_summary

WHERE = "argument key_summary"


def keeps(pat: ir.PatternIR) -> str | None:
    """Why ``pat``'s route has no block summary to keep (None where it has one)."""
    route = pat.route
    if route is None:
        return f"'{pat.name}' has no route"
    if not route.is_top_k() or route.scores_input is not None:
        return f"'{pat.name}' does not route by top-k key blocks scored from their keys"
    if route.tokens or route.params.score not in ("token", "bound"):
        return (f"'{pat.name}' scores its route by {'single keys' if route.tokens else 'query blocks'}: only "
                "q @ mean(k) (MoBA) and q @ bound(k) (Quest) summarise key blocks")
    if pat.keys.kind != "seq":
        return f"'{pat.name}' lays its keys on a grid, whose blocks are not runs of the cache"
    return None


class KeySummary:
    """The per-block key summaries (Quest's bounds, MoBA's means) of one sequence's KV cache, kept across decode
    steps: ``out = attn(q_t, k_cache[:, :, :n], v_cache[:, :, :n], key_summary=kept)`` updates ``kept`` and reads
    only the keys after its last complete block. The keys it covers (``keys``) must not change between calls: one
    ``KeySummary`` per layer and sequence (a summary shared by two layers is not detected and chooses wrong
    blocks); ``reset()`` starts a new sequence. Not differentiated (the selection is not)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every block: the next call summarises all its keys."""
        self._blocks: tuple[torch.Tensor, ...] = ()
        self._keys = 0
        self._signature: tuple | None = None
        #: a paged pool's: the summaries of every table row's blocks, each row's kept (complete) blocks, and the
        #: block table they were made from (``stale``)
        self._pages: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def reset_rows(self, rows) -> None:
        """Forget the blocks of these rows of a paged call's block table (a row that starts a new sequence): their
        next call summarises all their keys. ``rows``: indices, or a bool mask, of the table's rows (a device
        tensor: nothing is read on the host; an index out of range is a device assert, at once on a CPU). A row whose
        length falls below its kept blocks is reset by itself."""
        where = "argument rows"
        if isinstance(rows, list | tuple) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            rows = torch.tensor(rows, dtype=torch.long)
        if not isinstance(rows, torch.Tensor) or rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dim() != 1:
            got = f"{rows.dtype} of shape {list(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise SpecError(f"expected row indices (a 1-D int tensor or list) or a bool mask of the rows, got {got}",
                            where=where)
        if self._pages is None:
            return
        count = self._pages[1].shape[0]
        if rows.dtype == torch.bool:
            if rows.shape[0] != count:
                raise SpecError(f"a bool mask of the table's {count} rows, got {rows.shape[0]}", where=where)
        else:
            try:  # (a negative index would reset another row without a word)
                torch._assert_async(((rows >= 0) & (rows < count)).all(), "attnc: KeySummary.reset_rows: a row index "
                                    "is out of range")
            except RuntimeError:
                raise SpecError(f"a row index is outside 0..{count - 1}", where=where) from None
        self._pages[1][rows.to(self._pages[1].device)] = 0

    @property
    def keys(self) -> int:
        """How many keys the kept blocks cover (a whole number of blocks)."""
        return self._keys

    def __repr__(self) -> str:
        if self._pages is not None:
            return f"KeySummary(paged rows={self._pages[1].shape[0]})"
        return f"KeySummary(keys={self._keys})"

    def paged(self, score: str, block: int, shape: tuple, device, table_shape: tuple = (0, 0)
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A paged call's kept state (``runtime.backends.triton.paged_routes``): the summaries ``shape`` (``[1 | 2,
        rows, Hkv, nblocks, D]`` fp32) of every table row's blocks of ``block`` keys, each row's kept blocks (int32
        ``[rows]``) and the block table (int32 ``table_shape``) they were made from, made at the first call; the same
        call shape at every later one."""
        signature = ("paged", score, block, shape, torch.device(device))
        if self._signature is not None and signature != self._signature:
            raise SpecError(f"this summary was kept for {_describe(self._signature)}, not "
                            f"{_describe(signature)}", where=WHERE,
                            hint="one KeySummary per layer and paged pool (its table's shape); reset() before "
                                 "reusing one")
        if self._pages is None:
            self._pages = (torch.zeros(shape, dtype=torch.float32, device=device),
                           torch.zeros(shape[1], dtype=torch.int32, device=device),
                           torch.full(table_shape, -1, dtype=torch.int32, device=device))
            self._signature = signature
        elif tuple(self._pages[2].shape) != tuple(table_shape):  # a table of another width, as many blocks: the
            made_from = torch.full(table_shape, -1, dtype=torch.int32, device=device)  # pages it shares compared
            width = min(made_from.shape[1], self._pages[2].shape[1])
            made_from[:, :width] = self._pages[2][:, :width]
            self._pages = (*self._pages[:2], made_from)
        return self._pages

    def summaries(self, pat: ir.PatternIR, block: int, k: torch.Tensor, nblocks: int, heads: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``route_scores.key_summary`` of ``k``'s blocks of ``block`` keys, the kept ones read, not made, and
        the complete ones kept."""
        B, Hkv, nk, D = k.shape
        signature = (pat.route.params.score, block, B, Hkv, D, dtype, k.device)
        if self._signature is not None and signature != self._signature:
            raise SpecError(f"this summary was kept for {_describe(self._signature)}, not "
                            f"{_describe(signature)}", where=WHERE,
                            hint="one KeySummary per sequence and route; reset() before reusing one")
        if nk < self._keys:
            raise SpecError(f"this summary covers {self._keys} keys and the call has {nk}: a KV cache only grows",
                            where=WHERE, hint="a new sequence starts with key_summary.reset() or a new KeySummary")
        start = self._keys
        if nk == start:  # nothing after the kept blocks (a call at a block's end, again)
            blocks = self._blocks
        else:
            tail_ids = torch.arange(nk - start, device=k.device) // block
            tail = key_summary(pat, k[:, :, start:].detach(), tail_ids, nblocks - start // block, Hkv, dtype)
            blocks = (tuple(torch.cat((kept, new), 2) for kept, new in zip(self._blocks, tail, strict=True))
                      if self._blocks else tail)
        complete = nk // block
        self._blocks = tuple(b[:, :, :complete] for b in blocks)
        self._keys, self._signature = complete * block, signature
        return tuple(b.repeat_interleave(heads // Hkv, 1) for b in blocks)


def stale(kept: torch.Tensor, made_from: torch.Tensor, table: torch.Tensor, page: int, block: int) -> None:
    """Cut each row's kept blocks (``kept``, int32 ``[rows]``, in place) at its first block whose pages the row's
    table does not hold now as they were when it was kept (``made_from``): a reordered batch, a row given to a new
    sequence on other pages. On the device; nothing is read on the host."""
    changed = made_from != table  # [rows, max_pages]
    pages = table.shape[1]
    first = torch.where(changed, torch.arange(pages, device=table.device, dtype=torch.int32), pages).amin(1)
    kept.copy_(torch.minimum(kept, (first * page) // block))


def _describe(signature: tuple) -> str:
    if signature[0] == "paged":
        _, score, block, (_, rows, Hkv, nblocks, D), device = signature
        return (f"{'bounds' if score == 'bound' else 'means'} of blocks of {block} keys of a paged pool, a table of "
                f"{rows} rows and {nblocks} blocks, {Hkv} K/V heads of {D} on {device}")
    score, block, B, Hkv, D, dtype, device = signature
    return (f"{'bounds' if score == 'bound' else 'means'} of blocks of {block} keys, k [{B}, {Hkv}, *, {D}] "
            f"{str(dtype).removeprefix('torch.')} on {device}")


_KEPT: contextvars.ContextVar[KeySummary | None] = contextvars.ContextVar("attnc_key_summary", default=None)


@contextlib.contextmanager
def keeping(summary: KeySummary):
    """The calls inside read and update ``summary`` (the route's block summaries)."""
    token = _KEPT.set(summary)
    try:
        yield summary
    finally:
        _KEPT.reset(token)


def open_for(pat: ir.PatternIR) -> KeySummary | None:
    """The ``KeySummary`` open for this call where ``pat``'s route keeps one, else None."""
    kept = _KEPT.get()
    return kept if kept is not None and keeps(pat) is None else None


def summaries(pat: ir.PatternIR, bound: E.Bound, k: torch.Tensor, key_block: torch.Tensor, nblocks: int, heads: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The route's block summaries of ``k``: the open ``KeySummary``'s where there is one and the route keeps one,
    else made from every key (``route_scores.key_summary``)."""
    kept = _KEPT.get()
    if kept is None or keeps(pat) is not None:
        return key_summary(pat, k, key_block, nblocks, heads, dtype)
    ((block,), _) = route_sizes(pat, bound)
    return kept.summaries(pat, int(block), k, nblocks, heads, dtype)
