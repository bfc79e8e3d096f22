"""Worker side of tests/distributed/test_cp_ulysses_recurrence.py: spawned gloo ranks run recurrences under Ulysses
(``ulysses_degree`` = the group's size) and USP (Ulysses inside, the chain across ring positions) and save
what the parent compares against one process. Cases and their whole tensors are built here from seeds,
so the parent and every rank build the same ones. The process group's timeout is short: a rank left
waiting in a collective the others skipped fails in seconds instead of hanging."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import run_cases

import attnc
from attnc.distributed import ContextParallel

#: seconds a collective waits before the process group gives up
COLLECTIVE_TIMEOUT = 30


def heads_of(case: dict) -> tuple[int, int, int]:
    """(q heads, k heads, v heads) of a case: k and v default to q's; ``Hv`` > H is grouped value
    attention (the delta rule's GVA)."""
    H = case["H"]
    Hkv = case.get("Hkv", H)
    return H, Hkv, case.get("Hv", Hkv)


def case_inputs(case: dict) -> dict:
    """The whole call-time inputs of a case (deterministic): log gates ``[Hs, n]`` ("gate") or
    ``[Hs, n, D]`` ("vgate"), the delta rule's rate ("beta"), with Hs the state's heads (v's under GVA);
    ``batched``: with a leading batch dimension."""
    H, _, Hv = heads_of(case)
    Hs, n, D = max(H, Hv), case["n"], case["D"]
    lead = (case["B"],) if case.get("batched") else ()
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, kind in case.get("inputs", {}).items():
        if kind == "gate":
            out[name] = F.logsigmoid(torch.randn(*lead, Hs, n, generator=g, dtype=torch.float64) + 2)
        elif kind == "vgate":
            out[name] = F.logsigmoid(torch.randn(*lead, Hs, n, D, generator=g, dtype=torch.float64) + 2)
        elif kind == "beta":  # small enough that random keys keep the delta rule's state bounded
            out[name] = 0.05 + 0.1 * torch.rand(*lead, Hs, n, generator=g, dtype=torch.float64)
    if "bad_gate" in case:  # one bad value in the last rank's part only (a refusal seen by one rank)
        t = out["g"]
        t[(..., 0, n - 2) if case["inputs"]["g"] == "gate" else (..., 0, n - 2, 1)] = case["bad_gate"]
    return out


def token_dim(case: dict, name: str) -> int:
    return -2 if case["inputs"][name] == "vgate" else -1


def case_tensors(case: dict):
    """Whole q, k, v and the output's gradient (deterministic)."""
    g = torch.Generator().manual_seed(case.get("seed", 0))
    B, n, D = case["B"], case["n"], case["D"]
    H, Hkv, Hv = heads_of(case)
    q = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hv, n, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, max(H, Hv), n, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def compile_case(case: dict, backend: str = "reference"):
    return attnc.compile_attention(case["spec"], backend=backend, **case.get("params", {}))


def run_case(case: dict, rank: int) -> dict:
    attn = compile_case(case, case.get("backend", "reference"))
    q, k, v, dout = case_tensors(case)
    cp = ContextParallel(attn, ulysses_degree=case["u"], kv=case.get("kv", "ring"))
    ql, kl, vl = (cp.shard(t).requires_grad_() for t in (q, k, v))
    shard_inputs = case.get("shard_inputs", True)
    il = {name: (cp.shard(t, dim=token_dim(case, name)) if shard_inputs else t).clone().requires_grad_()
          for name, t in case_inputs(case).items()}
    out = cp(ql, kl, vl, **il)
    out.backward(cp.shard(dout))
    result = {"out": cp.unshard(out), "dq": cp.unshard(ql.grad), "dk": cp.unshard(kl.grad),
              "dv": cp.unshard(vl.grad), "bytes": cp.last_comm_bytes, "dinputs": {}}
    for name, t in il.items():  # a part's gradient is its part of the whole's; a whole input's this rank's share
        if shard_inputs:
            result["dinputs"][name] = cp.unshard(t.grad, dim=token_dim(case, name))
        else:
            total = t.grad.detach().clone()
            dist.all_reduce(total)
            result["dinputs"][name] = total
    return result


def run_error_case(case: dict, rank: int) -> dict:
    """A call meant to fail: every rank reports its SpecError (or that it ran)."""
    try:
        return {"error": None, **run_case(case, rank)}
    except attnc.SpecError as err:
        return {"error": str(err), "where": err.where}


def worker(rank: int, world: int, port: int, cases: list, out_dir: str):
    run_cases(rank, world, port, cases, out_dir,
              lambda case, rank: (run_error_case if case.get("error") else run_case)(case, rank), COLLECTIVE_TIMEOUT)
