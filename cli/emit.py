"""``attnc emit --arch A`` (and ``emit`` of a recurrence): the Triton kernels a CUDA call on ``sm_A``
launches, found by running the call's own launch path on CPU tensors with every launch recorded
instead of run (``runtime.gpu_check.record_call``, what ``attnc check-gpu`` compiles), so what is
printed is what a GPU would run, not a second description of it."""

from __future__ import annotations

import inspect

from ..core.errors import SpecError

#: The architecture whose launches a recurrence's ``emit`` records without ``--arch``: its kernels'
#: source does not depend on it (their launch parameters do, and are printed).
DEFAULT_RECURRENCE_ARCH = 90


def emit_recorded(args, pat, arch: int | None) -> int:
    from ..compiler.analysis.binding import kernel_head_dim
    from ..runtime import gpu_check as G
    from .args import CHECK_GPU_DEFAULT_N, int_sizes, tile_arg, tokens_of

    said_arch = arch
    arch = DEFAULT_RECURRENCE_ARCH if arch is None else arch
    if args.dtype not in G.DTYPES:
        raise SpecError(
            f"unknown dtype {args.dtype!r}", where="argument --dtype", hint="fp16, bf16 or fp32"
        )
    kernel_head_dim(args.head_dim, where="argument --head-dim")
    sizes = int_sizes(args.sizes, pat)
    n = tokens_of(args, pat, CHECK_GPU_DEFAULT_N) if not sizes else args.n
    config = _forced_config(
        pat, n, sizes, tile_arg(args.q_tile, "--q-tile"), tile_arg(args.kv_tile, "--kv-tile")
    )
    records, described = G.record_call(
        pat,
        arch=arch,
        head_dim=args.head_dim,
        dtype=args.dtype,
        n=n,
        sizes=sizes or None,
        config=config,
    )
    if not records:
        raise SpecError(f"'{pat.name}' launched no Triton kernel", where="argument FILE")
    where = (
        f"sm_{arch}"
        if said_arch is not None
        else f"sm_{arch} (a recurrence's kernels are the same on every architecture; --arch for another's "
        "launch parameters)"
    )
    print(
        f"# attnc emit: the Triton kernels a CUDA call of '{pat.name}' launches on {where}, recorded offline "
        f"({args.dtype}, head_dim {args.head_dim}"
        + (f", {n} tokens" if n is not None else "")
        + f"; forward, then backward): {described}"
    )
    for rec in records:
        meta = {k: rec.kwargs[k] for k in ("num_warps", "num_stages") if k in rec.kwargs}
        grid = rec.grid if not callable(rec.grid) else "computed at launch"
        branch = f"[{rec.branch}] " if rec.branch else ""
        print(
            f"#   launch {branch}{rec.name}: grid {grid}"
            + "".join(f", {k} {v}" for k, v in meta.items())
            + (f" ({rec.config})" if rec.config else "")
        )
    if args.ptx:
        done = set()
        for rec in records:
            kernel, _, _ = G.compile_launch(rec, arch)
            ptx = kernel.asm["ptx"]
            if ptx in done:
                continue
            done.add(ptx)
            print(f"\n# ---- PTX of {rec.name} for sm_{arch}")
            print(ptx.rstrip())
        return 0
    files: dict[str, list[str]] = {}
    for rec in records:
        raw = getattr(rec.fn, "fn", rec.fn)
        files.setdefault(inspect.getsourcefile(raw), []).append(rec.name)
    for path, names in files.items():
        print(f"\n# ---- {_shown_path(path)}: {', '.join(dict.fromkeys(names))}")
        with open(path, encoding="utf-8") as f:
            print(f.read().rstrip())
    return 0


def _shown_path(path: str) -> str:
    """attnc's own modules by their path in the package; a generated module by its file name."""
    import os

    import attnc

    root = os.path.dirname(os.path.abspath(attnc.__file__))
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else os.path.basename(full)


def _forced_config(pat, n, sizes, q_tile, kv_tile):
    """``--q-tile`` / ``--kv-tile`` as the launch's config (else the search's pick for the architecture)."""
    if q_tile is None and kv_tile is None:
        return None
    from ..compiler.analysis import evaluate as E
    from ..core import ir
    from ..runtime.backends.triton.runner import default_config

    if not isinstance(pat, ir.PatternIR):
        raise SpecError(
            f"'{pat.name}' is not one softmax pattern: its kernels' tiles are chosen for it",
            where="argument --q-tile" if q_tile is not None else "argument --kv-tile",
        )
    import torch

    bound = E.bind_sizes(pat, n=n, sizes=sizes or None)
    return default_config(pat, bound, q_tile, kv_tile, device=torch.device("cpu"))
