"""Generated kernels take what they read, by name (``compiler.codegen.triton.signature``): every kernel of every
stdlib softmax pattern's module (the whole sequence's, and a block's after a KV cache, with the grouped and paged
forwards) has at most 41 parameters, and its body reads each of them; the runtime binds each launch by name."""

from __future__ import annotations

import ast

import pytest
import torch
from test_triton import STDLIB

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.codegen.triton import signature as SG
from attnc.compiler.codegen.triton.source import ScheduleShape, generate_source
from attnc.compiler.cost.search import flat_view
from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton import runner as T

#: The most a kernel takes (the issue's kernels took 65-89): the block and paged modules of patterns with two score
#: inputs reach 41 with ``GRID_Y0``, the offset of a launch past CUDA's 65,535 on the grid's second axis
MOST_PARAMETERS = 41


def _kernels(text: str) -> dict[str, ast.FunctionDef]:
    return {f.name: f for f in ast.parse(text).body if isinstance(f, ast.FunctionDef) and f.name.startswith("attnc_")}


def _unread(fn: ast.FunctionDef) -> list[str]:
    """The parameters no statement of the body (past its docstring) reads."""
    body = ast.Module(body=fn.body[1:], type_ignores=[])
    loads = {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return [a.arg for a in fn.args.args if a.arg not in loads]


def _unopened_fields(fn: ast.FunctionDef) -> list[str]:
    """The fields of an opened group (``A, b = A``) that no later statement reads."""
    out = []
    for i, stmt in enumerate(fn.body):
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Tuple) and isinstance(stmt.value, ast.Name):
            rest = ast.Module(body=fn.body[i + 1:], type_ignores=[])
            loads = {n.id for n in ast.walk(rest) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            out += [t.id for t in stmt.targets[0].elts if t.id not in loads]
    return out


def _module(name: str, block: bool) -> str:
    """The kernel module of a stdlib case of ``test_triton.STDLIB``: the whole sequence's, or (``block``) the module of
    a block of its last rows after the rest as a KV cache (every block of these tiles shares it)."""
    case = STDLIB[name]
    params, sizes, n, tile = case.params, case.sizes, case.n, case.tiles
    pat = attnc.load(f"stdlib:{name}", **params)
    if not block:
        return T.emit(pat, n=n, sizes=sizes, q_tile=tile, heads=2, dk=16)
    whole = E.bind_sizes(pat, n=n, nk=n, heads=2, sizes=sizes, dk=16)
    if pat.queries.kind == "grid":  # a grid's block is a run of its flat token order
        pat, whole = flat_view(pat, whole)
    total = whole.n
    bound = E.block_bound(whole, total - 3, 3, 0, total)
    config = T.default_config(pat, bound, None, None, device=torch.device("cpu"))
    q_ext, kv_ext = T.schedule_extents(pat, bound, config)
    return generate_source(pat, bound, ScheduleShape(q_ext, kv_ext, tuple(config.q_tile), tuple(config.kv_tile)),
                           config)


@pytest.mark.parametrize("block", [False, True], ids=["whole", "block"])
@pytest.mark.parametrize("name", sorted(STDLIB))
def test_every_kernel_takes_at_most_41_parameters_each_read(name, block):
    kernels = _kernels(_module(name, block))
    expected = {"attnc_fwd", "attnc_fwd_combine", "attnc_bwd_delta", "attnc_bwd_dq", "attnc_bwd_dkdv"}
    assert expected <= set(kernels)
    for kernel, fn in kernels.items():
        assert len(fn.args.args) <= MOST_PARAMETERS, (kernel, len(fn.args.args))
        assert _unread(fn) == [], kernel
        assert _unopened_fields(fn) == [], kernel


def test_a_block_module_has_the_grouped_and_paged_forwards():
    """The block test above covers the grouped and paged kernels (they exist only in a block's module)."""
    assert {"attnc_fwd_grouped", "attnc_fwd_paged"} <= set(_kernels(_module("sliding_window", True)))


def test_the_def_takes_only_what_the_body_reads():
    body = ["x = tl.load(A + i * sa_n)  # B is named in this comment only", 'tl.store(C, "D")']
    params = [SG.tensor("A", "sa_b", "sa_n"), SG.value("B"), SG.value("C"), SG.value("D"),
              *SG.constexprs("BLOCK", "FLAG = False")]
    assert [p.name for p in SG.taken(params, body)] == ["A", "C"]
    assert SG.opening(SG.taken(params, body))[1:] == ["A, sa_b, sa_n = A"]
    with pytest.raises(ValueError, match="given twice"):
        SG.taken([SG.value("A"), SG.value("A")], body)


def test_a_launch_binds_by_name_and_names_what_it_lacks():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, N, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
        X, sx = X
        tl.store(X + tl.arange(0, BLOCK) * sx, N, mask=FLAG)

    t = torch.zeros(4)
    args, meta = KL.bound_args(kernel, {"N": 3, "X": (t, 1), "UNUSED": 5}, {"BLOCK": 4, "OTHER": 1, "num_warps": 4})
    assert args[0] == (t, 1) and args[1] == 3 and len(args) == 2
    assert meta == {"BLOCK": 4, "num_warps": 4}
    with pytest.raises(RuntimeError, match=r"kernel takes \['N'\]"):
        KL.bound_args(kernel, {"X": (t, 1)}, {"BLOCK": 4})


def test_a_replay_puts_each_calls_tensors_at_their_places_in_the_groups(monkeypatch):
    """A bound launcher (``launcher.bind``) replays a launch whose groups hold buffers the forward allocates per call,
    at any place of a group: each replay's own buffers go where the recording's were, the kept values stay."""
    from attnc.runtime.backends.triton import forward as F
    from attnc.runtime.backends.triton import launcher as LN

    def kernel_fn(X, Y, Z):  # the parameters a launch is bound to by name
        pass

    class Kernel:
        fn = staticmethod(kernel_fn)

    class Step:  # a launch state: the launcher compares its type between the recordings
        pass

    kernel, step = Kernel(), Step()
    seen = []
    monkeypatch.setattr(KL, "launch_kernel", lambda launch, k, grid, args, meta, *, backward: seen.append(args))

    def run():
        out, lse = torch.empty(3), torch.empty(2)
        F.record_or_launch(step, kernel, (1,), {"X": (7, out, 2), "Y": (lse, 5), "Z": 4, "W": 0}, {}, backward=False)
        return out, lse

    launcher = LN.bind(run, (), interpret=True)
    assert launcher is not None
    for _ in range(2):
        out, lse = launcher()
        x, y, z = seen[-1]
        assert x[0] == 7 and x[1] is out and x[2] == 2  # a group's tensor at place 1, its other values kept
        assert y[0] is lse and y[1] == 5 and z == 4  # a tensor's group: the tensor first, its stride kept
    assert seen[-1][0][1] is not seen[-2][0][1]  # fresh buffers at every replay


def test_a_block_module_whose_bias_gradient_reads_its_own_input_parses():
    """A bias nonlinear in a float input: ``_bias_grads`` reads the input (its extents among its parameters) and adds
    to its gradient, clamped to the same extents; a block's module names each extent once (it named ``in0_n0`` twice,
    a syntax error found by the differential fuzz on a compiled KV-cache call)."""
    pat = attnc.load("pattern p\n  tokens seq\n  input u: float[n]\n  bias clamp(tanh(q), u[q] + q, q)\n")
    whole = E.bind_sizes(pat, n=19, nk=19, heads=2, sizes={}, dk=16)
    bound = E.block_bound(whole, 18, 1, 0, 19)
    config = T.default_config(pat, bound, None, None, device=torch.device("cpu"))
    q_ext, kv_ext = T.schedule_extents(pat, bound, config)
    text = generate_source(pat, bound, ScheduleShape(q_ext, kv_ext, tuple(config.q_tile), tuple(config.kv_tile)),
                           config)
    helpers = {f.name: f for f in ast.parse(text).body if isinstance(f, ast.FunctionDef)}
    grads = [a.arg for a in helpers["_bias_grads"].args.args]
    assert "in0_n0" in grads and "G0" in grads
    for fn in helpers.values():
        names = [a.arg for a in fn.args.args]
        assert len(names) == len(set(names)), fn.name
