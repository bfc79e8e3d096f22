"""attnc.na1d/na2d/na3d against a naive float64 loop of NATTEN's neighborhood definition (window
shifted inward at the borders, dilation groups, causal per axis, stride), forward and backward, with
and without additional keys; argument checks; the module cache."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnc
from attnc import SpecError
from attnc.integrations import natten

F64 = torch.float64


def _axis_allows(L: int, w: int, s: int, d: int, causal: bool, i: int, j: int) -> bool:
    """NATTEN's 1-D rule, written from its definition: same dilation group, in-group coordinates."""
    if i % d != j % d:
        return False
    n = len(range(i % d, L, d))  # tokens in the dilation group
    qi, kj = i // d, j // d
    if causal:
        leader = min((qi // s) * s + s - 1, n - 1)  # the stride group's last query
        return kj <= qi and leader - kj < w
    leader = min((qi // s) * s + s // 2, n - 1)  # the stride group's centre query (right one if even)
    left, right = w // 2, w // 2 + w % 2 - 1
    centre = min(max(leader, left), n - 1 - right)
    return centre - left <= kj <= centre + right


def _naive(q, k, v, kernel, stride, dilation, causal, scale, add_k=None, add_v=None):
    """Dense float64 attention with the materialised mask (neighborhood keys, then every extra key)."""
    B, *spatial, H, D = q.shape
    coords = list(itertools.product(*(range(e) for e in spatial)))
    N = len(coords)
    mask = torch.zeros(N, N, dtype=torch.bool)
    for a, ci in enumerate(coords):
        for b, cj in enumerate(coords):
            mask[a, b] = all(_axis_allows(L, w, s, d, c, i, j) for L, w, s, d, c, i, j in
                             zip(spatial, kernel, stride, dilation, causal, ci, cj, strict=True))
    qf, kf, vf = (t.reshape(B, N, t.shape[-2], t.shape[-1]).double() for t in (q, k, v))
    if add_k is not None:
        kf, vf = torch.cat([kf, add_k.double()], 1), torch.cat([vf, add_v.double()], 1)
        mask = torch.cat([mask, torch.ones(N, add_k.shape[1], dtype=torch.bool)], 1)
    rep = H // kf.shape[2]
    kf, vf = kf.repeat_interleave(rep, 2), vf.repeat_interleave(rep, 2)
    scores = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale
    scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhnm,bmhe->bnhe", torch.softmax(scores, -1), vf)
    return out.reshape(B, *spatial, H, -1), lse.transpose(1, 2).reshape(B, *spatial, H)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).requires_grad_()


def _tuple(x, rank):
    return tuple(x) if isinstance(x, tuple) else (x,) * rank


CASES = [
    # fn, spatial, kernel_size, stride, dilation, is_causal
    (attnc.na1d, (13,), 4, 1, 2, False),
    (attnc.na1d, (11,), (5,), 3, 1, True),
    (attnc.na2d, (6, 7), (3, 4), (2, 1), (1, 1), (False, True)),
    (attnc.na2d, (7, 5), 3, 3, (2, 1), False),
    (attnc.na3d, (3, 4, 5), (2, 3, 3), (1, 2, 3), 1, (True, False, False)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_naive_natten_forward_backward(case):
    fn, spatial, ks, st, dil, causal = CASES[case]
    rank = len(spatial)
    B, Hq, Hkv, D, Dv = 2, 2, 1 if case == 2 else 2, 4, 3
    q = _rand(B, *spatial, Hq, D, seed=case)
    k = _rand(B, *spatial, Hkv, D, seed=case + 10)
    v = _rand(B, *spatial, Hkv, Dv, seed=case + 20)
    out, lse = fn(q, k, v, ks, stride=st, dilation=dil, is_causal=causal, scale=0.4, return_lse=True)
    want, want_lse = _naive(q, k, v, _tuple(ks, rank), _tuple(st, rank), _tuple(dil, rank), _tuple(causal, rank),
                            0.4)
    assert out.shape == (B, *spatial, Hq, Dv) and lse.shape == (B, *spatial, Hq)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=F64)
    got = torch.autograd.grad((out * w).sum() + lse.sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum() + want_lse.sum(), (q, k, v))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("rank", [1, 2])
def test_additional_keys_merged_exactly(rank):
    spatial = (9,) if rank == 1 else (5, 6)
    fn = attnc.na1d if rank == 1 else attnc.na2d
    B, H, D, M = 2, 2, 4, 3
    q, k, v = (_rand(B, *spatial, H, D, seed=s) for s in (1, 2, 3))
    ak, av = _rand(B, M, H, D, seed=4), _rand(B, M, H, D, seed=5)
    causal = (True,) * rank
    out, lse = fn(q, k, v, 3, is_causal=causal, additional_keys=ak, additional_values=av, return_lse=True)
    want, want_lse = _naive(q, k, v, (3,) * rank, (1,) * rank, (1,) * rank, causal, D ** -0.5, ak, av)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    got = torch.autograd.grad((out * w).sum(), (q, k, v, ak, av))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v, ak, av))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("extra", [False, True])
def test_a_compiled_model_calling_na2d_traces_its_first_call_with_fullgraph(extra):
    """``na2d`` in a model under ``torch.compile(fullgraph=True)``, a configuration not seen before: the module is
    made and called inside ``attnc::natten_attention`` (its first call failed in dynamo, which cannot read the
    stdlib's file); out, lse and the gradients of every tensor equal NATTEN's rule, with extra keys too."""
    natten.clear_cache()
    torch._dynamo.reset()
    spatial, ks, st, causal = (5, 6), (3, 4), (2, 1), (True, False)
    q, k, v = (_rand(2, *spatial, 2, 4, seed=s) for s in (40, 41, 42))
    ak, av = (_rand(2, 3, 2, 4, seed=s) for s in (43, 44)) if extra else (None, None)

    def block(q, k, v, ak, av):
        return attnc.na2d(q, k, v, ks, stride=st, is_causal=causal, backend="cpu", additional_keys=ak,
                          additional_values=av, return_lse=True)

    out, lse = torch.compile(block, fullgraph=True)(q, k, v, ak, av)
    want, want_lse = _naive(q, k, v, ks, st, (1, 1), causal, 0.5, ak, av)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)
    leaves = (q, k, v, ak, av) if extra else (q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(45), dtype=F64)
    got = torch.autograd.grad((out * w).sum() + lse.sum(), leaves)
    ref = torch.autograd.grad((want * w).sum() + want_lse.sum(), leaves)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    natten.clear_cache()


def test_natten_none_defaults_and_performance_keywords_are_accepted():
    """NATTEN's None defaults (stride, dilation, is_causal, backend) are its 1, 1, False and attnc's auto; its
    performance keywords change nothing; any other keyword is refused by name (it was a bare TypeError)."""
    q, k, v = (_rand(1, 5, 6, 2, 4, seed=s) for s in (50, 51, 52))
    want = attnc.na2d(q, k, v, 3, backend="cpu")
    got = attnc.na2d(q, k, v, 3, stride=None, dilation=None, is_causal=None, backend="cpu", q_tile_shape=(2, 4),
                     kv_tile_shape=(2, 4), torch_compile=True, attention_kwargs={}, run_persistent_kernel=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(attnc.na2d(q, k, v, 3, backend=None), want, rtol=1e-12, atol=1e-12)
    _refused("argument q_tile_shap", "unexpected keyword", attnc.na2d, q, k, v, 3, q_tile_shap=(2, 4))
    empty = torch.zeros(1, 5, 6, 2, 0, dtype=F64)
    _refused("argument query", "head dim 0 (shape [1, 5, 6, 2, 0])", attnc.na2d, empty, empty, empty, 3)


def test_reference_backend_and_generic_entry_point_agree():
    q, k, v = (_rand(1, 4, 5, 2, 4, seed=s) for s in (30, 31, 32))
    a = attnc.neighborhood_attention(q, k, v, kernel_size=(3, 2), dilation=(1, 2), backend="reference")
    b = attnc.na2d(q, k, v, kernel_size=(3, 2), dilation=(1, 2), backend="cpu")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compiled_once_and_cache_bounded(monkeypatch):
    natten.clear_cache()
    monkeypatch.setattr(natten, "CACHE_SIZE", 2)
    x = torch.randn(1, 8, 1, 4, dtype=F64)
    attnc.na1d(x, x, x, 3)
    first = next(iter(natten._CACHE.values()))
    attnc.na1d(x, x, x, (3,))  # the same configuration, given as a tuple
    assert len(natten._CACHE) == 1 and next(iter(natten._CACHE.values())) is first
    attnc.na1d(x, x, x, 5)
    attnc.na1d(x, x, x, 7)
    assert len(natten._CACHE) == 2 and first not in natten._CACHE.values()
    natten.clear_cache()


def _refused(where, match, fn, *args, **kw):
    with pytest.raises(SpecError) as info:
        fn(*args, **kw)
    assert info.value.where == where, str(info.value)
    assert match in str(info.value), str(info.value)


def test_arguments_checked_naming_the_argument():
    x1 = torch.randn(1, 8, 2, 4)
    x2 = torch.randn(1, 5, 6, 2, 4)
    _refused("argument kernel_size", "larger than the input's extent 8", attnc.na1d, x1, x1, x1, 9)
    _refused("argument dilation", "(3 * 3 = 9)", attnc.na1d, x1, x1, x1, 3, dilation=3)
    _refused("argument kernel_size", "int >= 2", attnc.na1d, x1, x1, x1, 1)
    _refused("argument kernel_size", "one per axis: y, x", attnc.na2d, x2, x2, x2, (3, 3, 3))
    _refused("argument kernel_size", "int >= 2", attnc.na2d, x2, x2, x2, (3, True))
    _refused("argument stride", "stride 4 is larger than kernel_size 3", attnc.na2d, x2, x2, x2, 3, stride=(1, 4))
    _refused("argument stride", "positive int", attnc.na1d, x1, x1, x1, 3, stride=0)
    _refused("argument is_causal", "True or False", attnc.na2d, x2, x2, x2, 3, is_causal=(1, 0))
    _refused("argument query", "expects 5-D tensors", attnc.na2d, x1, x1, x1, 3)
    _refused("argument key", "spatial extents", attnc.na2d, x2, torch.randn(1, 6, 5, 2, 4), x2, 3)
    _refused("argument query", "4-D, 5-D or 6-D", attnc.neighborhood_attention, torch.randn(2, 4), x1, x1, 3)
    _refused("argument scale", "finite", attnc.na1d, x1, x1, x1, 3, scale=float("nan"))
    _refused("argument key", "share a dtype", attnc.na1d, x1, x1.double(), x1, 3)
    _refused("argument key", "multiple", attnc.na1d, torch.randn(1, 8, 3, 4), x1, x1, 3)
    _refused("argument backend", "unknown", attnc.na1d, x1, x1, x1, 3, backend=["cpu"])
    extra = torch.randn(1, 3, 2, 4)
    _refused("argument additional_values", "together", attnc.na1d, x1, x1, x1, 3, additional_keys=extra)
    _refused("argument additional_keys", "batch, heads and head dim", attnc.na1d, x1, x1, x1, 3,
             additional_keys=torch.randn(1, 3, 2, 5), additional_values=extra)
    _refused("argument additional_values", "tokens", attnc.na1d, x1, x1, x1, 3,
             additional_keys=extra, additional_values=torch.randn(1, 4, 2, 4))
