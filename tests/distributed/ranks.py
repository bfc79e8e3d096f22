"""Running test cases on several gloo ranks (processes on this machine), for the context-parallel tests:
the parent spawns the ranks and never waits past a deadline; each rank runs the cases in order and saves
each case's result (or the traceback of what it raised) for the parent to read."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import interpreter_speed
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, cases, out_dir, timeout: float) -> None:
    """``worker(rank, world, port, cases, out_dir)`` on ``world`` ranks; the ranks are killed and the test
    fails if they have not finished within ``timeout`` seconds (a hang is a failure, never a stuck run)."""
    ctx = mp.start_processes(worker, args=(world, free_port(), cases, str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout} s")


def result(path) -> dict:
    """A rank's saved result, or ``{"crash": "no result"}`` where it saved none."""
    return torch.load(path, weights_only=False) if os.path.exists(path) else {"crash": "no result"}


def run_cases(rank: int, world: int, port: int, cases: list, out_dir: str, run, timeout_s: float) -> None:
    """The body of a rank: joins the gloo group (collectives time out after ``timeout_s``), then
    ``run(case, rank)`` for each case, saved as ``case{i}-rank{rank}.pt``; a case that raises saves its
    traceback and ends the run (the other ranks may be stuck in a collective this rank left)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    interpreter_speed.follow_the_environment()
    torch.set_num_threads(1)  # the ranks share the machine's cores: one thread each, as the test workers
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        for i, case in enumerate(cases):
            try:
                outcome = run(case, rank)
            except Exception:  # the parent reports it as the case's failure
                outcome = {"crash": traceback.format_exc()}
            torch.save(outcome, os.path.join(out_dir, f"case{i}-rank{rank}.pt"))
            if "crash" in outcome:
                break
    finally:
        dist.destroy_process_group()


def assert_context_parallel_refuses(spec: str, why: str, tmp_path) -> None:
    """Context parallelism refuses stdlib pattern ``spec`` by name, with ``why`` (a regex) in the message: its
    simulation (naming ``--ranks``) and ``ContextParallel`` on a one-rank gloo group (naming ``attn``)."""
    from attnc import compile_attention, load
    from attnc.core.errors import SpecError
    from attnc.distributed import ContextParallel
    from attnc.runtime.parallel.simulate import simulate_parallel

    with pytest.raises(SpecError, match=why) as info:
        simulate_parallel(load(spec), n=4096, ranks=2, single_device_s=1.0)
    assert info.value.where == "argument --ranks"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        with pytest.raises(SpecError, match="context parallelism does not run") as info:
            ContextParallel(compile_attention(spec, backend="reference"))
        assert info.value.where == "argument attn"
    finally:
        dist.destroy_process_group()
