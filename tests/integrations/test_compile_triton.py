"""torch.compile(fullgraph=True) of a model calling backend="triton" modules: the
generated kernels run through the ``attnc::triton_attention`` custom op (here in
Triton's interpreter, on CPU tensors, at tiny sizes); outputs and gradients match
an independent dense computation and the eager call."""

from __future__ import annotations

import math

import torch

import attnc
from attnc.runtime.ops import common as custom_op


class Model(torch.nn.Module):
    def __init__(self, heads=2, dim=16):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.proj = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.local = attnc.compile_attention("stdlib:sliding_window", window=5, backend="triton")
        self.gated = attnc.compile_attention("stdlib:forgetting", backend="triton")

    def forward(self, x, g):
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, self.heads, self.dim).transpose(1, 2) for t in self.proj(x).chunk(3, -1))
        a = self.local(q, k, v)
        b, lse = self.gated(q, k, v, g=g, return_lse=True)
        return (a + b).transpose(1, 2).reshape(B, N, -1) + lse.transpose(1, 2).sum(-1, keepdim=True)


def _dense(q, k, v, allowed, bias=None):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, -math.inf)
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def _reference(model, x, g):
    """The model with both attentions computed densely in float64 (independent of attnc)."""
    B, N, _ = x.shape
    q, k, v = (t.reshape(B, N, 2, 16).transpose(1, 2) for t in model.proj(x).chunk(3, -1))
    idx = torch.arange(N)
    causal = idx[None] <= idx[:, None]
    a, _ = _dense(q, k, v, causal & (idx[:, None] - idx[None] < 5))
    cg = torch.cumsum(g.double(), -1)  # forgetting: bias = sum of log-gates over (k, q]
    b, lse = _dense(q, k, v, causal, (cg[:, :, None] - cg[:, None, :])[None])
    return (a + b).transpose(1, 2).reshape(B, N, -1) + lse.transpose(1, 2).sum(-1, keepdim=True)


def test_compiled_triton_model_matches_dense_forward_and_backward():
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(1, 20, 32, requires_grad=True)
    g = (-torch.rand(2, 20) * 0.5).requires_grad_()
    w = torch.randn(1, 20, 32)

    ref = _reference(model, x, g)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), [x, g, *model.parameters()])

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, g)
    grads = torch.autograd.grad((out * w).sum(), [x, g, *model.parameters()])
    assert (out.double() - ref).abs().max() < 1e-4
    for got, want in zip(grads, ref_grads, strict=True):
        assert (got.double() - want).abs().max() < 1e-3 * max(1.0, want.abs().max().item())

    eager = model(x, g)
    assert (out - eager).abs().max() < 1e-5


def test_triton_op_registration_opcheck():
    """Schema, fake (meta) implementation and autograd registration of attnc::triton_attention."""
    attn = attnc.compile_attention("stdlib:forgetting", backend="triton")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen, requires_grad=True) for _ in range(3))
    g = (-torch.rand(2, 9, generator=gen)).requires_grad_()
    args = (q, k, v, [g], attn.runner.op_key, "g", "", 0.25)
    torch.library.opcheck(custom_op.triton_attention, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse = custom_op.triton_attention(*args)
    ref_out, ref_lse = attn(q, k, v, g=g, scale=0.25, return_lse=True)  # eager: TritonAttention.apply
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    fake_mode = torch._subclasses.FakeTensorMode()
    with fake_mode:
        fq, fk, fv = (fake_mode.from_tensor(t) for t in (q, k, v))
        fo, fl = custom_op.triton_attention(fq, fk, fv, [fake_mode.from_tensor(g)], attn.runner.op_key, "g", "", 0.25)
    assert fo.shape == out.shape and fo.dtype == out.dtype and fl.shape == lse.shape and fl.dtype == lse.dtype
