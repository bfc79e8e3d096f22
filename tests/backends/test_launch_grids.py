"""Launch grids within CUDA's limits (2^31 - 1 programs along the first axis, 65,535 along the second and third):
the paged summary kernels put (block, row, K/V head) on one axis, so a batch of 2,048 rows over 32 K/V heads
launches; a forward over more batch entries x heads than the second axis takes is refused by name, under the
interpreter as on a GPU, before any launch."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.runtime import kernel_fit
from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton.paged_max_summaries import max_summaries
from attnc.runtime.backends.triton.paged_routes import launch_summaries


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


def test_a_forward_over_too_many_batch_entries_x_heads_is_refused_before_any_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(KL, "_launch_opts", launched)  # what a launch does first after the grid's check
    attn = attnc.compile_attention(attnc.load("stdlib:sliding_window", window=4), backend="triton")
    q = torch.randn(kernel_fit.MAX_GRID_YZ + 1, 1, 1, 16)
    with pytest.raises(attnc.SpecError, match="batch entries x heads"):
        attn(q, q, q)
