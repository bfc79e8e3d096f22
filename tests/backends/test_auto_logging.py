"""``backend="auto"`` says what it does (issue 58, item 10): its choices go to the ``attnc.auto`` logger
(INFO where a module's backend changes and around a compile of Flex's kernel, DEBUG for every call),
the package's loggers print nothing unless configured (a ``NullHandler``), and ``Attention.warmup``
compiles before serving. Flex's kernel is not compiled here (tens of seconds): its call is replaced by
the executor's, which computes the same function."""

from __future__ import annotations

import logging

import pytest
import torch

import attnc
from attnc.runtime.auto import cpu as auto_cpu


@pytest.fixture
def attn(monkeypatch):
    module = attnc.compile_attention("stdlib:sliding_window", window=64, backend="auto")
    policy = module.runner
    calls = []

    def flex_forward(call, q, k, v):  # the executor's result, where Flex's compiled kernel would run
        calls.append(tuple(q.shape))
        return policy.cpu.forward(call, q, k, v)

    monkeypatch.setattr(policy.flex, "forward", flex_forward)
    monkeypatch.setattr(auto_cpu, "COMPILE_COST_S", 1e9)  # no compile until the test says so
    module.flex_calls = calls
    return module


def _messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == "attnc.auto" and r.levelno == level]


def test_the_package_logs_nothing_unless_configured():
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("attnc").handlers)
    assert auto_cpu.LOG.name == "attnc.auto"


def test_auto_logs_its_choice_its_switch_and_the_compile(attn, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="attnc")
    q = torch.randn(1, 2, 512, 32)
    with torch.inference_mode():
        attn(q, q, q)
        attn(q, q, q)
        assert attn.chosen_backend == "cpu" and not attn.flex_calls
        info, debug = _messages(caplog, logging.INFO), _messages(caplog, logging.DEBUG)
        assert len(info) == 1  # the first call: the first choice
        assert info[0].startswith("auto: 'sliding_window' q [1, 2, 512, 32] runs on 'cpu': Flex is modelled faster "
                                  "but its kernel for these shapes is not compiled yet")
        assert info[0].endswith(f"(modelled: cpu {1e3 * attn.last_choice.cpu_s:.3g} ms, flex "
                                f"{1e3 * attn.last_choice.flex_s:.3g} ms)")
        assert len(debug) == 1 and "runs on 'cpu'" in debug[0]  # the same backend again: DEBUG
        caplog.clear()
        monkeypatch.setattr(auto_cpu, "COMPILE_COST_S", 0.0)  # the break-even point reached
        out = attn(q, q, q)
    assert attn.chosen_backend == "flex" and attn.flex_calls == [(1, 2, 512, 32)]
    info = _messages(caplog, logging.INFO)
    assert len(info) == 2
    assert info[0].startswith("auto: 'sliding_window' q [1, 2, 512, 32] runs on 'flex' (was 'cpu'): the fused Flex "
                              "kernel is modelled faster; compiling it now")
    assert info[1].startswith("auto: 'sliding_window' compiled Flex's kernel in ")
    torch.testing.assert_close(out, attnc.compile_attention("stdlib:sliding_window", window=64,
                                                            backend="cpu")(q, q, q))


def test_nothing_is_formatted_below_the_logger_level(attn, caplog):
    caplog.set_level(logging.WARNING, logger="attnc")
    q = torch.randn(1, 2, 512, 32)
    with torch.inference_mode():
        attn(q, q, q)
    assert not [r for r in caplog.records if r.name.startswith("attnc")]


def test_warmup_compiles_before_serving_and_serving_then_runs_flex(attn, caplog):
    caplog.set_level(logging.INFO, logger="attnc")
    q = torch.randn(1, 2, 512, 32)
    with torch.inference_mode():
        assert attn.warmup(q, q, q) == "flex"
    assert attn.runner.compile_now is False  # only the warm-up call compiles at once
    info = _messages(caplog, logging.INFO)
    assert "compiling it now (warm-up)" in info[0] and "compiled Flex's kernel in" in info[1]
    assert attn.flex_calls == [(1, 2, 512, 32)]


def test_warmup_of_a_call_flex_cannot_serve_runs_the_executor(attn):
    q = torch.randn(1, 2, 512, 32, requires_grad=True)  # training: Flex's CPU kernel has no backward
    assert attn.warmup(q, q, q) == "cpu"
    assert "cannot serve this call" in attn.last_choice.reason and not attn.flex_calls
    assert attnc.compile_attention("stdlib:sliding_window", window=64, backend="cpu").warmup(q, q, q) == "cpu"
