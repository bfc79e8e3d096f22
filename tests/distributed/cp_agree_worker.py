"""Worker side of tests/distributed/test_cp_agreement.py: spawned gloo ranks run one call meant to fail on one rank
only, or on ranks compiled differently, and save what each rank saw (its SpecError, or a crash). The
process group's timeout is short: a rank left waiting in a collective the others skipped fails in
seconds instead of hanging."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ranks import run_cases

import attnc
from attnc.distributed import ContextParallel

#: seconds a collective waits before the process group gives up (the hang the tests guard against)
COLLECTIVE_TIMEOUT = 20


def whole_inputs(case: dict) -> dict:
    """The whole call-time inputs of a case: log gates (``[H, n]`` or, for kda, ``[H, n, D]``) with the
    case's bad value at one position of the last rank's part, and the delta rule's rate."""
    H, n, D = case["H"], case["n"], case["D"]
    g = torch.Generator().manual_seed(3)
    out = {}
    if "gate" in case:
        shape = (H, n, D) if case["spec"] == "stdlib:kda" else (H, n)
        gate = F.logsigmoid(torch.randn(*shape, generator=g, dtype=torch.float64) + 2)
        gate[(1, n - 3) if len(shape) == 2 else (1, n - 3, 2)] = case["gate"]  # in the last rank's part only
        out["g"] = gate
        out["beta"] = 0.05 + 0.1 * torch.rand(H, n, generator=g, dtype=torch.float64)
    if "table" in case:  # a bias table shorter than the positions its bias reads at some ranks' queries
        out["t"] = torch.randn(case["table"], generator=g, dtype=torch.float64)
    return out


def run_case(case: dict, rank: int) -> dict:
    params = dict(case.get("params", {}))
    if rank == 1:
        params.update(case.get("params_on_rank1", {}))
    attn = attnc.compile_attention(case["spec"], backend=case.get("backend", "reference"), **params)
    g = torch.Generator().manual_seed(1)
    B, H, n, D = case["B"], case["H"], case["n"], case["D"]
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=case.get("dtype", torch.float64)) for _ in range(3))
    try:  # ranks compiled differently are refused when the module is made, or else at the call
        cp = ContextParallel(attn, kv=case.get("kv", "ring"))
        inputs = {name: t if name == "t" else cp.shard(t, dim=1 if t.dim() == 3 else -1)
                  for name, t in whole_inputs(case).items()}
        out = cp(cp.shard(q), cp.shard(k), cp.shard(v), **inputs)
    except attnc.SpecError as err:
        return {"error": str(err), "where": err.where}
    return {"error": None, "finite": bool(torch.isfinite(out).all())}


def worker(rank: int, world: int, port: int, cases: list, out_dir: str):
    run_cases(rank, world, port, cases, out_dir, run_case, COLLECTIVE_TIMEOUT)
