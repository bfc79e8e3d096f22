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
(queries at the last positions: a causal pattern's new queries see the new keys up to themselves).

Two ways to run (``run``):

- **One launch** where the runner serves it (``one_launch_applies``; the Triton runner's ``attnc_fwd_paged``, for a
  self-attention pattern with no route, FoX gate, call-time input or ``scale`` clause:
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
  count (``by_rows``; a combined pattern, whose gates are per row's queries, refuses it by name).

Call-time inputs: a leading batch dimension (``B``) is cut to each group's rows; a token dimension
(declared ``n`` or ``nk``; a cross-attention pattern's ``n`` is its queries and stays whole) is indexed by
absolute position and holds at least ``max(cache_seqlens)`` entries (the block table's capacity,
``max_pages * page_size``, always does): each group reads its first ``cache_seqlens[b]``.

Forward only (inference): a call that autograd would record is refused. Softmax patterns on a sequence
only: recurrences, grids and concatenations are refused. A combined pattern (``nsa``) takes its gates for
the present queries, ``[B, heads, n]`` (cut to each group's rows, not indexed by position).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...core import ir
from ...core.errors import SpecError
from ..checks import PAGED_VALUES_FAILED, check_flag, resolve_scale
from ..numerics import needs_grad, unnormalized_output
from . import varlen_rows
from .layouts import Restore
from .paged_inputs import check_inputs, group_input, one_launch_inputs

HINT_INT32 = "FlashAttention's and vLLM's convention: torch.int32 on the caches' device"
HINT_LAYOUT = (
    'pass layout="bnhd" for flash-attn\'s q [B, n, H, D] (out comes back [B, n, H, Dv]) or '
    'layout="bhnd" for [B, H, n, D], in the call or to compile_attention'
)


class UnnamedLayout(str):
    """The layout of a module compiled without ``layout=``: ``"bhnd"`` for every purpose, except that a
    paged call with it refuses a q it cannot read one way only (the pools are token-major, as a
    flash-attn caller's q is)."""

    __slots__ = ()


#: ``compile_attention``'s default layout (a plain ``"bhnd"`` given anywhere counts as named)
DEFAULT_LAYOUT = UnnamedLayout("bhnd")


@dataclass(frozen=True)
class Pages:
    """A paged call's rows, checked: each row's length and the groups of rows of equal length."""

    lengths: tuple[int, ...]
    groups: tuple[tuple[int, tuple[int, ...]], ...]  # (length, row indices)
    page_size: int


def _check_index_tensor(
    t, name: str, shape: tuple[int, ...] | None, rank: int, device: torch.device
) -> None:
    where = f"argument {name}"
    if not isinstance(t, torch.Tensor):
        raise SpecError(
            f"expected an int32 tensor, got {type(t).__name__}", where=where, hint=HINT_INT32
        )
    if t.dtype != torch.int32:
        raise SpecError(f"expected an int32 tensor, got {t.dtype}", where=where, hint=HINT_INT32)
    if t.device != device:
        raise SpecError(
            f"{name} is on {t.device}, the caches on {device}", where=where, hint=HINT_INT32
        )
    if t.dim() != rank or (shape is not None and tuple(t.shape) != shape):
        want = "[B, max_pages]" if rank == 2 else "[B]"
        raise SpecError(
            f"expected shape {want} with B = q's batch, got {list(t.shape)}", where=where
        )


def check_caches(pat, q, k_cache, v_cache) -> None:
    """q (as given, either layout) and the page pools: 4-D, one floating dtype and device, pools that
    agree; errors name ``q``, ``k`` or ``v``. q's heads are ``orient``'s."""
    if not isinstance(pat, ir.PatternIR | ir.CombinedIR):
        raise SpecError(
            f"'{pat.name}' is a {pat.kind}: paged KV caches serve softmax patterns",
            where="argument block_table",
            hint="a recurrence decodes with attn.step",
        )
    for part in [b.pattern for b in pat.branches] if isinstance(pat, ir.CombinedIR) else [pat]:
        if (
            part.queries.kind != "seq"
            or part.keys.kind != "seq"
            or part.queries.segments
            or part.keys.segments
        ):
            raise SpecError(
                f"'{pat.name}' lays its tokens on {part.keys.describe()}: a paged KV cache is a sequence",
                where="argument block_table",
                hint="call with contiguous k, v instead",
            )
    for name, t, want in (
        ("q", q, "[B, Hq, n, D] or [B, n, Hq, D]"),
        ("k", k_cache, "[num_pages, page_size, Hkv, D]"),
        ("v", v_cache, "[num_pages, page_size, Hkv, Dv]"),
    ):
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
        if t.dim() != 4 or (name != "q" and 0 in t.shape[:3]) or 0 in t.shape[-1:]:
            raise SpecError(
                f"expected a {want} tensor, got shape {list(t.shape)}", where=f"argument {name}"
            )
        if not t.dtype.is_floating_point:
            raise SpecError(
                f"expected a floating-point tensor, got {t.dtype}", where=f"argument {name}"
            )
    for name, t in (("k", k_cache), ("v", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise SpecError(
                f"the cache is {t.dtype} on {t.device}, q {q.dtype} on {q.device}: they must agree",
                where=f"argument {name}",
            )
    if k_cache.shape[-1] != q.shape[-1]:
        raise SpecError(
            f"head dim of k ({k_cache.shape[-1]}) differs from q's ({q.shape[-1]})",
            where="argument k",
        )
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise SpecError(
            f"v {list(v_cache.shape)} must match k {list(k_cache.shape)} in pages, page size and "
            "heads",
            where="argument v",
        )


def orient(q: torch.Tensor, hkv: int, layout: str) -> torch.Tensor:
    """q ``[B, Hq, n, D]`` from the call's q in ``layout``. A layout named nowhere (``UnnamedLayout``)
    reads q as ``[B, Hq, n, D]`` only when that is its one reading with Hq a multiple of the pools' Hkv;
    otherwise the call is refused, naming ``layout=`` (a flash-attn caller's ``[B, n, Hq, D]`` q would
    be read as ``n`` heads of ``Hq`` queries)."""
    readings = {"bhnd": q.shape[1], "bnhd": q.shape[2]}  # query heads in each reading
    fits = {name: heads % hkv == 0 for name, heads in readings.items()}
    shown = list(q.shape)
    if isinstance(layout, UnnamedLayout):
        if fits["bhnd"] and fits["bnhd"] and q.shape[1] * q.shape[2] > 1:
            raise SpecError(
                f"q {shown} reads two ways beside pools of {hkv} key/value head(s): "
                f"{q.shape[1]} heads of {q.shape[2]} queries ([B, H, n, D], the default layout) or "
                f"{q.shape[2]} heads of {q.shape[1]} queries ([B, n, H, D], flash-attn's); a paged call "
                'does not guess: name it, layout="bhnd" or layout="bnhd"',
                where="argument layout",
                hint=HINT_LAYOUT,
            )
        if fits["bnhd"] and not fits["bhnd"]:
            raise SpecError(
                f"q {shown} read as [B, H, n, D] (the default layout) has {q.shape[1]} query heads, not "
                f"a multiple of the pools' {hkv} key/value heads; read as flash-attn's [B, n, H, D] it "
                f'has {q.shape[2]}: name the layout, layout="bnhd"',
                where="argument layout",
                hint=HINT_LAYOUT,
            )
    if fits[layout]:
        return q if layout == "bhnd" else q.transpose(1, 2)
    other = "bnhd" if layout == "bhnd" else "bhnd"
    order = {"bhnd": "[B, H, n, D]", "bnhd": "[B, n, H, D]"}
    if fits[other]:
        raise SpecError(
            f'q {shown} in layout "{layout}" ({order[layout]}) has {readings[layout]} query heads, not '
            f'a multiple of the pools\' {hkv} key/value heads; in layout "{other}" ({order[other]}) '
            f'it has {readings[other]}: layout="{other}"',
            where="argument layout",
            hint=HINT_LAYOUT,
        )
    raise SpecError(
        f"query heads ({readings[layout]}) must be a multiple of key/value heads ({hkv}) (q {shown} "
        f'in layout "{layout}", {order[layout]})',
        where="argument k",
    )


def bind_qkv(q, k, v, inputs: dict) -> tuple:
    """A call's q, k, v: positional, or by keyword where not given positionally (``attn(q=q, k=k, v=v)``).
    A keyword ``k``/``v`` beside a positional one stays in ``inputs``: a paged call's new keys and values
    (``flash_attn_with_kvcache(q, k_cache, v_cache, k=, v=)``). One missing is named."""
    given = {"q": q, "k": k, "v": v}
    for name, t in given.items():
        if t is None and name in inputs:
            given[name] = inputs.pop(name)
    for name, t in given.items():
        if t is None:
            raise SpecError(
                f"missing {name}: a call takes q, k, v",
                where=f"argument {name}",
                hint="attn(q, k, v)",
            )
    return given["q"], given["k"], given["v"]


def _split_new_tokens(pat, inputs: dict) -> tuple[dict, object, object]:
    """``k=`` and ``v=`` (keys and values to append) out of the call's keywords, unless the pattern
    declares an input of that name."""
    declared = {d.name for d in pat.inputs}
    rest = dict(inputs)
    k_new = rest.pop("k") if "k" in rest and "k" not in declared else None
    v_new = rest.pop("v") if "v" in rest and "v" not in declared else None
    return rest, k_new, v_new


def refuse_new_tokens(pat, inputs: dict) -> None:
    """A call without ``block_table`` has no pages to append ``k=``/``v=`` to: named before the inputs
    are bound (where they would read as unknown inputs)."""
    if (
        "k" not in inputs and "v" not in inputs
    ):  # every contiguous call passes here: no more host work
        return
    _, k_new, v_new = _split_new_tokens(pat, inputs)
    for name, t in (("k", k_new), ("v", v_new)):
        if t is not None:
            raise SpecError(
                f"{name}= appends new {'keys' if name == 'k' else 'values'} to paged KV caches: only with "
                "block_table= and cache_seqlens=",
                where=f"argument {name}",
                hint="a contiguous call takes every key and value as its k and v",
            )


def check_new_tokens(q, k_cache, v_cache, k_new, v_new, layout: str):
    """``k=``, ``v=`` in ``layout`` -> ``[B, Hkv, n_new, D]`` and ``[B, Hkv, n_new, Dv]`` views (None, None
    when neither is given), checked against q (``[B, Hq, n, D]``) and the pools."""
    if k_new is None and v_new is None:
        return None, None
    for name, t, other in (("k", k_new, "v"), ("v", v_new, "k")):
        if t is None:
            raise SpecError(
                f"{other}= is given without {name}=: new keys and values are appended together",
                where=f"argument {name}",
            )
    order = "[B, n_new, Hkv, {}]" if layout == "bnhd" else "[B, Hkv, n_new, {}]"
    out = []
    for name, t, pool, dim in (("k", k_new, k_cache, "D"), ("v", v_new, v_cache, "Dv")):
        where = f"argument {name}"
        want = order.format(dim)
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a {want} tensor, got {type(t).__name__}", where=where)
        if t.dim() != 4:
            raise SpecError(
                f'expected a {want} tensor (layout "{layout}"), got shape {list(t.shape)}',
                where=where,
            )
        if t.dtype != pool.dtype or t.device != pool.device:
            raise SpecError(
                f"the new {'keys' if name == 'k' else 'values'} are {t.dtype} on {t.device}, the cache "
                f"{pool.dtype} on {pool.device}: they are written into it, so they must agree",
                where=where,
            )
        t = t.transpose(1, 2) if layout == "bnhd" else t
        if t.shape[0] != q.shape[0] or t.shape[1] != pool.shape[2] or t.shape[3] != pool.shape[3]:
            shown = list(t.shape if layout == "bhnd" else t.transpose(1, 2).shape)
            expect = order.format(pool.shape[3]).replace("B", str(q.shape[0]), 1)
            expect = expect.replace("Hkv", str(pool.shape[2]))
            raise SpecError(
                f"expected {expect} (q's batch, the cache's heads and head dim; layout "
                f'"{layout}"), got {shown}',
                where=where,
            )
        out.append(t)
    if out[0].shape[2] != out[1].shape[2]:
        raise SpecError(
            f"v has {out[1].shape[2]} new tokens, k {out[0].shape[2]}: one value per key",
            where="argument v",
        )
    return out[0], out[1]


def as_seqlens(cache_seqlens, batch: int, device: torch.device):
    """An int ``cache_seqlens`` is every row's (flash-attn broadcasts it): an int32 ``[B]`` tensor on the
    caches' device. A tensor is returned as is (``check_pages`` checks it)."""
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens < 2**31:
            raise SpecError(
                f"cache_seqlens = {cache_seqlens} is not a key count of int32",
                where="argument cache_seqlens",
            )
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    return cache_seqlens


def check_pages(pat, batch: int, n, k_cache, block_table, cache_seqlens, appended: int = 0) -> Pages:
    """Validate ``block_table`` and ``cache_seqlens`` against ``batch`` rows of ``n`` queries each (an int, or a
    list of each row's count) and the pool, with ``appended`` new keys per row (``k=``) after
    ``cache_seqlens[b]``; every page a row reaches, reading or writing, must be a page of the pool. Returns the
    rows (their lengths with the new keys) grouped by length."""
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    _check_index_tensor(block_table, "block_table", None, 2, k_cache.device)
    if block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise SpecError(
            f"expected shape [B, max_pages] with B = {batch} (q's batch) and max_pages >= 1, got "
            f"{list(block_table.shape)}",
            where="argument block_table",
        )
    _check_index_tensor(cache_seqlens, "cache_seqlens", (batch,), 1, k_cache.device)
    capacity = block_table.shape[1] * page_size
    before = [int(x) for x in cache_seqlens.tolist()]  # one device-to-host copy
    lengths = [x + appended for x in before]
    new = f" and the {appended} new keys of k=" if appended else ""
    windows = ir.least_length(pat) if isinstance(pat, ir.PatternIR) else 1  # the mask's windows fit each row
    for b, length in enumerate(before):
        rows = n[b] if isinstance(n, list) else n
        # self-attention: the queries are the last n keys of the row (the new ones included)
        least = max(rows, 1) if pat.self_attention else 1
        low, high = max(max(least, windows) - appended, 0), capacity - appended
        if length < 0:
            why = "a key count is not negative"
        elif length > high:
            why = f"block_table holds {block_table.shape[1]} pages of {page_size} keys, at most {capacity}"
            why += f" (the row's keys{new})" if appended else ""
        elif length < low and windows > least:
            why = f"the pattern's window (size times dilation) needs rows of at least {windows} keys{new}"
        elif length < low:
            why = (
                f"the {rows} queries are the row's last keys (cache_seqlens{new} count them)"
                if least > 1
                else "every row holds a key"
            )
        else:
            continue
        raise SpecError(
            f"cache_seqlens[{b}] = {length} is outside [{low}, {high}]: {why}",
            where="argument cache_seqlens",
        )
    # one copy: the page ids that each row's keys reach (read, or written by k=) are checked on the host
    table = block_table.cpu()
    reach = torch.tensor([-(-x // page_size) for x in lengths], dtype=torch.long)
    reached = torch.arange(table.shape[1]) < reach.unsqueeze(1)
    bad = reached & ((table < 0) | (table >= num_pages))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        if appended and (j + 1) * page_size > before[b]:
            how = (
                f"row {b} writes its {appended} new keys into slots {before[b]} .. {lengths[b] - 1}, "
                f"its page {j} among them: cache_seqlens[{b}] = {before[b]}"
            )
        else:
            how = f"row {b} reaches its page {j}: cache_seqlens[{b}] = {before[b]}"
        raise SpecError(
            f"block_table[{b}, {j}] = {int(table[b, j])} is not a page of the cache's {num_pages} "
            f"({how})",
            where="argument block_table",
            hint=f"page ids of reached pages lie in [0, {num_pages})",
        )
    by_length: dict[int, list[int]] = {}
    for b, length in enumerate(lengths):
        by_length.setdefault(length, []).append(b)
    return Pages(
        tuple(lengths),
        tuple((length, tuple(rows)) for length, rows in sorted(by_length.items())),
        page_size,
    )


def _append(
    cache: torch.Tensor, table: torch.Tensor, seqlens: torch.Tensor, new: torch.Tensor
) -> None:
    """Write ``new`` ``[B, H, n_new, D]`` into ``cache`` ``[num_pages, page_size, H, D]`` in place: row b's
    token t into slot ``(seqlens[b] + t) % page_size`` of page ``table[b, (seqlens[b] + t) // page_size]``.
    The indices are made on the device (no host read); any strided pool takes the two-index put."""
    batch, _, count, _ = new.shape
    if batch == 0 or count == 0:
        return
    page_size = cache.shape[1]
    pos = seqlens.long().unsqueeze(1) + torch.arange(count, device=cache.device)
    pages = table.long().gather(1, torch.div(pos, page_size, rounding_mode="floor"))
    tokens = new.transpose(1, 2).reshape(batch * count, new.shape[1], new.shape[3])
    cache.index_put_((pages.flatten(), (pos % page_size).flatten()), tokens)


def refuse_gradients(q, k_cache, v_cache, inputs: dict, k_new=None, v_new=None) -> None:
    """Paged calls are forward only: the first tensor autograd would record is named."""
    given = (("q", q), ("k", k_cache), ("v", v_cache), ("k", k_new), ("v", v_new))
    for name, t in (*given, *inputs.items()):
        if needs_grad(t):
            raise SpecError(
                f"{name} requires grad: paged KV caches are forward only (inference)",
                where=f"argument {name}",
                hint="call under torch.no_grad() or torch.inference_mode(), or train with contiguous k, v",
            )


def _gather(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """``[num_pages, page_size, H, D]`` and a group's page ids ``[G, pages]`` -> its rows' first ``length``
    keys ``[G, H, length, D]`` (only the listed pages are read)."""
    count, reach = pages.shape
    rows = cache.index_select(0, pages.flatten()).view(
        count, reach * cache.shape[1], *cache.shape[2:]
    )
    return rows[:, :length].transpose(1, 2)


def check_pairing(block_table, cache_seqlens, cu_seqlens) -> None:
    """A paged call takes ``block_table`` and ``cache_seqlens`` together, and not ``cu_seqlens``."""
    for name, given, other in (
        ("block_table", block_table, "cache_seqlens"),
        ("cache_seqlens", cache_seqlens, "block_table"),
    ):
        if given is None:
            raise SpecError(
                f"{other} is given without {name}: a paged KV cache takes both",
                where=f"argument {name}",
            )
    if cu_seqlens is not None:
        raise SpecError(
            "cu_seqlens packs sequences along the tokens, a paged KV cache gives each row's keys by "
            "block_table and cache_seqlens: pass one or the other",
            where="argument cu_seqlens",
        )


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
):
    """The paged call: in one launch where the runner serves it (``one_launch_applies``: ``one_launch(q, k_cache,
    v_cache, block_table, seqlens, q_start, q_count, max_q, scale) -> (out, lse)``, the runner's paged forward or
    the op around it under ``torch.compile``), else ``forward`` (the module's public forward, in ``"bhnd"``) once per
    group of rows of equal length on their gathered keys and values (``by_length``); returns what the module's call
    returns (``out``, or ``(out, lse)``) in ``layout``. Everything is checked before any page is read or written."""
    check_pairing(block_table, cache_seqlens, cu_seqlens)
    return_lse = check_flag("return_lse", return_lse)
    inputs, k_new, v_new = _split_new_tokens(pat, inputs)
    rows = varlen_rows.take(pat, inputs)  # cu_seqlens_q=, max_seqlen_q= (flash_attn_varlen_func's)
    check_caches(pat, q, k_cache, v_cache)
    q = orient(q, k_cache.shape[2], layout)
    layout = str(layout)  # named or not, from here on the layout the call runs in
    k_new, v_new = check_new_tokens(q, k_cache, v_cache, k_new, v_new, layout)
    cache_seqlens = as_seqlens(cache_seqlens, block_table_rows(block_table, q, rows), k_cache.device)
    refuse_gradients(q, k_cache, v_cache, inputs, k_new, v_new)
    if rows is not None:
        rows = varlen_rows.check(rows, q, block_table)
    declared = isinstance(pat, ir.PatternIR) and bool(pat.inputs)  # (one missing: the ordinary path names it)
    given = one_launch_inputs(pat, inputs, block_table, k_cache, q.shape[1], layout) if inputs or declared else {}
    if one_launch is not None and given is not None and one_launch_applies(runner, q, k_cache, v_cache, given,
                                                                           initial_state, return_state, sizes):
        check_index_shapes(q, k_cache, block_table, cache_seqlens, rows)
        appended = 0 if k_new is None else k_new.shape[2]
        if k_new is not None:  # flash_attn_with_kvcache's k=, v=: checked, then written before attending, in place
            check_on_device(pat, q, k_cache, block_table, cache_seqlens, appended, rows)
            _append(k_cache, block_table, cache_seqlens, k_new)
            _append(v_cache, block_table, cache_seqlens, v_new)
        seqlens = cache_seqlens + appended if appended else cache_seqlens
        start, count, most = (None, None, q.shape[2]) if rows is None else rows.as_launched()
        launched = (q, k_cache, v_cache, block_table, seqlens, start, count, most, resolve_scale(scale, q.shape[-1]))
        extra = {"inputs": given} if given else {}
        if torch.compiler.is_compiling():  # the op asserts the rows' values on the device, in the graph
            out, lse = one_launch(*launched, **extra)
        else:
            try:  # the runner checks the values on the device (its kernel's row check, then one assert)
                out, lse = one_launch(*launched, **extra)
            except RuntimeError as err:  # on the CPU, at once: the host rules name the argument and the row
                if PAGED_VALUES_FAILED not in str(err):
                    raise
                diagnose(pat, q, k_cache, block_table, cache_seqlens, appended, rows)
                raise
        out = unnormalized_output(pat, out, lse)
        return Restore(layout).result((out, lse) if return_lse else out, return_lse, False)
    if one_launch_only is not None:  # what the one launch alone serves (a kept key summary): named, not dropped
        where, why = one_launch_only
        raise SpecError(why, where=where)
    if rows is not None and isinstance(pat, ir.CombinedIR):
        raise SpecError(
            f"'{pat.name}' takes its gates per row's queries ([B, heads, n]): rows of one query count, not "
            "cu_seqlens_q, in this version",
            where="argument cu_seqlens_q",
            hint="pass q [B, H, n, D] with n queries per row",
        )
    return by_length(forward, pat, layout, q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new,
                     scale=scale, return_lse=return_lse, initial_state=initial_state,
                     return_state=return_state, sizes=sizes, inputs=inputs, rows=rows)


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


def check_index_shapes(q, k_cache, block_table, cache_seqlens, rows) -> None:
    """A one-launch paged call's block table and lengths: int32 tensors on the caches' device, ``[B, max_pages]``
    (max_pages at least 1) and ``[B]``, B q's batch (or, with ``cu_seqlens_q``, the table's rows)."""
    _check_index_tensor(block_table, "block_table", None, 2, k_cache.device)
    if block_table.shape[1] == 0:
        raise SpecError(
            f"expected shape [B, max_pages] with max_pages >= 1, got {list(block_table.shape)}",
            where="argument block_table",
        )
    if rows is None and block_table.shape[0] != q.shape[0]:
        raise SpecError(
            f"expected shape [B, max_pages] with B = {q.shape[0]} (q's batch), got {list(block_table.shape)}",
            where="argument block_table",
        )
    _check_index_tensor(cache_seqlens, "cache_seqlens", (block_table.shape[0],), 1, k_cache.device)


def check_on_device(pat, q, k_cache, block_table, cache_seqlens, appended: int, rows) -> None:
    """The values of a one-launch paged call that appends ``k=``/``v=`` checked before anything is written, without
    a host read (``check_pages``'s rules, and ``cu_seqlens_q``'s): one flag made on the device and asserted there
    (``torch._assert_async``). On a GPU a failed check is a device-side assert; on the CPU it fails at once, and the
    host rules then name the argument and the row at fault. (A call that appends nothing is checked by the runner's
    kernel, which writes a flag per row: ``backends.triton.paged``.)"""
    num_pages, page = k_cache.shape[0], k_cache.shape[1]
    capacity = block_table.shape[1] * page
    before = cache_seqlens.to(torch.int64)
    lengths = before + appended
    counts = rows.counts() if rows is not None else torch.full_like(before, q.shape[2])
    least = counts.clamp(min=1) if pat.self_attention else torch.ones_like(before)
    least = least.clamp(min=ir.least_length(pat))  # the mask's windows fit each row
    ok = (before >= 0) & (lengths <= capacity) & (lengths >= least)
    reached = _page_starts(block_table.shape[1], page, k_cache.device) < lengths.unsqueeze(1)  # pages it reaches
    ok = ok & ~(reached & ((block_table < 0) | (block_table >= num_pages))).any(1)
    good = ok.all()
    if rows is not None:
        good = good & rows.consistent(q.shape[2])
    if torch.compiler.is_compiling():  # traced: the assert goes into the graph
        torch._assert_async(good, PAGED_VALUES_FAILED)
        return
    try:
        torch._assert_async(good, PAGED_VALUES_FAILED)
    except RuntimeError:  # on the CPU, at once: the host rules name what is wrong
        diagnose(pat, q, k_cache, block_table, cache_seqlens, appended, rows)
        raise


def diagnose(pat, q, k_cache, block_table, cache_seqlens, appended: int, rows) -> None:
    """After a device check of a paged call's values failed: the host rules, raising the ``SpecError`` that names the
    argument and the row at fault (``varlen_rows``' offsets first, then ``check_pages``)."""
    if rows is not None:
        rows.diagnose(q.shape[2])
    check_pages(pat, block_table.shape[0], rows.host_counts() if rows is not None else q.shape[2], k_cache,
                block_table, cache_seqlens, appended)


_PAGE_STARTS: dict = {}


def _page_starts(pages: int, page: int, device) -> torch.Tensor:
    """The first key of each of a table's pages, ``[1, pages]`` int64 (made once per shape and device)."""
    key = (pages, page, torch.device(device))
    if key not in _PAGE_STARTS:
        _PAGE_STARTS[key] = (torch.arange(pages, device=device, dtype=torch.int64) * page).view(1, pages)
    return _PAGE_STARTS[key]


@torch.compiler.disable  # host reads of cache_seqlens and block_table: eager under torch.compile
def by_length(
    forward: Callable,
    pat,
    layout: str,
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    k_new,
    v_new,
    *,
    scale,
    return_lse: bool,
    initial_state,
    return_state: bool,
    sizes,
    inputs: dict,
    rows=None,
):
    """The paged call on the module's ordinary forward: ``forward`` once per group of rows of equal length on
    their gathered keys and values (q ``[B, Hq, n, D]``, oriented and checked by ``run``); with ``rows``
    (``cu_seqlens_q``: q ``[1, Hq, total, D]``), once per group of equal length and query count (``by_rows``)."""
    restore = Restore(layout)
    appended = 0 if k_new is None else k_new.shape[2]
    batch = block_table.shape[0] if rows is not None else q.shape[0]
    if rows is not None:
        rows.diagnose(q.shape[2])
    counts = rows.host_counts() if rows is not None else q.shape[2]
    pages = check_pages(pat, batch, counts, k_cache, block_table, cache_seqlens, appended)
    inputs = check_inputs(pat, inputs, layout, batch, max(pages.lengths, default=0))
    if k_new is not None:  # flash_attn_with_kvcache's k=, v=: written before attending, in place
        _append(k_cache, block_table, cache_seqlens, k_new)
        _append(v_cache, block_table, cache_seqlens, v_new)
    call = dict(scale=scale, return_lse=return_lse, initial_state=initial_state, return_state=return_state,
                sizes=sizes, layout="bhnd")
    if rows is not None:
        out, lse = by_rows(forward, pat, q, k_cache, v_cache, block_table, pages, counts, inputs, call)
        return restore.result((out, lse) if return_lse else out, return_lse, False)
    out = lse = None
    for length, group in pages.groups:
        rows = torch.tensor(group, device=q.device)
        ids = block_table.index_select(0, rows)[:, : -(-length // pages.page_size)].long()
        result = forward(
            q.index_select(0, rows),
            _gather(k_cache, ids, length),
            _gather(v_cache, ids, length),
            scale=scale,
            return_lse=return_lse,
            initial_state=initial_state,
            return_state=return_state,
            sizes=sizes,
            layout="bhnd",
            **{name: group_input(pat, name, t, rows, length) for name, t in inputs.items()},
        )
        part = result[0] if return_lse else result
        if out is None:
            out = part.new_empty(q.shape[0], *part.shape[1:])
        out.index_copy_(0, rows, part)
        if return_lse:
            if lse is None:
                lse = result[1].new_empty(q.shape[0], *result[1].shape[1:])
            lse.index_copy_(0, rows, result[1])
    if out is None:  # an empty batch: empty results of the call's shapes
        out = q.new_empty(0, q.shape[1], q.shape[2], v_cache.shape[-1])
        lse = q.new_empty(
            0,
            q.shape[1],
            q.shape[2],
            dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
        )
    return restore.result((out, lse) if return_lse else out, return_lse, False)


def by_rows(forward: Callable, pat, q, k_cache, v_cache, block_table, pages: Pages, counts: list[int],
            inputs: dict, call: dict):
    """``(out, lse)`` ``[1, Hq, total, ...]`` of a packed paged call on the ordinary forward: the rows of one
    (length, query count) gathered into one batch (their queries from q's packed rows, their keys from their
    pages), their results written back into the packed rows. Rows of no query give nothing."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (length, count) in enumerate(zip(pages.lengths, counts, strict=True)):
        if count:
            groups.setdefault((length, count), []).append(b)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[1]
    out = q.new_zeros(1, heads, q.shape[2], v_cache.shape[-1])
    lse = q.new_full((1, heads, q.shape[2]), float("-inf"), dtype=dtype)
    for (length, count), group in sorted(groups.items()):
        where = torch.tensor([starts[b] + i for b in group for i in range(count)], device=q.device)
        rows = torch.tensor(group, device=q.device)
        ids = block_table.index_select(0, rows)[:, : -(-length // pages.page_size)].long()
        q_g = q[0].index_select(1, where).view(heads, len(group), count, q.shape[3]).transpose(0, 1)
        part, part_lse = forward(q_g, _gather(k_cache, ids, length), _gather(v_cache, ids, length),
                                 **{**call, "return_lse": True},
                                 **{name: group_input(pat, name, t, rows, length) for name, t in inputs.items()})
        out[0].index_copy_(1, where, part.transpose(0, 1).reshape(heads, -1, part.shape[-1]).to(out.dtype))
        lse[0].index_copy_(1, where, part_lse.transpose(0, 1).reshape(heads, -1).to(dtype))
    return out, lse
