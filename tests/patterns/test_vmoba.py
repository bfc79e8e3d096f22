"""VMoBA (stdlib ``vmoba``, ``route topp(P) blocks(...) by minmax(q @ mean(k)) over GROUP``): every layer's
partition and every group against a transcription of the authors' code (KwaiVGI/VMoBA at 4da72ff2,
``src/vmoba.py``: ``process_moba_input``, ``moba_attn_varlen`` in threshold mode and its four
``_select_threshold_*`` rules), forward and backward, on every backend; and the clause's checks."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import assert_context_parallel_refuses

import attnc
from attnc.core.errors import SpecError

EPS = 1e-6


# --- the code's four threshold rules, transcribed (gate [C, H, S], valid and self masks alike) ---

def _normalised(gate, valid, dims):
    low = torch.where(valid, gate, torch.inf).amin(dim=dims, keepdim=True)
    high = torch.where(valid, gate, -torch.inf).amax(dim=dims, keepdim=True)
    denom = high - low
    denom = torch.where(denom <= EPS, torch.ones_like(denom), denom)
    return torch.where(valid, (gate - low) / denom, 0.0)


def _cut(sorted_norm, total, remain, dim):
    """The first sorted place whose running share reaches ``remain`` (the last place where none does)."""
    ratio = sorted_norm.cumsum(dim=dim) / (total + EPS)
    cond = ratio >= remain
    last = torch.full_like(cond.any(dim=dim), sorted_norm.shape[dim] - 1, dtype=torch.long)
    return torch.where(cond.any(dim=dim), cond.float().argmax(dim=dim), last)


def code_select(gate, valid, own, threshold, mode):
    C, H, S = gate.shape
    if mode == "query":  # _select_threshold_query_head
        norm = _normalised(gate, valid, (0,))
        total = norm.sum(0)
        remain = torch.clamp(threshold - (norm * own).sum(0) / (total + EPS), min=0.0)
        others = norm.clone()
        others[own] = 0.0
        sorted_norm, idx = torch.sort(others, descending=True, dim=0, stable=True)
        cutoff = _cut(sorted_norm, total.unsqueeze(0), remain.unsqueeze(0), 0)
        mask = torch.zeros_like(gate, dtype=torch.bool)
        mask.scatter_(0, idx, torch.arange(C).view(-1, 1, 1) <= cutoff.unsqueeze(0))
    elif mode == "block":  # _select_threshold_block
        norm = _normalised(gate, valid, (1, 2))
        total = norm.sum(dim=(1, 2))
        remain = torch.clamp(threshold - (norm * own).sum(dim=(1, 2)) / (total + EPS), min=0.0)
        others = norm.clone()
        others[own] = 0.0
        sorted_flat, idx = torch.sort(others.reshape(C, H * S), dim=1, descending=True, stable=True)
        cutoff = _cut(sorted_flat, total.unsqueeze(1), remain.unsqueeze(1), 1)
        flat = torch.zeros(C, H * S, dtype=torch.bool)
        flat.scatter_(1, idx, torch.arange(H * S).unsqueeze(0) <= cutoff.unsqueeze(1))
        mask = flat.view(C, H, S)
    elif mode == "all":  # _select_threshold_overall: only the valid other entries are ranked
        norm = _normalised(gate, valid, (0, 1, 2))
        total = norm.sum()
        remain = torch.clamp(threshold - (norm * own).sum() / (total + EPS), min=0.0)
        others = norm.flatten()
        candidates = torch.where(valid.flatten() & ~own.flatten())[0]
        values, perm = torch.sort(others[candidates], descending=True, stable=True)
        ratio = values.cumsum(0) / (total + EPS)
        cond = ratio >= remain
        cutoff = int(cond.float().argmax()) if bool(cond.any()) else len(values) - 1
        flat = torch.zeros(C * H * S, dtype=torch.bool)
        flat[candidates[perm][:cutoff + 1]] = True
        mask = flat.view(C, H, S)
    else:  # "head": _select_threshold_head_global
        norm = _normalised(gate, valid, (0, 2))
        total = norm.sum(dim=(0, 2))
        remain = torch.clamp(threshold - (norm * own).sum(dim=(0, 2)) / (total + EPS), min=0.0)
        others = norm.clone()
        others[own] = 0.0
        flat = torch.where((valid & ~own).permute(1, 0, 2).reshape(H, C * S),
                           others.permute(1, 0, 2).reshape(H, C * S), 0.0)
        sorted_vals, idx = torch.sort(flat, dim=1, descending=True, stable=True)
        cutoff = _cut(sorted_vals, total.unsqueeze(1), remain.unsqueeze(1), 1)
        chosen = torch.zeros(H, C * S, dtype=torch.bool)
        chosen.scatter_(1, idx, torch.arange(C * S).unsqueeze(0) <= cutoff.unsqueeze(1))
        mask = chosen.reshape(H, C, S).permute(1, 0, 2)
    return valid & (mask | own)


# --- process_moba_input's reordering, and moba_attn_varlen's threshold path for one sequence ---

def code_order(frames, height, width, chunk):
    """The token order ``process_moba_input`` puts a (t, y, x) grid in, and its chunk length: an int chunk is
    frames (no reordering), a pair a spatial tile over all frames, a triple a box."""
    index = torch.arange(frames * height * width)
    if isinstance(chunk, int):
        return index, chunk * height * width
    if len(chunk) == 2:
        ch, cw = chunk
        grid = index.view(frames, height // ch, ch, width // cw, cw)  # (t nch ch ncw cw)
        return grid.permute(1, 3, 0, 2, 4).reshape(-1), frames * ch * cw  # (nch ncw t ch cw)
    ct, ch, cw = chunk
    grid = index.view(frames // ct, ct, height // ch, ch, width // cw, cw)  # (nct ct nch ch ncw cw)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(-1), ct * ch * cw  # (nct nch ncw ct ch cw)


def code_forward(q, k, v, grid, chunk, threshold, mode):
    """VMoBA's output for q, k, v ``[B, H, N, D]`` in grid order (each batch row a sequence of its own): the
    code's gate, selection and mixed attention (own chunk plus the selected others, one softmax)."""
    order, size = code_order(*grid, chunk)
    B, H, N, D = q.shape
    out = torch.empty(B, H, N, v.shape[-1], dtype=q.dtype)
    starts = list(range(0, N, size))
    for b in range(B):
        qs, ks, vs = (x[b][:, order] for x in (q, k, v))  # [H, S, D] in the code's order
        with torch.no_grad():
            means = torch.stack([ks[:, s:s + size].mean(1) for s in starts])  # [C, H, D]
            gate = torch.einsum("chd,hsd->chs", means, qs)
            chunk_of = torch.arange(N) // size
            own = (chunk_of.view(1, 1, -1) == torch.arange(len(starts)).view(-1, 1, 1)).expand(-1, H, -1)
            chosen = code_select(gate, torch.ones_like(own), own, threshold, mode)  # [C, H, S]
            keys = chosen.permute(1, 2, 0)[:, :, chunk_of]  # [H, S, S]
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(D)
        o = torch.softmax(scores.masked_fill(~keys, -torch.inf), -1) @ vs
        out[b][:, order] = o
    return out


def vmoba_source(mode: str) -> str:
    """The stdlib pattern with its selection ranked over ``mode``."""
    text = (Path(attnc.__file__).parent / "stdlib_patterns" / "vmoba.attn").read_text()
    return text.replace("over head", f"over {mode}")


def _call(attn, q, k, v, grid):
    return attn(q, k, v, sizes=dict(zip(("frames", "height", "width"), grid, strict=True)))


CHUNKS = {0: 2, 1: (2, 3), 2: (2, 2, 3)}  # the layer's partition: the code's chunk argument


def _params(layer):
    return dict(layer=layer, temporal_chunk=2, spatial_chunk_y=2, spatial_chunk_x=3, st_chunk_t=2,
                st_chunk_y=2, st_chunk_x=3)


@pytest.mark.parametrize("mode", ["head", "query", "block", "all"])
@pytest.mark.parametrize("layer", [0, 1, 2, 3, 5])
def test_every_layer_and_group_matches_the_authors_code(layer, mode):
    grid = (4, 4, 6)
    g = torch.Generator().manual_seed(10 * layer + len(mode))
    q, k, v = (torch.randn(2, 3, math.prod(grid), 8, dtype=torch.float64, generator=g) for _ in range(3))
    attn = attnc.compile_attention(vmoba_source(mode), backend="reference", threshold=0.3, **_params(layer))
    want = code_forward(q, k, v, grid, CHUNKS[layer % 3], 0.3, mode)
    torch.testing.assert_close(_call(attn, q, k, v, grid), want, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layer=st.integers(0, 2), mode=st.sampled_from(["head", "query", "block", "all"]),
       threshold=st.sampled_from([0.05, 0.25, 0.6, 1.0]), frames=st.sampled_from([2, 4]), heads=st.integers(1, 3))
def test_random_inputs_match_the_authors_code(seed, layer, mode, threshold, frames, heads):
    grid = (frames, 2, 6)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, math.prod(grid), 4, dtype=torch.float64, generator=g) for _ in range(3))
    attn = attnc.compile_attention(vmoba_source(mode), backend="reference", threshold=threshold, **_params(layer))
    want = code_forward(q, k, v, grid, CHUNKS[layer], threshold, mode)
    torch.testing.assert_close(_call(attn, q, k, v, grid), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_forward_and_backward_on_every_backend(backend):
    grid, layer = (4, 4, 6), 1
    g = torch.Generator().manual_seed(7)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = (torch.randn(1, 2, math.prod(grid), 16, dtype=torch.float64, generator=g) for _ in range(3))
    attn = attnc.compile_attention("stdlib:vmoba", backend=backend, **_params(layer))
    ours = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
    theirs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = _call(attn, *ours, grid)
    want = code_forward(*theirs, grid, CHUNKS[layer], 0.25, "head")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    out.backward(grad.to(dtype))
    want.backward(grad)
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad.double(), ref.grad, **tol)


def test_the_selection_is_not_every_block():
    """The threshold keeps a fraction of the blocks (the pattern is sparse, not dense by accident)."""
    grid = (4, 6, 6)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, math.prod(grid), 8, dtype=torch.float64, generator=g) for _ in range(3))
    attn = attnc.compile_attention("stdlib:vmoba", backend="reference", **_params(2))
    dense = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    assert not torch.allclose(_call(attn, q, k, v, grid), dense, atol=1e-3)


def test_queries_after_a_cache_are_refused_for_a_group_spanning_queries():
    source = ("pattern p\n  tokens seq\n"
              "  route topp(0.5) blocks(4) by minmax(q @ mean(k)) over head keep q // 4 == k // 4\n")
    q = torch.randn(1, 1, 2, 8)
    k = v = torch.randn(1, 1, 16, 8)
    for backend in ("reference", "cpu", "triton"):
        with pytest.raises(SpecError, match=r"head group .* queries after a KV cache") as err:
            attnc.compile_attention(source, backend=backend)(q, k, v)
        assert err.value.where == "argument k"
    per_query = attnc.compile_attention(source.replace("over head", "over query"), backend="cpu")
    assert per_query(q, k, v).shape == q.shape  # one query's row: decoding is served


@pytest.mark.parametrize("clause,message", [
    ("route topp(0.5) blocks(4) by minmax(q @ mean(k)) over heads", "unknown group 'heads'"),
    ("route topp(0.5) blocks(4) by minmax(mean(q) @ mean(k)) over head", re.escape("its left side must be 'q'")),
    ("route topp(0.5) blocks(4) by minmax(q @ bound(k)) over head", re.escape("its right side must be 'mean(k)'")),
    ("route topp(1.5) blocks(4) by minmax(q @ mean(k)) over head", r"topp must be in \(0, 1\]"),
    ("route topp(0.5) blocks(y: 4) by minmax(q @ mean(k)) over head", "'tokens seq' has no axes"),
])
def test_bad_clauses_are_refused_with_their_place(clause, message):
    with pytest.raises(SpecError, match=message) as err:
        attnc.compile_attention(f"pattern p\n  tokens seq\n  {clause}\n")
    assert err.value.pos is not None and err.value.pos.line == 3


def test_a_threshold_outside_the_unit_interval_names_the_parameter():
    with pytest.raises(SpecError, match=r"topp must be in \(0, 1\], got 2"):
        attnc.compile_attention("stdlib:vmoba", threshold=2)


def test_context_parallelism_refuses_by_name(tmp_path):
    assert_context_parallel_refuses("stdlib:vmoba", "min-max share over the head group .* context parallelism does not run", tmp_path)


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
def test_a_per_query_group_decodes_as_the_reference(backend):
    """``over query`` ranks within each query's row: queries after a KV cache are served, as on the reference."""
    source = ("pattern p(threshold = 0.4)\n  tokens seq\n  mask causal\n"
              "  route topp(threshold) blocks(4) by minmax(q @ mean(k)) over query keep q // 4 == k // 4\n")
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 3, 16, generator=g)
    k, v = (torch.randn(2, 2, 37, 16, generator=g) for _ in range(2))
    want = attnc.compile_attention(source, backend="reference")(q.double(), k.double(), v.double())
    got = attnc.compile_attention(source, backend=backend)(q, k, v)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_packed_sequences_are_each_ranked_on_their_own(backend):
    """A packed call (cu_seqlens) equals one call per sequence: a head's ranking spans its own sequence only."""
    source = ("pattern p\n  tokens seq\n"
              "  route topp(0.5) blocks(4) by minmax(q @ mean(k)) over head keep q // 4 == k // 4\n")
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    got = attnc.compile_attention(source, backend=backend)(q, k, v, cu_seqlens=torch.tensor([0, 17, 40]))
    ref = attnc.compile_attention(source, backend="reference")
    want = torch.cat([ref(*(x[:, :, a:b].double() for x in (q, k, v))) for a, b in ((0, 17), (17, 40))], 2)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["head", "query", "block", "all"])
def test_a_mask_makes_entries_invalid_as_the_codes_batch_bounds_do(mode):
    """With a causal mask, a (block, query) entry is valid where the query reaches a key of the block: the
    code's valid_gate_mask (which it uses for a packed batch's bounds) passed to its rules as such."""
    source = (f"pattern p(threshold = 0.3)\n  tokens seq\n  mask causal\n  route topp(threshold) blocks(8) "
              f"by minmax(q @ mean(k)) over {mode} keep q // 8 == k // 8\n")
    g = torch.Generator().manual_seed(21)
    n, H, D = 40, 3, 8
    q, k, v = (torch.randn(1, H, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    chunk_of, starts = torch.arange(n) // 8, torch.arange(0, n, 8)
    means = torch.stack([k[0, :, s:s + 8].mean(1) for s in starts])  # [C, H, D]
    gate = torch.einsum("chd,hsd->chs", means, q[0])
    own = (chunk_of.view(1, 1, -1) == torch.arange(len(starts)).view(-1, 1, 1)).expand(-1, H, -1)
    valid = (starts.view(-1, 1, 1) <= torch.arange(n).view(1, 1, -1)).expand(-1, H, -1)
    chosen = code_select(gate, valid, own, 0.3, mode).permute(1, 2, 0)[:, :, chunk_of]  # [H, n, n]
    allowed = chosen & torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q[0] @ k[0].transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, -math.inf)
    want = torch.softmax(scores, -1) @ v[0]
    got = attnc.compile_attention(source, backend="reference")(q, k, v)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
