"""A pattern's ``scale E`` clause at a call's queries (the seam: the values that multiply q before any backend runs,
apart from the module's call that folds them in): E evaluated at every (head, query), checked finite."""

from __future__ import annotations

import torch

from ..compiler.analysis import evaluate as E
from ..core.errors import SpecError

#: What to do about a scale that is not finite at some query.
HINT = "keep the scale finite (log(q + 1), not log(q))"


def evaluate(expr, env: dict, shape: tuple, device: torch.device) -> torch.Tensor:
    """``expr`` (the clause with the sizes put in, or some left to ``env``) at the symbols of ``env``, float64,
    broadcast to ``shape`` on ``device``."""
    value = E.Evaluator(env, {}, set(), None)(expr)
    if not isinstance(value, torch.Tensor):  # a constant: made where it is used
        return torch.full(shape, float(value), dtype=torch.float64, device=device)
    return torch.broadcast_to(value.to(torch.float64), shape)


def values(pattern, bound: E.Bound, Hq: int, Nq: int, device: torch.device) -> torch.Tensor:
    """``scale E`` at every (head, query row) of ``bound``, float64 ``[1, Hq, Nq, 1]`` on ``device``."""
    env = E.token_env(pattern, bound, torch.arange(Nq, device=device).view(1, 1, -1, 1),
                      torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=device),
                      torch.arange(Hq, device=device).view(1, -1, 1, 1))
    return evaluate(E.substitute(pattern.score_scale, bound), env, (1, Hq, Nq, 1), device)


def checked(pattern, bound: E.Bound, Hq: int, Nq: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, refused by name where one is not finite: checked on the host, made on ``device`` (a
    copy from the host would wait for the device's queue)."""
    host = values(pattern, bound, Hq, Nq, torch.device("cpu"))
    bad = (~torch.isfinite(host)).nonzero()
    if len(bad):
        h, row = int(bad[0, 1]), int(bad[0, 2])
        raise not_finite(pattern, f"is {float(host[bad[0].unbind()])} at query {row + bound.q_offset} (head {h})")
    made = host if device.type == "cpu" else values(pattern, bound, Hq, Nq, device)
    return made.to(dtype)


def not_finite(pattern, where_not: str) -> SpecError:
    """The error of a scale that ``where_not`` ("is -inf at query 0 (head 1)"): it names argument q."""
    return SpecError(f"the score scale of '{pattern.name}', {pattern.score_scale}, {where_not}: it must be a finite "
                     "number at every query", where="argument q", hint=HINT)
