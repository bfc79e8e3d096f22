"""Worker side of the context-parallel tests: spawned ranks (gloo) run a list of cases and save what
the parent compares against the single-process result. Cases and their tensors are built here from
seeds, so the parent and every rank build the same whole tensors."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import run_cases

import attnc
from attnc.distributed import ContextParallel

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"


def case_inputs(case: dict) -> dict:
    """The whole call-time inputs of a case (deterministic)."""
    n, H, D = case["n"], case["H"], case["D"]
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, kind in case.get("inputs", {}).items():
        if kind == "doc":
            out[name] = torch.tensor([0] * (n // 5) + [1] * (n // 2) + [2] * (n - n // 5 - n // 2))
        elif kind == "gate":  # log gates of a scalar-gated recurrence / FoX, [heads, n]
            out[name] = F.logsigmoid(torch.randn(H, n, generator=g, dtype=torch.float64) + 2)
        elif kind == "beta":  # the delta rule's rate, small enough that random keys keep the state bounded
            out[name] = 0.05 + 0.1 * torch.rand(H, n, generator=g, dtype=torch.float64)
        elif kind == "momentum":  # Titans' momentum eta, in (0, 1)
            out[name] = torch.sigmoid(torch.randn(H, n, generator=g, dtype=torch.float64) + 1)
        elif kind == "centroids":  # cluster(): [heads, clusters, dk], no token dimension (never sharded)
            out[name] = torch.randn(H, 3, D, generator=g, dtype=torch.float64)
        elif kind == "vgate":  # [heads, n, dk]
            out[name] = F.logsigmoid(torch.randn(H, n, D, generator=g, dtype=torch.float64) + 2)
        elif kind == "index":  # a token route's indexer vectors, [heads, n, 3]
            out[name] = torch.randn(H, n, 3, generator=g, dtype=torch.float64)
        elif kind == "lightning_q":  # DeepSeek's lightning indexer: qi [n, 2, 3], ki [n, 3], w [n, 2]
            out[name] = torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
        elif kind == "lightning_k":
            out[name] = torch.randn(n, 3, generator=g, dtype=torch.float64)
        elif kind == "lightning_w":
            out[name] = torch.randn(n, 2, generator=g, dtype=torch.float64)
        elif kind == "table":  # a relative-position bias table, [heads, 2n - 1], no token dimension
            out[name] = torch.randn(H, 2 * n - 1, generator=g, dtype=torch.float64)
        elif kind == "weight":  # a per-key bias, [n]
            out[name] = torch.randn(n, generator=g, dtype=torch.float64)
    return out


def token_dim(case: dict, name: str) -> int:
    """The token dimension of a case's input: [n], [heads, n] last; [heads, n, dk] and [heads, n, 3] the
    middle one; the lightning indexer's [n, ...] the first."""
    kind = case["inputs"][name]
    return 0 if kind.startswith("lightning") else 1 if kind in ("vgate", "index") else -1


def case_tensors(case: dict):
    g = torch.Generator().manual_seed(case.get("seed", 0))
    B, H, Hkv, n, D = case["B"], case["H"], case.get("Hkv", case["H"]), case["n"], case["D"]
    q = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def case_dlse(case: dict) -> torch.Tensor:
    """The gradient a case sends into the lse ``[B, H, n]`` (deterministic)."""
    g = torch.Generator().manual_seed(11)
    return torch.randn(case["B"], case["H"], case["n"], generator=g, dtype=torch.float64)


def compile_case(case: dict, backend: str = "reference"):
    spec = CAUSAL if case["spec"] == "causal" else case["spec"]
    return attnc.compile_attention(spec, sizes=case.get("sizes"), backend=backend, **case.get("params", {}))


def run_case(case: dict, rank: int):
    attn = compile_case(case, case.get("backend", "reference"))
    q, k, v, dout = (t.to(case.get("dtype", torch.float64)) for t in case_tensors(case))
    inputs = case_inputs(case)
    cp = ContextParallel(attn, ulysses_degree=case.get("u", 1), kv=case.get("kv", "ring"))
    ql, kl, vl = (cp.shard(t).requires_grad_() for t in (q, k, v))
    grad_inputs = case.get("grad_inputs", False)
    il, sharded = {}, {}
    for name, t in inputs.items():
        sharded[name] = case.get("shard_inputs", True) and case["inputs"][name] not in ("centroids", "table")
        part = cp.shard(t, dim=token_dim(case, name)) if sharded[name] else t
        il[name] = part.clone().requires_grad_() if grad_inputs else part
    if case.get("lse"):  # the lse too, with a gradient of its own
        out, lse = cp(ql, kl, vl, return_lse=True, **il)
        torch.autograd.backward([out, lse], [cp.shard(dout), cp.shard(case_dlse(case))])
    else:
        out = cp(ql, kl, vl, **il)
        out.backward(cp.shard(dout))
    result = {"out": cp.unshard(out), "dq": cp.unshard(ql.grad), "dk": cp.unshard(kl.grad),
              "dv": cp.unshard(vl.grad), "bytes": cp.last_comm_bytes,
              "need": None if cp.last_plan is None else cp.last_plan.need,
              "zigzag": None if cp.last_plan is None else cp.last_plan.order.zigzag,
              "blocks": cp.last_blocks}
    if case.get("lse"):
        result["lse"] = cp.unshard(lse.detach())
    if grad_inputs:  # a part's gradient is its part of the whole's; a whole input's is this rank's share
        result["dinputs"] = {name: None if t.grad is None else cp.unshard(t.grad, dim=token_dim(case, name))
                             if sharded[name] else _summed(t.grad) for name, t in il.items()}
    return result


def _summed(t: torch.Tensor) -> torch.Tensor:
    total = t.detach().clone()
    dist.all_reduce(total)
    return total


WAN_LATENT = (2, 4, 4, 8, 6)  # [B, C, F, H, W]; patch (1, 2, 2) -> grid 4 x 4 x 3 = 48 tokens
WAN_PARAMS = {"kernel_size": (3, 3, 3)}


def wan_inputs():
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(WAN_LATENT, generator=g, dtype=torch.float64)
    text = torch.randn(WAN_LATENT[0], 5, 8, generator=g, dtype=torch.float64)
    return latent, torch.tensor([3, 500]), text


def run_wan(parallel: dict | None):
    """A tiny random Wan transformer with attnc's 3-D window, on one process or context parallel."""
    from diffusers import ContextParallelConfig
    from test_diffusers import _model

    from attnc.integrations import diffusers as attnc_diffusers

    model = _model()
    config = None if parallel is None else ContextParallelConfig(**{k: v for k, v in parallel.items() if k != "kv"})
    installed = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", parallel_config=config,
                                      kv=(parallel or {}).get("kv", "ring"), **WAN_PARAMS)
    latent, t, text = wan_inputs()
    with torch.no_grad():
        out = model(latent, t, text, return_dict=False)[0]
    bytes_sent = installed.parallel.last_comm_bytes if installed.parallel is not None else 0
    installed.remove()
    return {"out": out, "bytes": bytes_sent}


def run_cogvideox(parallel: dict | None):
    """A tiny random CogVideoX transformer (text + video tokens) with attnc's 3-D window, on one process or
    context parallel (the video tokens sharded, the text on every rank)."""
    from diffusers import ContextParallelConfig
    from test_diffusers import _cog_model, _cog_run

    from attnc.integrations import diffusers as attnc_diffusers

    model = _cog_model(frames=4)  # 4 frames: the grid is sharded along them
    config = None if parallel is None else ContextParallelConfig(
        **{k: v for k, v in parallel.items() if k not in ("kv", "train")})
    installed = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", parallel_config=config,
                                      kv=(parallel or {}).get("kv", "ring"), kernel_size=(2, 3, 3))
    if (parallel or {}).get("train"):  # a call recording gradients: refused on every rank
        g = torch.Generator().manual_seed(2)
        try:
            model(torch.randn(2, 4, 4, 8, 6, generator=g, dtype=torch.float64),
                  torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.tensor([3, 500]))
        except attnc.SpecError as err:
            return {"error": str(err)}
        return {"error": None}
    out = _cog_run(model, frames=4)
    bytes_sent = installed.parallel.last_comm_bytes if installed.parallel is not None else 0
    installed.remove()
    return {"out": out, "bytes": bytes_sent}


def run_error_case(case: dict, rank: int):
    """A call meant to fail: every rank reports its message (or that it did not fail)."""
    attn = compile_case(case)
    try:
        u = case.get("u_on_rank1", case.get("u", 1)) if rank == 1 else case.get("u", 1)
        cp = ContextParallel(attn, ulysses_degree=u, kv=case.get("kv", "ring"))
        B, H, D, n = case["B"], case["H"], case["D"], case["n"]
        local = n // dist.get_world_size() + (case.get("extra_on_rank1", 0) if rank == 1 else 0)
        t = torch.randn(B, H, local, D, dtype=torch.float64)
        cp(t, t, t, **case.get("call_kwargs", {}))
    except attnc.SpecError as err:
        return {"error": str(err)}
    return {"error": None}


def _run(case: dict, rank: int) -> dict:
    if "wan" in case:
        return run_wan(case["wan"])
    if "cogvideox" in case:
        return run_cogvideox(case["cogvideox"])
    return (run_error_case if case.get("error") else run_case)(case, rank)


def worker(rank: int, world: int, port: int, cases: list, out_dir: str):
    run_cases(rank, world, port, cases, out_dir, _run, timeout_s=60)
