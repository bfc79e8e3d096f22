"""The warm host path of a forward-only Triton call (``runtime.backends.triton.launcher``): a signature seen twice
binds a launcher, later calls of it replay the launches with their own tensors, and the answers are the ordinary
path's. Under the interpreter, on small decode steps."""

from __future__ import annotations

import os

import pytest
import torch

import attnc
from attnc.runtime import api
from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton.runner import TritonRunner
from attnc.runtime.kernel_fit import leaves

os.environ.setdefault("TRITON_INTERPRET", "1")

CAUSAL = "pattern causal_mask\n  tokens seq\n  mask causal\n"


def _qkv(nk: int, seed: int = 0, batch: int = 1, heads: int = 2, kv_heads: int = 1, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, 1, d, generator=g), torch.randn(batch, kv_heads, nk, d, generator=g),
            torch.randn(batch, kv_heads, nk, d, generator=g))


def _sliding():
    return attnc.compile_attention(attnc.load("stdlib:sliding_window", window=24), backend="triton")


def _bound_launchers(attn) -> int:
    return attn._warm.bound()


def _no_launches(monkeypatch):
    """Kernel launches stubbed: what is counted is the host's work (the interpreter takes seconds a launch)."""
    monkeypatch.setattr(KL, "launch_kernel", lambda *args, **kwargs: None)


def test_warm_call_reuses_its_launcher(monkeypatch):
    _no_launches(monkeypatch)
    attn = _sliding()
    counts = {"prepare": 0, "bind": 0}
    prepare, bind = TritonRunner.prepare, api.Attention._bind_call

    def counted_prepare(self, *a, **kw):
        counts["prepare"] += 1
        return prepare(self, *a, **kw)

    def counted_bind(self, *a, **kw):
        counts["bind"] += 1
        return bind(self, *a, **kw)

    monkeypatch.setattr(TritonRunner, "prepare", counted_prepare)
    monkeypatch.setattr(api.Attention, "_bind_call", counted_bind)
    q, k, v = _qkv(80)
    with torch.inference_mode():
        for _ in range(2):  # the first call runs the ordinary path; the second binds the launcher too
            attn(q, k, v)
        assert _bound_launchers(attn) == 1
        before = dict(counts)
        for _ in range(3):
            attn(q, k, v)
        assert counts == before  # neither binding nor planning ran again
        q2, k2, v2 = _qkv(96)  # another signature: its own launcher (its first call, the last call's shape but for
        for _ in range(3):     # its keys, is read as pages (``cache_pages``); the two after it bind it)
            attn(q2, k2, v2)
        assert _bound_launchers(attn) == 2
        assert counts["prepare"] > before["prepare"]


@pytest.mark.parametrize("spec", ["sliding", "causal"])
def test_replayed_calls_follow_their_tensors(spec):
    attn = _sliding() if spec == "sliding" else attnc.compile_attention(CAUSAL, backend="triton")
    ref = attnc.compile_attention(attn.pattern, backend="reference")
    q, k, v = _qkv(80)
    with torch.inference_mode():
        attn(q, k, v)
        attn(q, k, v)  # the signature's second call binds its launcher
        assert _bound_launchers(attn) == 1
        out, lse = attn(q, k, v, return_lse=True)
        want, want_lse = ref(q, k, v, return_lse=True)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
        cold, cold_lse = attn(q, k, v, return_lse=True, layout="bhnd")  # a layout named: the ordinary path
        assert torch.equal(out, cold) and torch.equal(lse, cold_lse)
        q2, k2, v2 = _qkv(80, 1)  # new values, in place and in new tensors, under the bound launcher
        k.copy_(k2)
        got = attn(q, k, v)
        torch.testing.assert_close(got, ref(q, k, v), atol=2e-5, rtol=2e-5)
        assert not torch.equal(got, out)
        got = attn(q2, k2, v2)
        torch.testing.assert_close(got, ref(q2, k2, v2), atol=2e-5, rtol=2e-5)
        assert _bound_launchers(attn) == 1


def test_replay_launches_as_the_ordinary_path(monkeypatch):
    """The kernels, grids and constexprs a replay launches are the ordinary call's, its tensors the call's own."""
    attn = _sliding()
    q, k, v = _qkv(80)
    seen: list = []
    monkeypatch.setattr(KL, "launch_kernel", lambda launch, kernel, grid, args, meta, *, backward: seen.append(
        (kernel, grid, dict(meta), [a for a in leaves(args) if isinstance(a, torch.Tensor)])))
    with torch.inference_mode():
        attn(q, k, v)
        attn(q, k, v)
        seen.clear()
        attn(q, k, v, layout="bhnd")
        cold = list(seen)
        seen.clear()
        q2, k2, v2 = _qkv(80, 3)
        attn(q2, k2, v2)
    assert [(c[0], c[1], c[2]) for c in seen] == [(c[0], c[1], c[2]) for c in cold]
    main = seen[0][3]
    assert main[0] is q2 and main[1] is k2 and main[2] is v2
    assert all(a is not b for a, b in zip(main[3:5], cold[0][3][3:5], strict=True))  # fresh outputs per call


def test_calls_not_replayed(monkeypatch):
    """A call that records a gradient, and a pattern whose launches read call-time inputs, take the ordinary
    path at every call."""
    _no_launches(monkeypatch)
    attn = _sliding()
    q, k, v = _qkv(80)
    q.requires_grad_()
    for _ in range(3):
        attn(q, k, v)
    assert len(attn._warm) == 0
    doc = attnc.compile_attention("stdlib:document", backend="triton")
    assert doc._warm is None
    assert attnc.compile_attention(CAUSAL, backend="cpu")._warm is None
