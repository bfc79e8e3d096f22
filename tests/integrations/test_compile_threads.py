"""Another thread's ``torch.compile`` does not send this thread's eager calls down the traced path: torch holds
``torch.compiler.is_compiling()`` True process-wide for a compile session, and an eager FlexAttention call made
while another thread compiled took the custom ops beside that compile (a heap corruption, two threads' first calls)."""

import threading

import pytest
import torch

import attnc
from attnc.runtime import compiling as C
from attnc.runtime import ops


def test_an_eager_call_during_another_threads_compile_session_runs_eagerly(monkeypatch):
    attn = attnc.compile_attention("stdlib:sliding_window", backend="cpu", window=4)
    q = torch.randn(1, 2, 16, 8)
    want = attn(q, q, q)

    def traced(*args, **kwargs):
        raise AssertionError("an eager call took the traced path")

    monkeypatch.setattr(ops, "traced_attention", traced)
    # what another thread's compile session does to the process (torch.compiler._compile_session_context)
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling() and not C.compiling()
    torch.testing.assert_close(attn(q, q, q), want, rtol=0, atol=0)


def test_a_compiled_call_still_traces_with_fullgraph_beside_an_eager_thread():
    attn = attnc.compile_attention("stdlib:sliding_window", backend="cpu", window=4)
    q = torch.randn(1, 2, 16, 8)
    want = attn(q, q, q)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: attn(x, x, x), fullgraph=True)
    results, errors = [], []

    def eager():
        try:
            for _ in range(5):
                results.append(attn(q, q, q))
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    thread = threading.Thread(target=eager)
    thread.start()
    out = compiled(q)
    thread.join()
    assert not errors
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    for got in results:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_flex_modules_first_calls_from_two_threads_equal_one_threads(grad):
    # the first calls compile Flex's kernel (or trace its dense implementation with fx) while the other thread's
    # planning set torch's thread count, which the running compiled kernel sized its buffers by: SIGABRT (heap
    # corruption) without gradients, fx's "CURRENT_PATCHER is None" with them
    attn = attnc.compile_attention("stdlib:sliding_window", window=5, backend="flex")
    ref = attnc.compile_attention("stdlib:sliding_window", window=5, backend="reference")
    g = torch.Generator().manual_seed(2)
    calls = [tuple(torch.randn(1, 2, 32, 16, generator=g).requires_grad_(grad) for _ in range(3)) for _ in range(4)]
    want = [ref(*t).detach() for t in calls]
    errors, wrong = [], []

    def worker():
        for _ in range(10):
            for i, t in enumerate(calls):
                try:
                    out = attn(*t)
                    if grad:
                        out.sum().backward()
                    if not torch.allclose(out.detach(), want[i], atol=1e-5, rtol=1e-5):
                        wrong.append(i)
                except Exception as err:  # noqa: BLE001 (reported below)
                    errors.append(f"{type(err).__name__}: {err}")

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests' one thread per worker would hide it: planning changes the count from 2 to 1
    try:
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    assert not errors and not wrong
