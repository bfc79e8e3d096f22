"""A paged call's arguments checked (the seam: what is refused, and where): the pools and q's layout, the block table,
the lengths and ``cu_seqlens_q``'s pairing, new tokens, gradients. The path by length checks the values on the host
(``check_pages``); the one launch on the device (``check_on_device`` before an append, the kernel's row check after),
and names the fault on the host only once a device check failed (``diagnose``). ``frontends.paged`` runs both
paths."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core import ir
from ...core.errors import SpecError
from ..checks import PAGED_VALUES_FAILED
from ..compiling import compiling
from ..numerics import needs_grad
from .paged_appends import NewTokens

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
        f"query heads ({readings[layout]}) must be a multiple of the pools' key/value heads ({hkv}) (q {shown} "
        f'in layout "{layout}", {order[layout]})',
        where="argument q",
    )


def bind_qkv(q, k, v, inputs: dict) -> tuple:
    """A call's q, k, v: positional, or by keyword where not given positionally (``attn(q=q, k=k, v=v)``).
    A keyword ``k``/``v`` beside a positional one stays in ``inputs``: a paged call's new keys and values
    (``flash_attn_with_kvcache(q, k_cache, v_cache, k=, v=)``). One missing is named."""
    given = {"q": q, "k": k, "v": v}
    if q is not None and "q" in inputs:  # (k= and v= beside k, v are new tokens; a second q is nothing)
        raise SpecError("q is given twice, by position and by keyword", where="argument q", hint="attn(q, k, v)")
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


def split_new_tokens(pat, inputs: dict) -> tuple[dict, object, object]:
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
    _, k_new, v_new = split_new_tokens(pat, inputs)
    for name, t in (("k", k_new), ("v", v_new)):
        if t is not None:
            raise SpecError(
                f"{name}= appends new {'keys' if name == 'k' else 'values'} to paged KV caches: only with "
                "block_table= and cache_seqlens=",
                where=f"argument {name}",
                hint="a contiguous call takes every key and value as its k and v",
            )


def check_new_tokens(q, k_cache, v_cache, k_new, v_new, layout: str, rows=None, batch: int | None = None):
    """``k=``, ``v=`` in ``layout`` (None when neither is given), checked against the batch's rows and the pools:
    ``[B, Hkv, n_new, D]`` and ``[B, Hkv, n_new, Dv]`` in ``"bhnd"`` (every row appends ``n_new``; ``batch``: the
    block table's rows where q is one packed entry, ``cu_seqlens_q``; q's batch by default), or with packed rows
    (``rows``, checked) ``[1, Hkv, total, D]`` packed as q (each row appends one token per query). q is oriented."""
    what = "q's batch" if batch is None else "the block table's rows"
    batch = q.shape[0] if batch is None else batch
    if k_new is None and v_new is None:
        return None
    for name, t, other in (("k", k_new, "v"), ("v", v_new, "k")):
        if t is None:
            raise SpecError(
                f"{other}= is given without {name}=: new keys and values are appended together",
                where=f"argument {name}",
            )
    # (the storage compared eagerly only: dynamo cannot trace a data pointer; one tensor passed twice is caught there)
    same = k_cache is v_cache or (not compiling() and k_cache.numel() and k_cache.data_ptr() == v_cache.data_ptr())
    if k_new is not v_new and same:
        raise SpecError("k and v are one pool: the new values would be written over the new keys in the same slots",
                        where="argument v", hint="give keys and values pools of their own, or v= the same tensor as k=")
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
        packs = rows is not None and t.shape[0] == 1 and t.shape[2] == q.shape[2]  # one token per packed query
        if (t.shape[0] != batch and not packs) or t.shape[1] != pool.shape[2] or t.shape[3] != pool.shape[3]:
            shown = list(t.shape if layout == "bhnd" else t.transpose(1, 2).shape)
            expect = order.format(pool.shape[3]).replace("B", str(batch), 1)
            expect = expect.replace("Hkv", str(pool.shape[2]))
            also = ""
            if rows is not None:  # the packed form too
                also = " or " + order.format(pool.shape[3]).replace("B", "1", 1).replace("n_new", str(q.shape[2]))
                also = also.replace("Hkv", str(pool.shape[2])) + " packed as q"
            raise SpecError(
                f"expected {expect}{also} ({what}, the cache's heads and head dim; layout "
                f'"{layout}"), got {shown}',
                where=where,
            )
        out.append(t)
    if out[0].shape[2] != out[1].shape[2]:
        raise SpecError(
            f"v has {out[1].shape[2]} new tokens, k {out[0].shape[2]}: one value per key",
            where="argument v",
        )
    if rows is not None and out[0].shape[0] == 1 and out[0].shape[2] == q.shape[2]:
        return NewTokens.packed(out[0], out[1], rows.cu)
    return NewTokens.uniform(out[0], out[1])


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


def check_pages(pat, batch: int, n, k_cache, block_table, cache_seqlens, new: NewTokens | None = None) -> Pages:
    """Validate ``block_table`` and ``cache_seqlens`` against ``batch`` rows of ``n`` queries each (an int, or a
    list of each row's count) and the pool, with ``new`` keys appended to each row (``k=``) after
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
    added = new.host_counts() if new is not None else [0] * batch
    lengths = [x + a for x, a in zip(before, added, strict=True)]
    windows = ir.least_length(pat) if isinstance(pat, ir.PatternIR) else 1  # the mask's windows fit each row
    for b, length in enumerate(before):
        rows = n[b] if isinstance(n, list) else n
        appended = added[b]
        told = f" and the {appended} new keys of k=" if appended else ""
        # self-attention: the queries are the last n keys of the row (the new ones included); a row of no
        # queries may hold no key (a serving batch padded to a captured size: vLLM's rows of length 0)
        least = max(rows, 1) if pat.self_attention else 1
        low, high = (max(max(least, windows) - appended, 0) if rows else 0), capacity - appended
        if length < 0:
            why = "a key count is not negative"
        elif length > high:
            why = f"block_table holds {block_table.shape[1]} pages of {page_size} keys, at most {capacity}"
            why += f" (the row's keys{told})" if appended else ""
        elif length < low and windows > least:
            why = f"the pattern's window (size times dilation) needs rows of at least {windows} keys{told}"
        elif length < low:
            why = (
                f"the {rows} queries are the row's last keys (cache_seqlens{told} count them)"
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
        if added[b] and (j + 1) * page_size > before[b]:
            how = (
                f"row {b} writes its {added[b]} new keys into slots {before[b]} .. {lengths[b] - 1}, "
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
    repeat = new.first_repeat(table, torch.tensor(before), page_size) if new is not None else None
    if repeat is not None:  # a row's keys aliasing: a new token would be written over one of its own keys
        b, j = repeat
        raise SpecError(
            f"block_table[{b}, {j}] = {int(table[b, j])} lists a page row {b} reaches again (its keys with the new "
            "ones): a new key would be written over one of its own",
            where="argument block_table", hint="a row's pages are distinct")
    shared = new.first_shared(table, torch.tensor(before), page_size) if new is not None else None
    if shared is not None:  # two rows writing one slot: the later write would be both rows' key
        first, second, slot = shared
        raise SpecError(
            f"rows {first} and {second} both write a new key into slot {slot % page_size} of page "
            f"{slot // page_size}: each would attend the other's token",
            where="argument block_table", hint="rows that append need pages of their own")
    queries = torch.tensor(n if isinstance(n, list) else [n] * batch)
    hit = new.first_overwrite(table, torch.tensor(before), page_size, num_pages, queries) if new is not None else None
    if hit is not None:  # a page other rows read (a shared prefix): the write would change their key in this call
        writer, page, slot, reader, key = hit
        raise SpecError(
            f"row {writer} writes a new key into slot {slot} of page {page}, which row {reader} attends as its key "
            f"{key}: row {reader} would attend row {writer}'s token",
            where="argument block_table",
            hint="a page that several rows read (a shared prefix) is not written; give the appending row a copy")
    by_length: dict[int, list[int]] = {}
    for b, length in enumerate(lengths):
        by_length.setdefault(length, []).append(b)
    return Pages(
        tuple(lengths),
        tuple((length, tuple(rows)) for length, rows in sorted(by_length.items())),
        page_size,
    )


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


def check_on_device(pat, q, k_cache, block_table, cache_seqlens, new: NewTokens | None, rows) -> None:
    """The values of a one-launch paged call that appends ``k=``/``v=`` checked before anything is written, without
    a host read (``check_pages``'s rules, and ``cu_seqlens_q``'s): one flag made on the device and asserted there
    (``torch._assert_async``). On a GPU a failed check is a device-side assert; on the CPU it fails at once, and the
    host rules then name the argument and the row at fault. (A call that appends nothing is checked by the runner's
    kernel, which writes a flag per row: ``backends.triton.paged``.)"""
    num_pages, page = k_cache.shape[0], k_cache.shape[1]
    capacity = block_table.shape[1] * page
    before = cache_seqlens.to(torch.int64)
    lengths = before + new.counts() if new is not None else before
    counts = rows.counts() if rows is not None else torch.full_like(before, q.shape[2])
    least = counts.clamp(min=1) if pat.self_attention else torch.ones_like(before)
    least = least.clamp(min=ir.least_length(pat))  # the mask's windows fit each row
    least = torch.where(counts > 0, least, 0)  # a row of no queries may hold no key (a padded batch's)
    ok = (before >= 0) & (lengths <= capacity) & (lengths >= least)
    reached = _page_starts(block_table.shape[1], page, k_cache.device) < lengths.unsqueeze(1)  # pages it reaches
    ok = ok & ~(reached & ((block_table < 0) | (block_table >= num_pages))).any(1)
    good = ok.all()
    if new is not None:  # no slot written by two rows, nor one another row attends (found on the device)
        good = (good & ~new.repeats(block_table, cache_seqlens, page) & ~new.shared(block_table, cache_seqlens, page)
                & ~new.overwrites(block_table, cache_seqlens, page, num_pages, counts))  # (the write's slots too)
    if rows is not None:
        good = good & rows.consistent(q.shape[2])
    if compiling():  # traced: the assert goes into the graph
        torch._assert_async(good, PAGED_VALUES_FAILED)
        return
    try:
        torch._assert_async(good, PAGED_VALUES_FAILED)
    except RuntimeError:  # on the CPU, at once: the host rules name what is wrong
        diagnose(pat, q, k_cache, block_table, cache_seqlens, new, rows)
        raise


def diagnose(pat, q, k_cache, block_table, cache_seqlens, new: NewTokens | None, rows) -> None:
    """After a device check of a paged call's values failed: the host rules, raising the ``SpecError`` that names the
    argument and the row at fault (``varlen_rows``' offsets first, then ``check_pages``)."""
    if rows is not None:
        rows.diagnose(q.shape[2])
    check_pages(pat, block_table.shape[0], rows.host_counts() if rows is not None else q.shape[2], k_cache,
                block_table, cache_seqlens, new)


_PAGE_STARTS: dict = {}

def _page_starts(pages: int, page: int, device) -> torch.Tensor:
    """The first key of each of a table's pages, ``[1, pages]`` int64 (made once per shape and device)."""
    key = (pages, page, torch.device(device))
    if key not in _PAGE_STARTS:
        _PAGE_STARTS[key] = (torch.arange(pages, device=device, dtype=torch.int64) * page).view(1, pages)
    return _PAGE_STARTS[key]
