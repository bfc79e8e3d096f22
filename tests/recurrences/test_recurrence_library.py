"""The recurrence families' kernels and the library they share (``runtime/recurrences/library``): a kernel jitted
for the GPU resolves every helper it calls, directly or through another helper, among its family's jitted helpers
(``library.host.jit_table`` jits ``_HELPERS`` over the family's namespace). A helper left out runs fine in the
interpreter and fails only when compiled for a GPU, so this is checked here, on the source."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

pytest.importorskip("triton")

FAMILIES = ["decay.triton", "delta.triton", "delta.triton_kda", "titans.triton"]


def _called_functions(fn, namespace: dict) -> set[str]:
    """The names of the recurrence package's functions that ``fn`` calls by a bare name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    called = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            target = namespace.get(node.func.id)
            if inspect.isfunction(target) and target.__module__.startswith("attnc.runtime.recurrences."):
                called.add(node.func.id)
    return called


@pytest.mark.parametrize("family", FAMILIES)
def test_every_helper_a_kernel_calls_is_jitted_with_it(family):
    module = importlib.import_module(f"attnc.runtime.recurrences.{family}")
    listed = {fn.__name__ for fn in module._HELPERS + module._KERNELS}
    missing = {}
    for fn in module._HELPERS + module._KERNELS:
        # a library helper resolves its calls in the family's namespace once jitted: the family must hold them
        namespace = vars(module)
        for name in _called_functions(fn, {**vars(inspect.getmodule(fn)), **namespace}):
            if name not in listed or name not in namespace:
                missing.setdefault(fn.__name__, []).append(name)
    assert not missing, f"{family}: helpers called but not jitted with the kernels: {missing}"


def test_the_check_sees_a_helper_left_out(monkeypatch):
    """The test above fails when a helper a library function calls is missing from a family's list."""
    module = importlib.import_module("attnc.runtime.recurrences.delta.triton")
    monkeypatch.setattr(module, "_HELPERS", tuple(fn for fn in module._HELPERS if fn.__name__ != "state_tiles_t"))
    with pytest.raises(AssertionError, match="state_tiles_t"):
        test_every_helper_a_kernel_calls_is_jitted_with_it("delta.triton")


def test_the_delta_rules_node_keeps_no_final_state_its_backward_does_not_read():
    """The delta rule's backward recomputes every state: its node does not keep the final one, so a caller may
    change that state in place (a cache updated in place) before the backward; the gradients are unchanged."""
    import torch

    from attnc.runtime.recurrences.delta import triton as delta_triton

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    beta = torch.rand(1, 2, 10, dtype=torch.float64, generator=g, requires_grad=True)
    grads = []
    for in_place in (False, True):
        out, final = delta_triton.run(q, k, v, None, beta, 0.5, None, 16)
        if in_place:
            final.zero_()
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v, beta)))
    for plain, changed in zip(*grads, strict=True):
        torch.testing.assert_close(changed, plain, rtol=0, atol=0)
