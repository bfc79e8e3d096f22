"""The deformable-attention recipe (docs/examples/deformable_attention.py, D2ST-Adapter's rule):
the module against an independent float64 computation (trilinear sampling by hand, softmax by einsum),
forward and the gradients of every weight, the offsets' included; SDPA and attnc's compiled
cross-attention give the same module."""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "docs", "examples"))
from deformable_attention import DeformableAttention3D  # noqa: E402


def trilinear(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``x`` ``[G, C, T, H, W]`` at ``points`` ``[G, M, 3]`` ((t, y, x) in [-1, 1], the corners' centres
    at -1 and 1), zero outside: ``[G, C, M]``. Written from the interpolation's definition."""
    G, C = x.shape[:2]
    sizes = x.shape[2:]
    pos = [(points[..., a] + 1) / 2 * (sizes[a] - 1) for a in range(3)]  # pixel units
    base = [p.floor() for p in pos]
    out = x.new_zeros(G, C, points.shape[1])
    for corner in itertools.product((0, 1), repeat=3):
        idx = [base[a] + corner[a] for a in range(3)]
        weight = torch.ones_like(pos[0])
        for a in range(3):
            weight = weight * (1 - (pos[a] - idx[a]).abs())
        inside = torch.ones_like(weight, dtype=torch.bool)
        for a in range(3):
            inside &= (idx[a] >= 0) & (idx[a] <= sizes[a] - 1)
        t, y, xx = (idx[a].clamp(0, sizes[a] - 1).long() for a in range(3))
        flat = (t * sizes[1] + y) * sizes[2] + xx  # [G, M]
        vals = x.reshape(G, C, -1).gather(2, flat[:, None, :].expand(G, C, -1))
        out = out + vals * (weight * inside)[:, None, :]
    return out


def naive(mod: DeformableAttention3D, x: torch.Tensor) -> torch.Tensor:
    """The module's rule step by step (D2ST-Adapter, models/base/adapter.py)."""
    B, C, T, H, W = x.shape
    g, h = mod.groups, mod.heads
    q = mod.proj_q(x)
    off = mod.offsets(q.reshape(B * g, C // g, T, H, W))  # [B g, 3, Tp, Hp, Wp]
    sizes = off.shape[2:]
    ref = torch.stack(torch.meshgrid(*[torch.linspace(0.5, s - 0.5, s, dtype=x.dtype) / s * 2 - 1 for s in sizes],
                                     indexing="ij"), dim=-1)
    reach = torch.tensor([min(1.0, mod.factor / s) for s in sizes], dtype=x.dtype)
    points = (ref + off.tanh().movedim(1, -1) * reach).reshape(B * g, -1, 3)
    sampled = trilinear(x.reshape(B * g, C // g, T, H, W), points).reshape(B, C, -1, 1, 1)
    k, v = mod.proj_k(sampled).reshape(B, h, C // h, -1), mod.proj_v(sampled).reshape(B, h, C // h, -1)
    qh = q.reshape(B, h, C // h, -1)
    p = torch.softmax(torch.einsum("bhcn,bhcm->bhnm", qh, k) * (C // h) ** -0.5, dim=-1)
    out = torch.einsum("bhnm,bhcm->bhcn", p, v).reshape(B, C, T, H, W)
    return mod.proj_out(out)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), heads_groups=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
       grid=st.sampled_from([((2, 3, 3), (2, 2, 2)), ((1, 4, 4), (1, 4, 4)), ((3, 2, 2), (1, 2, 3))]))
def test_the_module_equals_its_rule_in_float64_with_every_gradient(seed, heads_groups, grid):
    heads, groups = heads_groups
    torch.manual_seed(seed)
    mod = DeformableAttention3D(8, heads, groups, *grid, attention="attnc", backend="reference").double()
    with torch.no_grad():  # offsets large enough to move points across cells and past the border
        mod.offsets[-1].weight.mul_(20)
    x = torch.randn(2, 8, 4, 6, 5, dtype=torch.float64)
    got = mod(x)
    grads = torch.autograd.grad(got.square().sum(), list(mod.parameters()))
    want = naive(mod, x)
    want_grads = torch.autograd.grad(want.square().sum(), list(mod.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for (name, _), a, b in zip(mod.named_parameters(), grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    assert grads[0].abs().sum() > 0  # the offsets learn: the gradient reaches the offset network


def test_sdpa_and_the_compiled_cross_attention_give_the_same_module():
    torch.manual_seed(0)
    a = DeformableAttention3D(16, 4, 2, (2, 3, 3), (2, 3, 3))
    b = DeformableAttention3D(16, 4, 2, (2, 3, 3), (2, 3, 3), attention="attnc", backend="cpu")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 16, 4, 6, 6)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="heads"):
        DeformableAttention3D(10, 4, 1, 1, 1)
    with pytest.raises(ValueError, match="attention"):
        DeformableAttention3D(8, 2, 1, 1, 1, attention="flash")
