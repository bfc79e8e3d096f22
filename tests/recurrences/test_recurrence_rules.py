"""Recurrence rules behind one interface: the language's table (``core.recurrence_rules``) and the runtime's
(``runtime.recurrences.rules``) name the same rules; nothing else branches on a rule's name; and a rule added
as its own module (registered, with its word in the language's table) serves compile, forward, backward, the
decoding step and ``.source`` with no other edit."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

import attnc
from attnc.core import recurrence_rules as language
from attnc.runtime.recurrences import rules

PACKAGE = pathlib.Path(attnc.__file__).parent


def test_the_language_and_the_runtime_name_the_same_rules():
    rec = attnc.load("stdlib:gated_delta_net")
    for word in language.RULES:
        rule = rules.rule_of(type(rec)(**{**rec.__dict__, "rule": word}))
        assert rule.name == word and rule.facts is language.RULES[word]
    assert set(rules._REGISTERED) == set(language.RULES)


def test_no_module_branches_on_a_rule_name():
    """``rule == "delta"`` was written in nine files: a rule's facts and code are looked up, not tested for."""
    pattern = re.compile(r"""rule\s*(==|!=)\s*["']|rule\s+in\s+\(["']""")
    hits = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("tests/", "benchmarks/", ".whl/")) or rel == "core/ir.py":  # ir: the cache key's history
            continue
        hits += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_an_unknown_rule_names_the_rules_and_the_closest():
    src = "recurrence r\n  tokens seq\n  input b: float[heads, n]\n  update detla(b)\n"
    with pytest.raises(attnc.SpecError) as err:
        attnc.load(src)
    assert ":4:" in str(err.value) and "unknown update rule 'detla'" in str(err.value) and "delta" in str(err.value)


def test_register_refuses_a_rule_the_language_does_not_know():
    facts = language.RuleFacts("nameless", "a rule", "S_t += 0", rates=("its rate",))
    with pytest.raises(ValueError, match="nameless"):
        rules.register(rules.RecurrenceRule(facts, *[None] * 6))


# ----------------------------------------------------------------- a rule added in one place
def _loop(q, k, v, g, beta, state, scale):
    outs = []
    for t in range(q.shape[2]):
        state = torch.exp(g[:, :, t])[..., None] * state + beta[:, :, t, None, None] * k[:, :, t, :, None] * \
            v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outs, 2), state


@pytest.fixture
def rated_rule(monkeypatch):
    """``update rated(beta)``: ``S_t = diag(exp(decay_t)) S_(t-1) + beta_t k_t^T v_t``, registered as a new
    rule's module would register it (its language entry and its implementation), nothing else touched."""
    from attnc.runtime.recurrences.common import gate_tensor

    facts = language.RuleFacts("rated", "the rated rule", "S_t += beta_t k_t^T v_t", rates=("the rated rule's rate",))

    def forward(rec, bound, q, k, v, tensors, scale, s0):
        B, H, T, Dk = q.shape
        g = gate_tensor(rec, bound, tensors, B, H, T, q.dtype, q.device)
        beta = tensors[rec.beta].to(q.dtype).expand(B, H, T)
        s0 = torch.zeros(B, H, Dk, v.shape[-1], dtype=q.dtype) if s0 is None else s0
        return _loop(q, k, v, g, beta, s0, scale)

    def step(rec, tensors, q_t, k_t, v_t, g_t, state, scale):
        beta = tensors[rec.beta].to(q_t.dtype).expand(*q_t.shape[:2], 1)
        out, new = _loop(q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], g_t[:, :, None], beta, state, scale)
        return out[:, :, 0], new

    rule = rules.RecurrenceRule(
        facts, prepare=lambda rec, q, k, v: (q, k), reference=forward,
        run=lambda backend, rec, bound, q, k, v, tensors, scale, s0, chunk, hw, native:
            (*forward(rec, bound, q, k, v, tensors, scale, s0), 1),
        step=step, describe=lambda rec, backend, chunk: f"# {backend}: {facts.update}\n",
        entering_map=None)
    monkeypatch.setitem(language.RULES, "rated", facts)
    monkeypatch.setitem(language.UPDATE_RULES, "rated", facts)
    rules.rule_of(attnc.load("stdlib:retention"))  # the built-in rules loaded first
    monkeypatch.setitem(rules._REGISTERED, "rated", rule)
    return rule


def test_a_rule_added_in_one_place_serves_every_path(rated_rule):
    src = ("recurrence rated_lm\n  tokens seq\n  input g: float[heads, n]\n  input b: float[heads, n]\n"
           "  decay g\n  update rated(b)\n")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(2, 9, generator=gen, dtype=torch.float64)
    b = torch.rand(2, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    attn = attnc.compile_attention(src, backend="cpu")
    assert attn.pattern.rule == "rated" and attn.pattern.beta == "b"
    out = attn(q, k, v, g=g, b=b)
    # the rule by hand: an undecayed rate-weighted sum of k^T v
    weights = torch.exp(torch.cumsum(g, -1)[:, :, None] - torch.cumsum(g, -1)[:, None, :]).tril() * b[:, None, :]
    want = 4 ** -0.5 * torch.einsum("hts,bhtk,bhsk,bhsv->bhtv", weights, q, k, v)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all()
    state = None
    for t in range(9):  # the decoding step, token by token, equals the sequence's rows
        o, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state, g=g[:, t:t + 1], b=b[:, t:t + 1].detach())
        torch.testing.assert_close(o, out[:, :, t].detach())
    assert "S_t += beta_t k_t^T v_t" in attn.source
