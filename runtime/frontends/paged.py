"""Paged KV caches: ``attn(q, k_cache, v_cache, block_table=..., cache_seqlens=...)`` (the convention of
FlashAttention's ``flash_attn_with_kvcache`` and vLLM).

The keys and values of every sequence live in fixed-size pages of one pool: ``k_cache``
``[num_pages, page_size, Hkv, D]`` and ``v_cache`` ``[num_pages, page_size, Hkv, Dv]`` (token-major, in
either call layout). Row b of the batch owns the pages ``block_table[b, 0], block_table[b, 1], ...``
(int32 ``[B, max_pages]``) and holds ``cache_seqlens[b]`` keys (int32 ``[B]``, or one int for every row,
as flash-attn takes it): key j of row b is slot ``j % page_size`` of page
``block_table[b, j // page_size]``. ``cache_seqlens`` counts every key of the row, the present queries'
own included (the caller writes them into the pages first, or passes them as ``k=``, ``v=``: below), so
the ``n`` queries of row b sit at absolute positions ``cache_seqlens[b] - n + i``: exactly the module's
call with a KV cache on the row's keys gathered into a contiguous ``[1, Hkv, cache_seqlens[b], D]``
(spec/REFERENCE.md, "Positions with a KV cache"). A cross-attention pattern reads the row's keys, its
queries keep their own positions ``0 .. n-1``.

q's layout. The call's layout (``"bhnd"``: q ``[B, Hq, n, D]``; ``"bnhd"``: ``[B, n, Hq, D]``, flash-attn's)
gives q's, ``out``'s, ``lse``'s and ``k=``/``v=``'s; the pools are token-major in both. Because the pools
are flash-attn's, a flash-attn caller's ``[B, n, Hq, D]`` q in the default layout would be read as ``n``
heads of ``Hq`` queries, and with one K/V head (MQA) nothing else would reveal it. So when the layout is
named nowhere (neither in the call nor at ``compile_attention``), a q whose shape fits both readings (both
middle dimensions multiples of Hkv, not both 1) is refused, naming ``layout=``; so is one that fits
``"bnhd"`` only. A q that fits ``"bhnd"`` only runs as before. The default is not switched to the pools'
order: existing ``[B, Hq, n, D]`` callers would then be read the other way without a word.

Appending (``k=``, ``v=``: ``flash_attn_with_kvcache``'s new keys and values, ``[B, n_new, Hkv, D]`` under
``"bnhd"``, ``[B, Hkv, n_new, D]`` under ``"bhnd"``): ``cache_seqlens`` then counts the keys before them.
They are written in place into the caller's pools, into slots ``cache_seqlens[b] .. cache_seqlens[b] +
n_new - 1`` of row b's pages (one ``index_put_`` on the device, page ids gathered from ``block_table`` on
the device), after every check and before attention runs over the ``cache_seqlens[b] + n_new`` keys
(queries at the last positions: a causal pattern's new queries see the new keys up to themselves). With packed rows
(``cu_seqlens_q``) they may be packed as q instead, ``[1, Hkv, total, D]``: each row appends one token per query, its
own count (``paged_appends``: counts on the device, padding tokens past the rows' write nothing).

Two ways to run (``run``):

- **One launch** where the runner serves it (``one_launch_applies``; the Triton runner's ``attnc_fwd_paged``, for a
  self-attention pattern on a sequence whose terms its template serves at any length, whose route (if any) is
  chosen on the device, a ``scale E`` clause multiplied into each query at its own position and row on the device:
  ``runtime.backends.triton.paged``): K and V are read through ``block_table`` inside the kernel, each row's key
  and query counts on the device, so a batch of rows of any lengths is one launch and nothing is read on the host.
  Rows may hold their own query counts: ``cu_seqlens_q`` (int32 ``[B + 1]``) and ``max_seqlen_q`` with q packed
  ``[1, Hq, total, D]``, ``flash_attn_varlen_func``'s convention with a block table (``frontends.varlen_rows``).
  The values are checked on the device, not on the host (a host read is a sync on a GPU and breaks a CUDA graph):
  one program of each row checks the row's length, query count, offsets and reached page ids in the kernel and
  writes a flag, and the runner asserts the flags after the launch (``torch._assert_async``); the kernel clamps
  every page id and length, so a bad value never reads out of bounds before the assert stops the call (on the CPU
  at once, with the host rules' message naming the argument and the row). A call that appends ``k=``/``v=`` is
  checked before the pages are written (``check_on_device``: torch ops, one flag). Under ``torch.compile`` this
  path is the ``attnc::paged_attention`` op (``runtime.ops.paged``), so ``fullgraph=True`` traces it. A warm
  call of a signature seen before replays the bound launch without the host checks (``runtime.warm_calls``).
- **By length** otherwise (``by_length``): every argument is checked on the host before any page is read or
  written (one copy of ``block_table`` and ``cache_seqlens``), and only the pages that a row's length reaches are
  read: entries of the block table past them may hold anything (vLLM pads with -1). Rows of equal length are
  gathered into one batch and the module's ordinary forward runs once per distinct length, as for packed
  sequences (``frontends.varlen``); the results are written into their rows. The host reads cannot be traced, so
  under ``torch.compile`` it runs eagerly (``torch.compiler.disable``: a graph break, which ``fullgraph=True``
  refuses with torch's own error). With ``cu_seqlens_q``, once per group of rows of one length and one query
  count (``by_rows``; a combined pattern with gates, which are per row's queries, refuses it by name).

Call-time inputs: a leading batch dimension (``B``) is cut to each group's rows; a token dimension
(declared ``n`` or ``nk``; a cross-attention pattern's ``n`` is its queries and stays whole) is indexed by
absolute position and holds at least ``max(cache_seqlens)`` entries (the block table's capacity,
``max_pages * page_size``, always does): each group reads its first ``cache_seqlens[b]``.

Forward only (inference): a call that autograd would record is refused. Softmax patterns on a sequence
only: recurrences, grids and concatenations are refused. A combined pattern (``nsa``) takes its gates for
the present queries, laid out as q's rows: ``[B, heads, n]`` (cut to each group's rows by length, not indexed by
position), or ``[1, heads, total]`` with ``cu_seqlens_q``, which only its one launch per branch serves
(``runtime.combined_paged``, given as ``one_launch`` with its own ``take_inputs``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...core import ir
from ...core.errors import SpecError
from .. import scale_clause
from ..checks import (
    PAGED_VALUES_FAILED,
    PREFILL_ROWS_FAILED,
    SCORE_SCALE_FAILED,
    check_flag,
    resolve_scale,
)
from ..compiling import compiling
from ..numerics import unnormalized_output
from . import varlen_rows
from .layouts import Restore
from .paged_checks import (
    DEFAULT_LAYOUT,
    UnnamedLayout,
    as_seqlens,
    bind_qkv,
    check_caches,
    check_index_shapes,
    check_new_tokens,
    check_on_device,
    check_pairing,
    diagnose,
    orient,
    refuse_gradients,
    refuse_new_tokens,
    split_new_tokens,
)
from .paged_gather import by_length
from .paged_inputs import one_launch_inputs


def run(
    forward: Callable,
    pat,
    layout: str,
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    cu_seqlens=None,
    *,
    scale,
    return_lse: bool,
    initial_state,
    return_state: bool,
    sizes,
    inputs: dict,
    runner=None,
    one_launch: Callable | None = None,
    one_launch_only: tuple[str, str] | None = None,
    take_inputs: Callable | None = None,
    refuse_cached_rows: Callable[[], None] | None = None,
):
    """The paged call: in one launch where the runner serves it (``one_launch_applies``: ``one_launch(q, k_cache,
    v_cache, block_table, seqlens, q_start, q_count, max_q, scale) -> (out, lse)``, the runner's paged forward or
    the op around it under ``torch.compile``), else ``forward`` (the module's public forward, in ``"bhnd"``) once per
    group of rows of equal length on their gathered keys and values (``by_length``); returns what the module's call
    returns (``out``, or ``(out, lse)``) in ``layout``. Everything is checked before any page is read or written.
    ``take_inputs(inputs, q, block_table, k_cache, layout, faults) -> dict | None``: the call's inputs as the one
    launch reads them (q in attnc's layout), or None with ``(argument, why, final)`` in ``faults`` (``final``: nor
    would the path by length take it, so the call is refused with ``why``); by default a pattern's
    over the table's capacity (``one_launch_inputs``). ``refuse_cached_rows()`` raises the contiguous call's error of
    a prefill method (its route selects across a block's queries) whose one launch found a row with cached keys
    before its queries (the device assert ``PREFILL_ROWS_FAILED``)."""
    check_pairing(block_table, cache_seqlens, cu_seqlens)
    return_lse = check_flag("return_lse", return_lse)
    inputs, k_new, v_new = split_new_tokens(pat, inputs)
    rows = varlen_rows.take(pat, inputs)  # cu_seqlens_q=, max_seqlen_q= (flash_attn_varlen_func's)
    check_caches(pat, q, k_cache, v_cache)
    q = orient(q, k_cache.shape[2], layout)
    layout = str(layout)  # named or not, from here on the layout the call runs in
    table_rows = block_table_rows(block_table, q, rows)
    if rows is not None:
        rows = varlen_rows.check(rows, q, block_table)
    new = check_new_tokens(q, k_cache, v_cache, k_new, v_new, layout, rows, None if rows is None else table_rows)
    cache_seqlens = as_seqlens(cache_seqlens, table_rows, k_cache.device)
    refuse_gradients(q, k_cache, v_cache, inputs, k_new, v_new)
    declared = isinstance(pat, ir.PatternIR) and bool(pat.inputs)  # (one missing: the ordinary path names it)
    faults: list = []
    if take_inputs is None:
        given = (one_launch_inputs(pat, inputs, block_table, k_cache, q.shape[1], layout, q.shape[-1], faults)
                 if inputs or declared else {})
    else:
        given = take_inputs(inputs, q, block_table, k_cache, layout, faults)
    if given is None and faults and faults[0][2]:  # nor would the path by length take it: named as given
        raise SpecError(faults[0][1], where=faults[0][0])
    if one_launch is not None and given is not None and one_launch_applies(runner, q, k_cache, v_cache, given,
                                                                           initial_state, return_state, sizes):
        check_index_shapes(q, k_cache, block_table, cache_seqlens, rows)
        seqlens = cache_seqlens
        if new is not None:  # flash_attn_with_kvcache's k=, v=: checked, then written before attending, in place
            check_on_device(pat, q, k_cache, block_table, cache_seqlens, new, rows)
            new.write(k_cache, v_cache, block_table, cache_seqlens)
            seqlens = cache_seqlens + (new.each if new.each is not None else new.counts().to(cache_seqlens.dtype))
        start, count, most = (None, None, q.shape[2]) if rows is None else rows.as_launched()
        launched = (q, k_cache, v_cache, block_table, seqlens, start, count, most, resolve_scale(scale, q.shape[-1], q.dtype))
        extra = {"inputs": given} if given else {}
        out, lse = _launch_checked(one_launch, launched, extra, pat, cache_seqlens, new, rows, refuse_cached_rows)
        out = unnormalized_output(pat, out, lse)
        return Restore(layout).result((out, lse) if return_lse else out, return_lse, False)
    if one_launch_only is not None:  # what the one launch alone serves (a kept key summary): named, not dropped
        where, why = one_launch_only
        if given is None and faults:  # an input the one launch would take otherwise: that input named
            where, fault, _ = faults[0]
            why = f"{fault}: {why}"
        raise SpecError(why, where=where)
    # a combined pattern's gates are laid out as q's rows, which the path by length does not cut by rows (one with no
    # input, Combiner's, is cut as any pattern); no query at all: empty results
    if rows is not None and isinstance(pat, ir.CombinedIR) and pat.inputs and q.shape[2]:
        if faults:  # a gate the one launch would take otherwise: named
            raise SpecError(faults[0][1], where=faults[0][0])
        raise SpecError(
            f"'{pat.name}' takes packed rows (cu_seqlens_q) of a paged cache only where every branch runs in one "
            "launch (the Triton backend, one launch per branch); its gates are per row's queries",
            where="argument cu_seqlens_q",
            hint="pass q [B, H, n, D] with n queries per row",
        )
    return by_length(forward, pat, layout, q, k_cache, v_cache, block_table, cache_seqlens, new,
                     scale=scale, return_lse=return_lse, initial_state=initial_state,
                     return_state=return_state, sizes=sizes, inputs=inputs, rows=rows)


def _launch_checked(one_launch: Callable, launched: tuple, extra: dict, pat, cache_seqlens, new, rows,
                    refuse_cached_rows: Callable[[], None] | None):
    """``one_launch(*launched, **extra)``, whose device asserts become the caller's errors: on the CPU, at once, the
    host rules name the argument and the row; under ``torch.compile`` the op asserts in the graph."""
    if compiling():
        return one_launch(*launched, **extra)
    try:  # the runner checks the values on the device (its kernel's row check, then one assert)
        return one_launch(*launched, **extra)
    except RuntimeError as err:
        if SCORE_SCALE_FAILED in str(err):  # (the queries' positions in their rows)
            raise scale_clause.not_finite(pat, "is not finite at a query of the batch") from None
        if PREFILL_ROWS_FAILED in str(err) and refuse_cached_rows is not None:  # a prefill method's row after
            refuse_cached_rows()  # cached keys: the contiguous call's error
        if PAGED_VALUES_FAILED not in str(err):
            raise
        q, k_cache, block_table = launched[0], launched[1], launched[3]
        diagnose(pat, q, k_cache, block_table, cache_seqlens, new, rows)
        raise


def block_table_rows(block_table, q, rows) -> int:
    """The batch's row count: q's batch, or with ``cu_seqlens_q`` (q one packed entry) the block table's."""
    if rows is None or not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        return q.shape[0]
    return block_table.shape[0]


def one_launch_applies(runner, q, k_cache, v_cache, inputs: dict, initial_state, return_state, sizes) -> bool:
    """Whether the runner serves this paged call in one launch (its ``pages_in_one_launch``: the Triton runner's
    paged forward, ``backends.triton.paged``): a call with no state or sizes and a batch that is not empty (the
    ordinary path gives its empty results)."""
    serves = getattr(runner, "pages_in_one_launch", None)
    if serves is None or initial_state is not None or return_state or sizes or 0 in q.shape[:3]:
        return False
    return serves(q, k_cache, v_cache)


__all__ = ["DEFAULT_LAYOUT", "UnnamedLayout", "bind_qkv", "refuse_new_tokens", "run"]
