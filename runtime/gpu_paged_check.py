"""The offline GPU compile check of a paged call (``attnc check-gpu --paged``): the kernels one launch over a paged
KV cache runs (``attnc_fwd_paged``, its split-KV merge, a block route's ``attnc_paged_summary``, Combiner's
``attnc_paged_max_summary``, and the
``attnc_paged_token_scores`` of a token route, cluster ids or landmark gates), recorded
from a call on CPU tensors as a CUDA call on ``sm_<arch>`` would make it (``gpu_check.capture_launches``)."""

from __future__ import annotations

import torch

from ..core import ir
from ..core.errors import SpecError
from . import combined_paged
from . import gpu_check as G
from .plan import forms

#: The recorded call: rows of a decode batch, keys per page, query heads per K/V head (where the heads allow it).
ROWS, PAGE, GROUP = 4, 16, 4
#: The table's capacity in keys where ``n`` is not given.
DEFAULT_CAPACITY = 8192
#: A prefill method's recorded rows (each holding all its queries): their lengths, short (the kernels do not depend
#: on them; the selection before the launch runs on the CPU).
PREFILL_ROWS = (300, 129, 64, 17)


def record_paged(pattern, *, arch: int, head_dim: int, dtype: str, n: int | None = None,
                 sizes: dict | None = None) -> tuple[list[G.Recorded], str]:
    """A decode step of ``ROWS`` rows of their own lengths (up to ``n`` keys, the table's capacity) over a paged
    cache of ``PAGE`` keys a page, one query a row, ``GROUP`` query heads per K/V head: its launches and config."""
    from ..compiler.analysis import evaluate as E
    from ..compiler.cost.hardware import get_hardware
    from . import api
    from .backends.triton import paged

    if sizes:
        raise SpecError("a paged cache holds a sequence: no grid sizes", where="argument --sizes")
    attn = api.compile_attention(pattern, backend="triton")
    pat = attn.pattern
    if combined_paged.applies(pat):
        return _record_combined(attn, arch=arch, head_dim=head_dim, dtype=dtype, n=n)
    if not (isinstance(pat, ir.PatternIR) and paged.applies(pat)):
        raise SpecError(f"'{pat.name}' is not served by the one-launch paged kernel (its paged calls gather each "
                        "row's pages and run the ordinary kernels, which check-gpu without --paged checks)",
                        where="argument --paged")
    fixed = bool(getattr(pat, "head_params", ()))  # a parameter given per head fixes the heads
    heads = G.call_heads(pat) if fixed else G.HEADS * GROUP
    kv_heads = heads // GROUP if heads % GROUP == 0 else heads
    batch = decode_batch(heads, kv_heads, head_dim, G.DTYPES[dtype], n, ir.least_length(pat))
    q, k_pool, v_pool, table, lengths, gen, capacity = batch
    rows = {}
    prefill = pat.route is not None and forms.form_of(pat.route).decode_refusal(pat) is not None
    if prefill:  # a prefill method (XAttention): rows that hold all their queries, packed
        q, lengths, rows = prefill_batch(heads, head_dim, q.dtype, capacity, ir.least_length(pat), gen)
    whole = E.bind_sizes(pat, n=capacity, heads=heads, dk=head_dim)
    inputs = G._inputs(pat, whole, gen)
    hw = get_hardware(G.ARCH_HARDWARE.get(arch, "h100"))
    with G.capture_launches() as records, G.launching_for(arch), torch.no_grad():
        runner = G._native_runner(pat, hw)
        attn.runner = runner  # the kernels native, the launch sized for this arch
        attn(q, k_pool, v_pool, block_table=table, cache_seqlens=lengths, layout="bhnd", **rows, **inputs)
    what = "prefill rows of their own lengths, packed" if prefill else "rows"
    return records, f"paged: {ROWS} {what} up to {capacity} keys, pages of {PAGE}, {heads} over {kv_heads} heads"


def decode_batch(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, n: int | None, least: int = 1):
    """The recorded decode step's tensors: ``(q, k_pool, v_pool, block_table, lengths, generator, capacity)``,
    ``ROWS`` rows of their own lengths (at least ``least``, at most the table's capacity of ``n`` keys rounded up to
    whole pages) in shuffled pages of ``PAGE`` keys, one query a row."""
    capacity = -(-(n or DEFAULT_CAPACITY) // PAGE) * PAGE
    lengths = torch.tensor([max(least, x) for x in (capacity, capacity // 2 + 3, capacity // 8 + 1, capacity // 3)],
                           dtype=torch.int32)[:ROWS]
    gen = torch.Generator().manual_seed(0)
    pages = ROWS * capacity // PAGE
    k_pool = torch.randn(pages, PAGE, kv_heads, head_dim, generator=gen).to(dtype)
    v_pool = torch.randn(pages, PAGE, kv_heads, head_dim, generator=gen).to(dtype)
    table = torch.randperm(pages, generator=gen).view(ROWS, capacity // PAGE).to(torch.int32)
    q = torch.randn(ROWS, heads, 1, head_dim, generator=gen).to(dtype)
    return q, k_pool, v_pool, table, lengths, gen, capacity


def prefill_batch(heads: int, head_dim: int, dtype: torch.dtype, capacity: int, least: int, gen: torch.Generator):
    """A prefill method's recorded batch: ``(q, lengths, rows)``, the ``PREFILL_ROWS`` (at least ``least``, at most the
    capacity) each holding all its queries, packed (``rows``: ``cu_seqlens_q``, ``max_seqlen_q``)."""
    lengths = torch.tensor([min(capacity, max(least, x)) for x in PREFILL_ROWS], dtype=torch.int32)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    q = torch.randn(1, heads, int(cu[-1]), head_dim, generator=gen).to(dtype)
    return q, lengths, {"cu_seqlens_q": cu, "max_seqlen_q": capacity}


def _record_combined(attn, *, arch: int, head_dim: int, dtype: str, n: int | None) -> tuple[list[G.Recorded], str]:
    """A combined pattern's decode step as ``record_paged``'s, one launch per branch (``combined_paged``), every
    branch on its native runner; each launch names its branch where one of its modules holds the kernel."""
    from ..compiler.cost.hardware import get_hardware

    pat = attn.pattern
    hw = get_hardware(G.ARCH_HARDWARE.get(arch, "h100"))
    heads, kv_heads = G.HEADS * GROUP, G.HEADS
    q, k_pool, v_pool, table, lengths, gen, capacity = decode_batch(heads, kv_heads, head_dim, G.DTYPES[dtype], n)
    rows = {}
    prefill = combined_paged.prefill_only(pat)
    if prefill:  # Combiner: rows that hold all their queries, packed
        q, lengths, rows = prefill_batch(heads, head_dim, q.dtype, capacity, 1, gen)
    gates = {d.name: torch.rand(q.shape[0], heads, q.shape[2], generator=gen) for d in pat.gates}
    runners = {}
    with G.capture_launches() as records, G.launching_for(arch), torch.no_grad():
        for b in pat.branches:
            runners[b.name] = attn.branches[b.name].runner = G._native_runner(b.pattern, hw, branch=b.name)
        attn(q, k_pool, v_pool, block_table=table, cache_seqlens=lengths, layout="bhnd", **rows, **gates)
    for rec in records:
        rec.branch = G.branch_of(rec, runners)
    what = "prefill rows of their own lengths, packed" if prefill else "rows"
    return records, (f"paged: {ROWS} {what} up to {capacity} keys, pages of {PAGE}, {heads} over {kv_heads} heads, "
                     "one launch per branch")


def check_paged(pattern, *, archs=G.DEFAULT_ARCHS, head_dims=(64, 128), dtypes=("fp16",), n: int | None = None,
                sizes: dict | None = None) -> list[G.KernelReport]:
    """``gpu_check.check_pattern`` of one launch over a paged KV cache (``record_paged``)."""
    return G.check_pattern(pattern, archs=archs, head_dims=head_dims, dtypes=dtypes, n=n, sizes=sizes,
                           record=record_paged)


__all__ = ["check_paged", "record_paged"]
