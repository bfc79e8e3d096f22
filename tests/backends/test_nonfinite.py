"""Non-finite inputs (docs/limits.md): a NaN or inf value row reaches every query that attends it, on
every backend; the reference never lets it reach a query that does not attend it; the tiled backends
never let it reach a query whose tile pair with it is EMPTY (a visited tile multiplies whole rows)."""

import math

import pytest
import torch

import attnc

N, TILE, WINDOW, BAD = 64, 16, 4, 37


def _qkv(value):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, N, 16, generator=g) for _ in range(3))
    v[:, :, BAD, 3] = value
    return q, k, v


def _attends_bad():
    mask = attnc.materialize_mask("stdlib:sliding_window", n=N, window=WINDOW)[0]
    return mask[:, BAD]  # [N]: queries that attend the bad key


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_the_reference_lets_a_bad_value_reach_only_the_queries_that_attend_it(value):
    out = attnc.compile_attention("stdlib:sliding_window", backend="reference", window=WINDOW)(*_qkv(value))
    bad_rows = ~torch.isfinite(out).all(-1).all(0).all(0)
    assert torch.equal(bad_rows, _attends_bad())
    assert bad_rows.sum() == WINDOW


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_tiled_backends_keep_a_bad_value_out_of_empty_tiles(backend):
    attn = attnc.compile_attention("stdlib:sliding_window", backend=backend, window=WINDOW, q_tile=TILE, kv_tile=TILE)
    out = attn(*_qkv(math.nan))
    bad_rows = ~torch.isfinite(out).all(-1).all(0).all(0)
    assert bad_rows[_attends_bad()].all()  # every query that attends it
    classes = attn.schedule.classes()[0]  # [q tiles, kv tiles]: 0 EMPTY
    empty_rows = (classes[:, BAD // TILE] == 0).repeat_interleave(TILE)
    assert empty_rows.any() and not bad_rows[empty_rows].any()
