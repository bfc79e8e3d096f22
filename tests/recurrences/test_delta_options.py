"""The delta rule's options: L2 normalisation of q and k (``update delta(beta, qk_l2norm = true)``, fla's
``use_qk_l2norm_in_kernel``) in the language, the IR and every backend (the naive reference, the chunked
form, the decoding step), against a loop written here from the rule with the normalisation explicit, in
float64, forward, final state and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_delta import F64, GATES, rate_and_gates  # noqa: E402

import attnc


def loop(q, k, v, g, beta, scale, s0):
    """The rule token by token, one (batch, head) at a time, out of place (differentiable): q, k, v
    ``[B, H, T, D]`` (one head each), g ``[B, H, T, Dk]`` log gates, beta ``[B, H, T]``."""
    B, H, T, _ = q.shape
    outs, states = [], []
    for b in range(B):
        for h in range(H):
            S, rows = s0[b, h], []
            for t in range(T):
                S = torch.exp(g[b, h, t])[:, None] * S
                kt = k[b, h, t]
                S = S + beta[b, h, t] * torch.outer(kt, v[b, h, t] - kt @ S)
                rows.append(scale * (q[b, h, t] @ S))
            outs.append(torch.stack(rows))
            states.append(S)
    return torch.stack(outs).view(B, H, T, -1), torch.stack(states).view(B, H, *s0.shape[2:])


def normalised(x):
    """fla's l2norm: x / sqrt(sum(x^2) + 1e-6) over the head dimension."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def case(name, B, H, T, Dk, Dv, seed, kv_heads=None):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or H
    q = 3 * torch.randn(
        B, H, T, Dk, generator=gen, dtype=F64
    )  # far from unit norm: the option matters
    k = 3 * torch.randn(B, kv_heads, T, Dk, generator=gen, dtype=F64)
    v = torch.randn(B, kv_heads, T, Dv, generator=gen, dtype=F64)
    inputs = rate_and_gates(name, H, T, Dk, gen)
    s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=F64)
    return q, k, v, inputs, s0


def full_gates(name, g, B, H, T, Dk):
    if GATES[name] is None:
        return torch.zeros(B, H, T, Dk, dtype=F64)
    return (g.unsqueeze(-1) if g.dim() == 2 else g).unsqueeze(0).expand(B, H, T, Dk)


def grads_of(out, state, leaves):
    weight = torch.sin(torch.arange(out.numel(), dtype=F64)).view_as(out)
    return torch.autograd.grad((out * weight).sum() + (state**2).sum(), leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(GATES))
def test_l2norm_equals_the_rule_on_normalised_q_and_k(name, backend):
    B, H, T, Dk, Dv = 2, 2, 19, 4, 3
    q, k, v, inputs, s0 = case(name, B, H, T, Dk, Dv, seed=11, kv_heads=1)  # GQA: one k/v head
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, *inputs.values())]
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, qk_l2norm=True, q_tile=16)
    named = dict(zip(inputs, leaves[4:], strict=True))
    out, state = attn(*leaves[:3], initial_state=leaves[3], return_state=True, scale=0.6, **named)
    got = grads_of(out, state, leaves)

    want_leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, *inputs.values())]
    wq, wk, wv, ws0, *wi = want_leaves
    g = full_gates(name, wi[1] if len(wi) > 1 else None, B, H, T, Dk)
    beta = wi[0].expand(B, H, T)
    want_out, want_state = loop(
        normalised(wq),
        normalised(wk).expand(B, H, T, Dk),
        wv.expand(B, H, T, Dv),
        g,
        beta,
        0.6,
        ws0,
    )
    want = grads_of(want_out, want_state, want_leaves)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # the option changes the result: without it the same inputs give another output
    plain = attnc.compile_attention(f"stdlib:{name}", backend=backend)(
        q, k, v, initial_state=s0, scale=0.6, **inputs
    )
    assert not torch.allclose(plain, want_out.detach(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list(GATES))
def test_l2norm_step_continues_a_prefix(name):
    q, k, v, inputs, _ = case(name, 1, 2, 12, 4, 3, seed=12)
    attn = attnc.compile_attention(f"stdlib:{name}", backend="cpu", qk_l2norm=True)
    full = attn(q, k, v, **inputs)
    part = {n: t[:, :8] for n, t in inputs.items()}
    _, state = attn(q[:, :, :8], k[:, :, :8], v[:, :, :8], return_state=True, **part)
    for t in range(8, 12):
        o, state = attn.step(
            q[:, :, t],
            k[:, :, t],
            v[:, :, t],
            state,
            **{n: x[:, t : t + 1] for n, x in inputs.items()},
        )
        torch.testing.assert_close(o, full[:, :, t], rtol=1e-12, atol=1e-12)
    # and the step normalises: unnormalised q, k through the step equal normalised ones without it
    plain = attnc.compile_attention(f"stdlib:{name}", backend="cpu")
    gates = {n: x[:, 8:9] for n, x in inputs.items()}
    a, _ = attn.step(q[:, :, 8], k[:, :, 8], v[:, :, 8], state, **gates)
    b, _ = plain.step(normalised(q[:, :, 8]), normalised(k[:, :, 8]), v[:, :, 8], state, **gates)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_l2norm_low_precision_matches_fla_rounding():
    """In bfloat16 q and k are normalised in float32 and rounded once to bfloat16 (fla's l2norm_fwd
    with its default output dtype), then the rule runs as on any bfloat16 input."""
    q, k, v, inputs, _ = case("gated_delta_net", 1, 2, 10, 8, 4, seed=13)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    inputs = {n: t.float() for n, t in inputs.items()}
    got = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu", qk_l2norm=True)(
        q, k, v, **inputs
    )
    qn, kn = (normalised(t.float()).to(torch.bfloat16) for t in (q, k))
    want = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")(qn, kn, v, **inputs)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_language_form_and_ir_key():
    src = "recurrence r\n  input beta: float[heads, n]\n  update delta(beta, qk_l2norm = true)\n"
    rec = attnc.load(src)
    assert (rec.rule, rec.beta, rec.qk_l2norm) == ("delta", "beta", True)
    assert not attnc.load(src.replace("true", "false")).qk_l2norm
    # the key of a recurrence without the option is the one it had before options existed
    old = "recurrence gated_delta_net\n  input g: float[heads, n]\n  input beta: float[heads, n]\n  decay g\n  update delta(beta)\n"
    assert attnc.load("stdlib:gated_delta_net").key() == attnc.load(old).key()
    assert attnc.load("stdlib:gated_delta_net", qk_l2norm=True).key() != attnc.load(old).key()
    assert attnc.load("stdlib:gated_delta_net", qk_l2norm=True).qk_l2norm


@pytest.mark.parametrize(
    ("clause", "message", "col"),
    [
        ("update delta(beta, qk_l2nrm = true)", "'delta' has no option 'qk_l2nrm'", 22),
        ("update delta(beta, qk_l2norm = 1)", "option qk_l2norm must be a bool, got an int", 34),
        ("update delta(beta, qk_l2norm = h == 0)", "must be a constant bool", 34),
        (
            "update delta(beta, qk_l2norm = true, qk_l2norm = false)",
            "'qk_l2norm' is given twice",
            40,
        ),
        ("update delta(beta, beta)", "'delta' takes one rate input \\(the delta rule's rate\\), got 2", 22),
        ("update delta(qk_l2norm = true)", "takes its rate inputs first, then options as keywords", 10),
    ],
)
def test_bad_options_name_file_line_and_column(tmp_path, clause, message, col):
    path = tmp_path / "bad.attn"
    path.write_text(f"recurrence r\n  input beta: float[heads, n]\n  {clause}\n")
    with pytest.raises(attnc.SpecError, match=message) as err:
        attnc.load(path)
    assert str(err.value).startswith(f"{path}:3:{col}: error:")
    from attnc import cli

    assert cli.main(["check", str(path)]) == 1


def test_cli_show_and_check_with_the_option(capsys):
    from attnc import cli

    assert cli.main(["show", "stdlib:gated_delta_net", "-p", "qk_l2norm=true"]) == 0
    assert "L2 norm" in capsys.readouterr().out
    assert cli.main(["show", "stdlib:gated_delta_net"]) == 0
    assert "L2 norm" not in capsys.readouterr().out
    assert cli.main(["show", "stdlib:gated_delta_net", "-p", "qk_l2norm=1"]) == 1
    err = capsys.readouterr().err
    assert "argument qk_l2norm" in err and "Traceback" not in err


# ----------------------------------------------------------------- grouped value attention (GVA)
def gva_case(name, B, H, HV, T, Dk, Dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, H, T, Dk, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, HV, T, Dv, generator=gen, dtype=F64)
    inputs = rate_and_gates(name, HV, T, Dk, gen)  # per value head
    s0 = torch.randn(B, HV, Dk, Dv, generator=gen, dtype=F64)
    return q, k, v, inputs, s0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(GATES))
def test_gva_equals_the_rule_with_q_and_k_repeated_per_value_head(name, backend):
    """v with HV = 3 H heads: value head j reads q/k head j // 3 (fla's GVA); beta, g and the state are
    per value head. Forward, final state and every gradient against the loop on repeated q and k."""
    B, H, HV, T, Dk, Dv = 2, 2, 6, 21, 4, 3
    q, k, v, inputs, s0 = gva_case(name, B, H, HV, T, Dk, Dv, seed=21)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, *inputs.values())]
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, q_tile=16)
    named = dict(zip(inputs, leaves[4:], strict=True))
    out, state = attn(*leaves[:3], initial_state=leaves[3], return_state=True, scale=0.8, **named)
    assert out.shape == (B, HV, T, Dv) and state.shape == (B, HV, Dk, Dv)
    got = grads_of(out, state, leaves)

    want_leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, *inputs.values())]
    wq, wk, wv, ws0, *wi = want_leaves
    heads = torch.arange(HV) // (HV // H)  # the q/k head of each value head
    g = full_gates(name, wi[1] if len(wi) > 1 else None, B, HV, T, Dk)
    want_out, want_state = loop(wq[:, heads], wk[:, heads], wv, g, wi[0].expand(B, HV, T), 0.8, ws0)
    want = grads_of(want_out, want_state, want_leaves)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(GATES))
def test_gva_step_continues_a_prefix_and_packed_sequences(name):
    q, k, v, inputs, _ = gva_case(name, 1, 2, 4, 12, 4, 3, seed=22)
    attn = attnc.compile_attention(f"stdlib:{name}", backend="cpu", qk_l2norm=True)
    full = attn(q, k, v, **inputs)
    part = {n: t[:, :8] for n, t in inputs.items()}
    _, state = attn(q[:, :, :8], k[:, :, :8], v[:, :, :8], return_state=True, **part)
    for t in range(8, 12):
        gates = {n: x[:, t : t + 1] for n, x in inputs.items()}
        o, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state, **gates)
        torch.testing.assert_close(o, full[:, :, t], rtol=1e-12, atol=1e-12)
    cu = torch.tensor([0, 5, 12])
    packed, states = attn(q, k, v, cu_seqlens=cu, return_state=True, **inputs)
    assert states.shape == (2, 4, 4, 3)
    for i, (a, b) in enumerate(((0, 5), (5, 12))):
        alone, s = attn(
            q[:, :, a:b],
            k[:, :, a:b],
            v[:, :, a:b],
            return_state=True,
            **{n: x[:, a:b] for n, x in inputs.items()},
        )
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(states[i], s[0], rtol=1e-12, atol=1e-12)


def test_gva_bad_heads_name_the_argument():
    q, k, v, inputs, s0 = gva_case("gated_delta_net", 1, 2, 6, 8, 4, 3, seed=23)
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    cases = [
        (dict(v=v[:, :5]), "argument v", "multiple of query/key heads"),
        (dict(k=k[:, :1]), "argument k", "k must have q's 2 heads"),
        (dict(beta=inputs["beta"][:2]), "argument beta", None),
        (dict(g=inputs["g"][:2]), "argument g", None),
        (dict(initial_state=s0[:, :2]), "argument initial_state", None),
    ]
    for change, where, text in cases:
        args = {"q": q, "k": k, "v": v, **inputs, **change}
        with pytest.raises(attnc.SpecError) as err:
            attn(args.pop("q"), args.pop("k"), args.pop("v"), **args)
        assert err.value.where == where, (change.keys(), err.value)
        if text:
            assert text in str(err.value)
    # the decay recurrences keep k and v heads equal, with a hint that names GVA
    with pytest.raises(attnc.SpecError, match="GVA") as err:
        attnc.compile_attention("stdlib:mamba2", backend="cpu")(q, k, v, g=inputs["g"])
    assert err.value.where == "argument v"
    # a step with v's heads: the state is per value head
    with pytest.raises(attnc.SpecError) as err:
        attn.step(
            q[:, :, 0],
            k[:, :, 0],
            v[:, :, 0],
            s0[:, :2],
            g=inputs["g"][:, :1],
            beta=inputs["beta"][:, :1],
        )
    assert err.value.where == "argument state"
    # context parallelism refuses GVA by name
    from attnc.runtime.parallel.recurrence import chained_recurrence

    with pytest.raises(attnc.SpecError, match="GVA") as err:
        chained_recurrence(attn, None, 0, 2, q, k, v, inputs, {}, 0.5)
    assert err.value.where == "argument v"


def test_gva_in_fla_layout_and_under_torch_compile():
    """layout='bnhd' (fla's [B, T, HV, V] and g/beta [B, T, HV]) and torch.compile (the custom op's
    output has v's heads) give the eager bhnd result."""
    q, k, v, inputs, _ = gva_case("gated_delta_net", 1, 2, 6, 10, 4, 3, seed=24)
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    want = attn(q, k, v, **inputs)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    fla = {n: x.T.unsqueeze(0) for n, x in inputs.items()}  # [1, T, HV]
    got = attn(t(q), t(k), t(v), layout="bnhd", **fla)
    torch.testing.assert_close(t(got), want, rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, g, beta: attn(q, k, v, g=g, beta=beta), fullgraph=True)
    out = compiled(q, k, v, inputs["g"], inputs["beta"])
    assert out.shape == (1, 6, 10, 3)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_options_reach_the_triton_path():
    """qk_l2norm and GVA are applied before any backend runs: the Triton kernels (the interpreter on
    CPU tensors) get them too."""
    pytest.importorskip("triton")
    q, k, v, inputs, s0 = gva_case("gated_delta_net", 1, 2, 4, 9, 16, 16, seed=25)
    q, k = 3 * q, 3 * k
    args = dict(initial_state=s0, return_state=True, **inputs)
    want = attnc.compile_attention("stdlib:gated_delta_net", backend="reference", qk_l2norm=True)(
        q, k, v, **args
    )
    got = attnc.compile_attention("stdlib:gated_delta_net", backend="triton", qk_l2norm=True)(
        q, k, v, **args
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- hard resets (gates of -inf)
@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("name", ["gated_delta_net", "kda"])
def test_hard_resets_are_exact_in_the_chunked_form(name, chunk):
    """Gates of -inf (the state, or a key channel's row of it, cleared before the token's update), at a
    chunk's first and last token, twice in a chunk and at t = 0: the chunked form equals the loop,
    outputs, final state and every gradient (0 for the -inf gates), with no NaN."""
    B, H, T, Dk, Dv = 1, 2, 40, 4, 3
    q, k, v, inputs, s0 = case(name, B, H, T, Dk, Dv, seed=31)
    k = F.normalize(k, dim=-1)
    g = inputs["g"].clone()
    for h, t in ((0, 0), (0, 3), (0, 18), (1, 16), (1, 17), (1, 31), (1, 39)):
        g[h, t] = -torch.inf
    if name == "kda":
        g[1, 5, 2] = -torch.inf  # one key channel only
    inputs["g"] = g
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, *inputs.values())]
    attn = attnc.compile_attention(f"stdlib:{name}", backend="cpu", q_tile=chunk)
    named = dict(zip(inputs, leaves[4:], strict=True))
    out, state = attn(*leaves[:3], initial_state=leaves[3], return_state=True, **named)
    got = grads_of(out, state, leaves)

    want_leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, *inputs.values())]
    wq, wk, wv, ws0, wbeta, wg = want_leaves
    want_out, want_state = loop(
        wq, wk, wv, full_gates(name, wg, B, H, T, Dk), wbeta.expand(B, H, T), Dk**-0.5, ws0
    )
    want = grads_of(want_out, want_state, want_leaves)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want, strict=True):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert (got[-1][torch.isneginf(g)] == 0).all()


def test_hard_resets_on_the_reference_and_the_triton_kernels():
    q, k, v, inputs, s0 = case("gated_delta_net", 1, 2, 20, 4, 3, seed=32)
    inputs["g"][0, 7] = -torch.inf
    args = dict(initial_state=s0, return_state=True, **inputs)
    ref = attnc.compile_attention("stdlib:gated_delta_net", backend="reference")(q, k, v, **args)
    cpu = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")(q, k, v, **args)
    for a, b in zip(cpu, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    pytest.importorskip("triton")  # the gradients: tests/recurrences/test_delta_triton.py
    got = attnc.compile_attention("stdlib:gated_delta_net", backend="triton", q_tile=16)(q, k, v, **args)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
