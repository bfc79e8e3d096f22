"""torch.compile(fullgraph=True) of a pattern with a ``scale E`` clause (issue 58, item 4): the scale of
every query row is evaluated by the custom op ``attnc::score_scale`` (sympy is not traceable), so the
call traces with no graph break, prefill and decode, and equals the eager call."""

from __future__ import annotations

import pytest
import torch

import attnc


@pytest.mark.parametrize("backend", ["cpu", "flex"])
def test_a_scale_clause_compiles_with_fullgraph_prefill_and_decode(backend):
    attn = attnc.compile_attention("stdlib:softplus", backend=backend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.nn.functional.normalize(torch.randn(1, 2, 16, 8, generator=g), dim=-1) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, scale=1.0), fullgraph=True)
    with torch.inference_mode():  # Flex's compiled CPU kernel is inference only
        for rows in (16, 1):  # prefill, then one query after a cache of 15 keys
            got = compiled(q[:, :, -rows:], k, v)
            want = attn(q[:, :, -rows:], k, v, scale=1.0)
            assert got.shape == (1, 2, rows, 8)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_compiled_scale_is_the_eager_one_and_its_errors_are_the_eager_ones():
    """The op's value is the eager path's (cached there, handed out as a copy), and a scale that is not
    finite is refused by the op at the call with the eager SpecError."""
    attn = attnc.compile_attention("pattern p\nmask causal\nscale log(q)\n", backend="cpu")
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: attn(q, q, q), fullgraph=True)
    with pytest.raises(attnc.SpecError, match="must be a finite number at every query") as err:
        compiled(q)
    assert err.value.where == "argument q"
    good = attnc.compile_attention("pattern p\nmask causal\nscale log(q + 2)\n", backend="cpu")
    compiled = torch.compile(lambda q: good(q, q, q), fullgraph=True)
    out = compiled(q)
    cached = good._score_scale(q, 8, {})
    torch.testing.assert_close(out, good(q, q, q), rtol=1e-12, atol=1e-12)
    assert compiled(q).data_ptr() != cached.data_ptr()
