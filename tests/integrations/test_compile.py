"""torch.compile of models calling attnc modules (the ``attnc::tiled_attention``
custom op): fullgraph compilation, same outputs and gradients as eager."""

from __future__ import annotations

import math

import torch

import attnc
from attnc.runtime.ops import common as custom_op


class Model(torch.nn.Module):
    """A projection, a sliding-window attention and a document-masked one (int ids)."""

    def __init__(self, heads=2, dim=8):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.proj = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.local = attnc.compile_attention("stdlib:sliding_window", window=6, backend="cpu")
        self.docs = attnc.compile_attention("stdlib:document", backend="cpu", q_tile=8)

    def forward(self, x, doc):
        B, N, _ = x.shape
        q, k, v = (t.reshape(B, N, self.heads, self.dim).transpose(1, 2) for t in self.proj(x).chunk(3, -1))
        a = self.local(q, k, v)
        b, lse = self.docs(q, k, v, doc=doc, return_lse=True)
        return (a + b).transpose(1, 2).reshape(B, N, -1) + lse.transpose(1, 2).sum(-1, keepdim=True)


def _dense(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def test_compiled_model_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    doc = torch.sort(torch.randint(0, 3, (37,))).values.to(torch.int32)
    w = torch.randn(2, 37, 16, dtype=torch.float64)

    eager = model(x, doc)
    eager_grads = torch.autograd.grad((eager * w).sum(), [x, *model.parameters()])

    # an independent dense check of the eager model
    with torch.no_grad():
        q, k, v = (t.reshape(2, 37, 2, 8).transpose(1, 2) for t in model.proj(x).chunk(3, -1))
        idx = torch.arange(37)
        causal = idx[None] <= idx[:, None]
        a, _ = _dense(q, k, v, causal & (idx[:, None] - idx[None] < 6))
        b, lse = _dense(q, k, v, causal & (doc[:, None] == doc[None]))
        dense = (a + b).transpose(1, 2).reshape(2, 37, -1) + lse.transpose(1, 2).sum(-1, keepdim=True)
    assert (eager - dense).abs().max() < 1e-10

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x, doc)
        grads = torch.autograd.grad((out * w).sum(), [x, *model.parameters()])
        # another document layout with the same shapes: no recompilation needed, still exact
        doc2 = torch.sort(torch.randint(0, 5, (37,))).values.to(torch.int32)
        out2 = compiled(x, doc2)
    assert (out - eager).abs().max() < 1e-10
    for g, e in zip(grads, eager_grads, strict=True):
        assert (g - e).abs().max() < 1e-9
    assert (out2 - model(x, doc2)).abs().max() < 1e-10


def test_custom_op_registration_opcheck():
    """Schema, fake (meta) implementation and autograd registration, as torch checks them."""
    attn = attnc.compile_attention("stdlib:forgetting", backend="cpu", q_tile=4)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = (-torch.rand(2, 9, generator=gen, dtype=torch.float64)).requires_grad_()
    args = (q, k, v, [g], attn.runner.op_key, "g", "", 0.5)
    torch.library.opcheck(custom_op.tiled_attention, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse = custom_op.tiled_attention(*args)
    ref_out, ref_lse = attn(q, k, v, g=g, scale=0.5, return_lse=True)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    fake_mode = torch._subclasses.FakeTensorMode()
    with fake_mode:
        fq, fk, fv = (fake_mode.from_tensor(t) for t in (q, k, v))
        fo, fl = custom_op.tiled_attention(fq, fk, fv, [fake_mode.from_tensor(g)], attn.runner.op_key, "g", "", 0.5)
    assert fo.shape == out.shape and fo.dtype == out.dtype and fl.shape == lse.shape and fl.dtype == lse.dtype


def _chain_text(err: BaseException) -> str:
    """An exception's text and that of every exception it was raised from (what a traceback prints)."""
    texts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(texts)


def test_a_refused_argument_under_fullgraph_reaches_the_user_with_its_message():
    """Under ``torch.compile(fullgraph=True)`` an argument refused while dynamo traces the call comes back as torch's
    own error; attnc's message is in it (the error was built in a way dynamo could not trace, and the message was
    lost: "Attempted to call a super() attribute"). Eagerly the same call raises attnc's error itself."""
    attn = attnc.compile_attention("stdlib:sliding_window", window=4, backend="cpu")
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, layout="bogus"), fullgraph=True, backend="eager")
    try:
        compiled(q, k, v)
    except Exception as err:  # noqa: BLE001 (torch's own error type differs between versions)
        text = _chain_text(err)
    else:
        raise AssertionError("the bad layout was not refused under torch.compile")
    assert "unknown layout 'bogus'" in text, text
    assert "super()" not in text, text
    try:
        attn(q, k, v, layout="bogus")
    except attnc.SpecError as err:
        assert "unknown layout 'bogus'" in str(err) and "argument layout" in str(err)
    else:
        raise AssertionError("the bad layout was not refused eagerly")


def test_a_spec_error_keeps_its_text_through_pickling_and_args():
    """``SpecError``'s one argument is its rendered text: ``str``, ``args`` and a pickled copy (an error sent between
    ranks or processes) all read the same."""
    import pickle

    err = attnc.SpecError("bad value", where="argument x", hint="pass y")
    assert err.args == (str(err),) and str(err) == "argument x: error: bad value\n  hint: pass y"
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.where == "argument x" and copy.hint == "pass y"
