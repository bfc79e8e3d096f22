"""Launch grids within CUDA's limits (2^31 - 1 programs along the first axis, 65,535 along the second and third):
the paged summary kernels put (block, row, K/V head) on one axis, so a batch of 2,048 rows over 32 K/V heads
launches; the attention kernels read their offset along the second axis (``GRID_Y0``), so a launch of more batch
entries x heads than it takes runs in parts (the cap lowered here, under the interpreter); a kernel that does not
(the recurrences') is refused by name before any launch."""

from __future__ import annotations

import os

import pytest
import torch
from backend_agreement import assert_forward_backward

import attnc
from attnc.runtime import kernel_fit
from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton import split_kv
from attnc.runtime.backends.triton.paged_max_summaries import max_summaries
from attnc.runtime.backends.triton.paged_routes import launch_summaries

os.environ.setdefault("TRITON_INTERPRET", "1")


class _RecordedKernel:
    """Stands for a Triton kernel: ``kernel[grid](...)`` records the grid and launches nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **meta: None


def _pool(rows: int, kv_heads: int, page: int = 4, d: int = 8):
    cache = torch.zeros(2, page, kv_heads, d)
    table = torch.zeros(rows, 2, dtype=torch.int32)
    seqlens = torch.full((rows,), 2 * page, dtype=torch.int32)
    return cache, table, seqlens


def test_the_summary_kernels_put_blocks_rows_and_kv_heads_on_one_axis():
    rows, kv_heads, size = 2048, 32, 4
    cache, table, seqlens = _pool(rows, kv_heads)
    kernel = _RecordedKernel()
    out = torch.empty(1, rows, kv_heads, 2, cache.shape[-1])
    launch_summaries(kernel, True, cache, table, seqlens, seqlens, out, size, 8)
    assert kernel.grids == [(2 * rows * kv_heads,)]
    qmax = torch.zeros(rows, kv_heads, 2, cache.shape[-1])
    max_summaries(kernel, True, qmax, cache, cache, table, seqlens, size, 1.0)
    assert kernel.grids[-1] == (2 * rows * kv_heads,)
    for grid in kernel.grids:
        kernel_fit.check_grid(grid)


def test_a_grid_past_cudas_second_axis_is_refused_by_name():
    most = kernel_fit.MAX_GRID_YZ
    kernel_fit.check_grid((3, most, 4))
    with pytest.raises(attnc.SpecError, match="65,536 batch entries x heads") as e:
        kernel_fit.check_grid((1, most + 1))
    assert e.value.where == "argument q"
    with pytest.raises(attnc.SpecError, match="split-KV parts"):
        kernel_fit.check_grid((1, 2, most + 1), ("batch entries x heads", "split-KV parts"))


def _parts_recorded(monkeypatch, limit: int) -> list:
    """CUDA's cap on the grid's second axis lowered to ``limit`` (the interpreter runs what a GPU would past
    65,535); each launch's (kernel, grid, GRID_Y0) recorded, the parts of a launch past the cap included."""
    monkeypatch.setattr(kernel_fit, "MAX_GRID_YZ", limit)
    launched, real = [], KL.launch_kernel

    def recording(launch, kernel, grid, args, meta, *, backward):
        launched.append((kernel.fn.__name__, grid, meta.get("GRID_Y0", 0)))
        return real(launch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", recording)
    return launched


def _assert_in_parts(launched: list, limit: int, kernels: set[str]) -> None:
    """Every launch that ran holds at most ``limit`` programs on the second axis, and each of ``kernels`` ran in
    parts whose offsets cover its whole grid."""
    ran = [(name, grid, y0) for name, grid, y0 in launched if grid[1] <= limit]
    assert all(grid[1] <= limit for _, grid, _ in ran)
    for name in kernels:
        whole = [grid for n, grid, _ in launched if n == name and grid[1] > limit]
        assert whole, f"{name} did not launch past the cap"
        parts = sorted((y0, grid[1]) for n, grid, y0 in ran if n == name)
        covered = [y for y0, size in parts for y in range(y0, y0 + size)]
        assert sorted(covered) == sorted(list(range(whole[0][1])) * len(whole)), name


def test_a_forward_and_backward_past_the_second_axis_run_in_parts_and_equal_the_reference(monkeypatch):
    """Batch entries x heads past the cap: each kernel of the forward and the backward launches in parts, each from
    its offset (``GRID_Y0``), and the output and every gradient equal the float64 reference."""
    pattern = attnc.load("stdlib:sliding_window", window=5)
    attn = attnc.compile_attention(pattern, backend="triton")
    ref = attnc.compile_attention(pattern, backend="reference")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 3, 20, 16, generator=g, dtype=torch.float64) for _ in range(3))
    launched = _parts_recorded(monkeypatch, 4)  # 9 batch entries x heads: parts of 4, 4 and 1
    assert_forward_backward("triton", attn, ref, [q, k, v])
    _assert_in_parts(launched, 4, {"attnc_fwd", "attnc_bwd_delta", "attnc_bwd_dq", "attnc_bwd_dkdv"})


def test_a_grouped_split_kv_decode_past_the_second_axis_runs_in_parts(monkeypatch):
    """Query heads packed per K/V head and split-KV (the grouped forward and the merge of its splits), batch entries
    x K/V heads past the cap: in parts, equal to the reference."""
    pattern = attnc.load("stdlib:sliding_window", window=64)
    attn = attnc.compile_attention(pattern, backend="triton")
    ref = attnc.compile_attention(pattern, backend="reference")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 4, 1, 16, generator=g)
    k, v = (torch.randn(5, 2, 96, 16, generator=g) for _ in range(2))
    monkeypatch.setattr(split_kv, "FORCE_SPLITS", 3)
    launched = _parts_recorded(monkeypatch, 3)
    out = attn(q, k, v)
    names = {name for name, _, _ in launched}
    assert {"attnc_fwd_grouped", "attnc_fwd_combine"} <= names, names
    _assert_in_parts(launched, 3, {"attnc_fwd_grouped", "attnc_fwd_combine"})
    torch.testing.assert_close(out, ref(q.double(), k.double(), v.double()).float(), rtol=2e-5, atol=2e-5)


def test_a_paged_batch_past_the_second_axis_runs_in_parts(monkeypatch):
    """The paged forward puts rows x K/V heads on the second axis: past the cap in parts, each row the reference."""
    from test_paged_one_launch import pool

    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=6)
    ref = attnc.compile_attention("stdlib:sliding_window", backend="reference", window=6)
    lengths, counts = [5, 17, 11], [1, 3, 2]
    k, v, table, seqlens, rows = pool(lengths, 8)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, 4, int(cu[-1]), k.shape[-1], generator=torch.Generator().manual_seed(1))
    launched = _parts_recorded(monkeypatch, 4)  # 3 rows x 2 K/V heads
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    _assert_in_parts(launched, 4, {"attnc_fwd_paged"})
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        want = ref(q[:, :, lo:hi].double(), kb.double(), vb.double())
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


def test_a_recurrence_past_the_second_axis_is_refused_by_name_before_any_launch(monkeypatch):
    """The recurrences' kernels read no offset there: past the cap, one clear error naming q, and nothing runs."""
    from test_delta_triton import make

    from attnc.runtime.recurrences.library import host

    q, k, v, inputs, _ = make("gated_delta_net", 2, 2, 16, 8, 8, seed=1)
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="triton", q_tile=16)
    monkeypatch.setattr(kernel_fit, "MAX_GRID_YZ", 3)  # 2 batch entries x 2 heads

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(host, "interpreting", launched)  # what a launch does after the grid's check
    monkeypatch.setattr(kernel_fit, "on_gpu", launched)
    with pytest.raises(attnc.SpecError, match="4 batch entries x heads in one launch") as e:
        attn(q, k, v, **inputs)
    assert e.value.where == "argument q"
