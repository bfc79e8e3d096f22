"""The simulator's cost entry for the delta rule (compiler/cost/recurrence_cost.py, ``delta_kernels``): FLOP and
byte counts against a count written here from the chunked WY form, the report through ``attnc.simulate``,
``Attention.report`` and ``attnc sim``, and the decay recurrences' entries untouched by it."""

from __future__ import annotations

import json

import pytest
import torch

import attnc
from attnc import cli
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.recurrence_cost import best_chunk, chunk_cost, delta_chunk_cost

VECTOR_OPS = 5  # elementwise ops per (t, s, channel) of a per-channel gate's C x C x D product


def product(gate, C, D):
    """FLOPs of one decayed C x C product over D channels: a dot plus the decay matrix, or elementwise."""
    return VECTOR_OPS * C * C * D if gate == "vector" else 2 * C * C * D + 3 * C * C


def expected_flops(gate, C, Dk, Dv):
    """Per chunk of one (batch, head), from the chunked WY form (fla's chunk_gated_delta_rule)."""
    NK, NV = -(-Dk // min(64, Dk)), -(-Dv // min(64, Dv))
    P = product(gate, C, Dk)
    inverse = (C**3 - C) / 3  # a unit lower-triangular C x C inverse
    forward = (
        P  # A = beta K K^T, decayed, strictly lower
        + inverse  # T = (I + A)^-1
        + 2 * C * C * Dk
        + 2 * C * C * Dv  # W = T beta K e^G, U = T beta V
        + 2 * C * Dk * Dv
        + 2 * C * Dk * Dv  # V' = U - W S; S += K^T V'
        + NV * P
        + 2 * C * Dk * Dv
        + 2 * C * C * Dv  # O = Q S + tril(Q K^T) V', Q K^T once per value block
    )
    backward = (
        2 * C * C * (Dk + Dv)
        + 4 * C * Dk * Dv  # W, U and the states recomputed
        + P
        + 2 * C * C * Dv  # dV' = tril(Q K^T)^T dO
        + 3 * 2 * C * Dk * Dv  # reverse state pass: K dS, Q^T dO, W^T dV''
        + NK * 2 * C * C * Dv
        + 2 * P
        + 3 * 2 * C * Dk * Dv  # dO V'^T per key block; dq, dk; dO S^T, V' dS^T, dV'' S^T
        + 2 * 2 * C * C * (Dk + Dv)
        + 2 * 2 * C**3
        + 2 * P  # dT, T^T dW, T^T dU; -T^T dT T^T; dk through K K^T
    )
    return forward, backward


def expected_bytes(gate, C, Dk, Dv, b):
    """Per chunk of one (batch, head): each kernel's reads and writes, by tensor."""
    NK, NV = -(-Dk // min(64, Dk)), -(-Dv // min(64, Dv))
    gw = {"head": 0, "scalar": 4, "vector": 4 * Dk}[gate]
    size = {
        "q": C * Dk * b,
        "k": C * Dk * b,
        "v": C * Dv * b,
        "beta": C * b,
        "g": C * gw,
        "A": C * C * 4,
        "T": C * C * b,
        "w": C * Dk * b,
        "u": C * Dv * b,
        "v'": C * Dv * b,
        "S": Dk * Dv * b,
        "o": C * Dv * b,
        "do": C * Dv * b,
        "dv'": C * Dv * b,
        "dv''": C * Dv * b,
        "dS": Dk * Dv * b,
        "dq": C * Dk * 4,
        "dk": C * Dk * 4,
        "dw": C * Dk * 4,
        "dg": C * gw,
        "dv": C * Dv * 4,
        "dbeta": C * 4,
    }
    wu = ["T", "k", "v", "beta", "g", "w", "u"]
    state = ["w", "k", "g"] * NV + ["u", "v'", "S"]
    forward = [
        ["k", "beta", "g", "A"],
        ["A", "T"],
        wu,
        state,
        ["q", "k", "g"] * NV + ["v'", "S", "o"],
    ]
    backward = [
        wu,
        state,
        ["q", "k", "g", "do", "dv'"],
        ["q", "k", "w", "g"] * NV + ["do", "dv'", "dv''", "dS"],
        ["v'", "do", "dv''"] * NK + ["q", "k", "S", "dS", "g", "dq", "dk", "dw", "dg"],
        ["k", "v", "beta", "g", "T", "dw", "dv''", "dk", "dv", "dbeta", "dg"],
    ]
    return (
        sum(size[t] for kern in forward for t in kern),
        sum(size[t] for kern in backward for t in kern),
    )


@pytest.mark.parametrize("gate", ["head", "scalar", "vector"])
@pytest.mark.parametrize(
    ("C", "Dk", "Dv", "nbytes"), [(16, 32, 32, 2), (32, 32, 128, 4), (64, 128, 64, 2)]
)
def test_counts_equal_the_chunked_wy_form(gate, C, Dk, Dv, nbytes):
    hw = get_hardware("h100")
    n, heads, batch = 5 * C - 3, 3, 2  # a partial last chunk counts as a whole one
    got = delta_chunk_cost(gate, n, heads, Dk, batch, C, hw, nbytes=nbytes, head_dim_v=Dv)
    chunks = batch * heads * 5
    f, b = expected_flops(gate, C, Dk, Dv)
    fb, bb = expected_bytes(gate, C, Dk, Dv, nbytes)
    assert got.forward_flops == pytest.approx(chunks * f, rel=1e-12)
    assert got.backward_flops == pytest.approx(chunks * b, rel=1e-12)
    assert got.forward_bytes == pytest.approx(chunks * fb, rel=1e-12)
    assert got.backward_bytes == pytest.approx(chunks * bb, rel=1e-12)
    assert 0 < got.forward_s < got.backward_s


def test_the_delta_rule_costs_more_than_the_decay_rule():
    hw = get_hardware("h100")
    for gate in ("head", "scalar", "vector"):
        delta = delta_chunk_cost(gate, 8192, 16, 128, 1, 64, hw)
        decay = chunk_cost(gate, 8192, 16, 128, 1, 64, hw)
        assert delta.forward_flops > decay.forward_flops and delta.forward_s > decay.forward_s
        assert delta.backward_s > decay.backward_s
        assert best_chunk(gate, 8192, 16, 128, 1, hw, rule="delta").chunk in (16, 32, 64)


@pytest.mark.parametrize(
    ("name", "gate"), [("delta_net", "head"), ("gated_delta_net", "scalar"), ("kda", "vector")]
)
def test_simulate_reports_the_delta_rule(name, gate):
    rep = attnc.simulate(f"stdlib:{name}", n=4096, heads=8, head_dim=64, hardware="h100")
    d = rep.to_dict()
    assert (d["kind"], d["gate"], d["rule"]) == ("recurrence", gate, "delta")
    want = delta_chunk_cost(gate, 4096, 8, 64, 1, d["chunk"], get_hardware("h100"))
    assert d["flops"] == {"forward": want.forward_flops, "backward": want.backward_flops}
    assert d["bytes"] == {"forward": want.forward_bytes, "backward": want.backward_bytes}
    best = min(d["candidates"], key=lambda c: (c["forward_s"] + c["backward_s"], c["chunk"]))
    assert best["chunk"] == d["chunk"]
    assert "the delta rule" in str(rep)
    forced = attnc.simulate(f"stdlib:{name}", n=4096, heads=8, head_dim=64, q_tile=16)
    assert forced["chunk"] == 16 and forced["chunk_forced"] is True


def test_decay_entries_are_unchanged():
    """The decay recurrences still report chunk_cost's figures (rule 'decay')."""
    hw = get_hardware("a100")
    for name, gate in (("retention", "head"), ("mamba2", "scalar"), ("gla", "vector")):
        d = attnc.simulate(
            f"stdlib:{name}", n=4096, heads=8, head_dim=64, hardware="a100"
        ).to_dict()
        want = chunk_cost(gate, 4096, 8, 64, 1, d["chunk"], hw)
        assert d["rule"] == "decay"
        assert d["flops"] == {"forward": want.forward_flops, "backward": want.backward_flops}
        assert d["predicted"]["forward_s"] == want.forward_s


def test_report_after_a_call():
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    q = torch.nn.functional.normalize(torch.randn(1, 2, 40, 8), dim=-1)
    attn(q, q, q, g=-torch.rand(2, 40), beta=torch.rand(2, 40))
    rep = attn.report(hardware="h100")
    assert (rep["n"], rep["heads"], rep["head_dim"], rep["rule"], rep["chunk"]) == (
        40,
        2,
        8,
        "delta",
        64,
    )


@pytest.mark.parametrize("name", ["delta_net", "gated_delta_net", "kda"])
def test_cli_sim_prints_the_prediction(name, capsys):
    assert (
        cli.main(["sim", f"stdlib:{name}", "--n", "8192", "--heads", "16", "--head-dim", "128"])
        == 0
    )
    out = capsys.readouterr().out
    rep = attnc.simulate(f"stdlib:{name}", n=8192, heads=16, head_dim=128)
    assert "the delta rule" in out and f"forward {rep['flops']['forward']:.3e}" in out
    assert "beats softmax from" in out and "predicted speedup" in out
    assert cli.main(["sim", f"stdlib:{name}", "--n", "2048", "--q-tile", "32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["chunk"] == 32 and d["rule"] == "delta"
    assert cli.main(["sim", f"stdlib:{name}", "--n", "2048", "--q-tile", "24"]) == 1
    err = capsys.readouterr().err
    assert "chunk size" in err and "Traceback" not in err
