"""One check the stdlib pattern tests share: a backend's call against a float64 reference of the authors' code,
output and the gradient of every differentiated tensor (float32 on triton, float64 elsewhere)."""

from __future__ import annotations

import torch


def random_qkv(seed: int, n: int, heads: int = 2, kv_heads: int = 2, d: int = 8, batch: int = 2,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[batch, heads, n, d]``, k and v ``[batch, kv_heads, n, d]``, normal, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, d, generator=g, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, n, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def precision(backend: str) -> tuple[torch.dtype, dict]:
    """The dtype a backend's call runs in here and the tolerance of its agreement with a float64 reference."""
    if backend == "triton":
        return torch.float32, dict(rtol=2e-5, atol=2e-5)
    return torch.float64, dict(rtol=1e-12, atol=1e-12)


def assert_forward_backward(backend: str, call, reference, leaves: list[torch.Tensor], seed: int = 2) -> None:
    """``call(*leaves)`` (in the backend's dtype) against ``reference(*leaves)`` (float64): the output, then the
    gradients of every leaf under one random output gradient."""
    dtype, tol = precision(backend)
    ref = [x.detach().clone().requires_grad_() for x in leaves]
    mine = [x.detach().to(dtype).requires_grad_() for x in leaves]
    want = reference(*ref)
    out = call(*mine)
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    want.backward(grad)
    out.backward(grad.to(dtype))
    for i, (a, b) in enumerate(zip(mine, ref, strict=True)):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol, msg=lambda m, i=i: f"gradient of leaf {i}: {m}")
