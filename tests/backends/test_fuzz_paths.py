"""Differential fuzzing of the paths a call takes: every backend, eagerly and under ``torch.compile``,
with a KV cache (queries after earlier keys), packed sequences (``cu_seqlens``), both layouts, and bad
inputs, against the reference backend (float64).

The patterns are ``test_fuzz_backends``' random ``.attn`` patterns (masks, biases, softcaps, FoX
decay, call-time inputs). Each example draws a path on top:

* ``backend``: cpu and flex in float64, triton in float32 under Triton's interpreter;
* ``compiled``: the module under ``torch.compile`` (``fullgraph=True`` for good inputs; AOTAutograd's
  eager backend: the traced graph and the custom ops' autograd formulas run, no code generation);
* ``shape``: the whole sequence; its last few queries after a KV cache of the earlier tokens; or the
  tokens packed as two sequences (``cu_seqlens``), each against the reference run alone;
* ``layout``: ``bhnd`` or ``bnhd`` (q, k, v and ``[heads, n]`` inputs transposed);
* ``bad``: none, a missing input, or an input of the wrong shape. (A NaN FoX gate is no error: NaN
  rows on every backend, spec/REFERENCE.md; the delta rule's bad gates are test_delta's.)

Either the call equals the reference (out, lse where the path gives it, and every gradient), or the
backend refuses with a SpecError, and then the SAME SpecError (message and argument) on the eager and
the compiled path: a check must not depend on the path a call takes. A bad input must be refused, with
the reference's own error where the reference refuses it.

CI runs a small fixed set (about a minute on two cores); ``ATTNC_FUZZ_EXAMPLES=300`` runs 300 random
examples per test (``ATTNC_FUZZ_SEED`` picks the seed). A failure prints the case and its path.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from hypothesis import assume, event, note
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from test_fuzz_backends import (
    TOL,
    Case,
    cases,
    close,
    folded_to_infinity,
    fuzz_settings,
    given,
    make_tensors,
    require,
    score_range,
)

import attnc


@dataclasses.dataclass(frozen=True)
class Path:
    backend: str
    compiled: bool
    shape: str  # "whole", "cache" or "packed"
    rows: int  # cache: the queries after the cache; packed: the first sequence's length
    layout: str
    bad: str | None


@st.composite
def paths(draw, case: Case, backends: list[str]) -> Path:
    backend = draw(st.sampled_from(backends))
    shape = "whole"
    if case.layout == "seq":
        # hypothesis leans to a list's first entries: the paths this fuzzer is for come first
        shape = draw(st.sampled_from(["cache", "packed", "whole"] if case.batch == 1 else ["cache", "whole"]))
    rows = 0
    if shape == "cache":
        rows = draw(st.integers(1, min(5, case.n - 1)))
    elif shape == "packed":
        rows = draw(st.integers(1, case.n - 1))
    bad = draw(st.sampled_from([None, "missing", None, "shape", None]))
    if bad == "missing" and not case.inputs:
        bad = None
    if bad == "shape" and not case.inputs:
        bad = None
    return Path(backend, draw(st.sampled_from([True, False])), shape, rows, draw(st.sampled_from(["bnhd", "bhnd"])),
                bad)


def _token_dims(typ: str) -> list[int]:
    return [i for i, d in enumerate(typ[typ.index("[") + 1:-1].split(",")) if d.strip() == "n"]


def _cut(case: Case, inputs: dict, a: int, b: int) -> dict:
    """The inputs of tokens a..b-1 (their ``n`` dimensions cut), as one sequence alone."""
    out = {}
    for name, t in inputs.items():
        lead = 1 if name in case.batched else 0
        for d in _token_dims(case.inputs[name]):
            t = t.narrow(lead + d, a, b - a)
        out[name] = t
    return out


def _to_layout(path: Path, case: Case, q, k, v, inputs: dict):
    if path.layout == "bhnd":
        return q, k, v, inputs
    moved = {}
    for name, t in inputs.items():
        dims = case.inputs[name][case.inputs[name].index("[") + 1:-1].split(",")
        lead = 1 if name in case.batched else 0
        heads_first = [d.strip() for d in dims[:2]] == ["heads", "n"]
        moved[name] = t.transpose(lead, lead + 1) if heads_first else t
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), moved


def _spoiled(path: Path, case: Case, inputs: dict) -> dict:
    """The bad input the path draws."""
    inputs = dict(inputs)
    name = sorted(inputs)[0] if inputs else None
    if path.bad == "missing":
        del inputs[name]
    elif path.bad == "shape":
        t = inputs[name]
        inputs[name] = torch.cat([t, t.narrow(-1, 0, 1)], dim=-1)  # one more entry along the last dimension
    return inputs


def _call(attn, path: Path, case: Case, q, k, v, inputs: dict, cu_seqlens=None):
    """out (and lse where the path returns one) of ``attn`` on the path's layout, back in bhnd."""
    q, k, v, inputs = _to_layout(path, case, q, k, v, inputs)
    kw = {"layout": path.layout, "sizes": case.sizes or None}
    if cu_seqlens is not None:
        out, lse = attn(q, k, v, cu_seqlens=cu_seqlens, return_lse=True, **kw, **inputs)
    else:
        out, lse = attn(q, k, v, return_lse=True, **kw, **inputs)
    if path.layout == "bnhd":  # q, k, v were flat [B, N, H, D]: so are the results
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    return out, lse


def _grads(out, lse, leaves, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + torch.where(torch.isfinite(lse), lse.double() * w_lse, 0.0).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves, grads, strict=True)]


def _reference(pat, case: Case, path: Path, qkv64, inputs64, seed: int):
    """The reference's out, lse and gradients of the path's call (per sequence alone when packed)."""
    ref = attnc.compile_attention(pat, backend="reference", sizes=case.sizes or None)
    qkv = [x.detach().clone().requires_grad_() for x in qkv64]
    inputs = {n: (t.detach().clone().requires_grad_() if t.is_floating_point() else t) for n, t in inputs64.items()}
    q, k, v = qkv
    if path.shape == "packed":
        pieces = [ref(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], return_lse=True, **_cut(case, inputs, a, b))
                  for a, b in ((0, path.rows), (path.rows, case.n))]
        out, lse = torch.cat([p[0] for p in pieces], dim=2), torch.cat([p[1] for p in pieces], dim=2)
    else:
        out, lse = ref(q, k, v, return_lse=True, sizes=case.sizes or None, **inputs)
    leaves = [*qkv, *(t for t in inputs.values() if t.requires_grad)]
    return out, lse, _grads(out, lse, leaves, seed)


def _event(text: str, record=event) -> None:
    """A line of hypothesis' statistics (--hypothesis-show-statistics) or, with ``record=note``, of a
    failure's report; nothing in a reproducer's run (outside a test)."""
    try:
        record(text)
    except InvalidArgument:
        pass


def _attempt(fn):
    try:
        return fn(), None
    except attnc.SpecError as err:
        return None, err


def run_path(case: Case, path: Path) -> None:
    """One case on one path: equal to the reference, or the same SpecError on the eager and compiled paths."""
    # huge parameters (scores past 1e300, 64-bit wrap-around) round differently per summation order:
    # test_fuzz_backends covers them on the whole sequence
    assume(not case.huge)
    try:
        pat = attnc.load(case.text, **case.params)
    except attnc.SpecError as err:
        assume(not folded_to_infinity(err))
        raise AssertionError(f"the checker refused a drawn pattern: {err}") from None
    qkv64, inputs64 = make_tensors(case)
    if path.shape == "cache":  # the last `rows` queries after a cache of the earlier tokens
        qkv64[0] = qkv64[0][:, :, case.n - path.rows:]
    S, _ = score_range(pat, case, make_tensors(case)[0], inputs64)
    if path.bad is not None:
        inputs64 = _spoiled(path, case, inputs64)
    dtype = torch.float32 if path.backend == "triton" else torch.float64
    qkv = [x.to(dtype).requires_grad_() for x in qkv64]
    inputs = {n: (t.to(dtype).requires_grad_() if t.is_floating_point() else t) for n, t in inputs64.items()}
    cu = torch.tensor([0, path.rows, case.n], dtype=torch.int32) if path.shape == "packed" else None

    def run(compiled: bool):
        torch._dynamo.reset()
        attn = attnc.compile_attention(pat, backend=path.backend, sizes=case.sizes or None)
        # fullgraph for good inputs; a bad one may be refused while dynamo traces (before the op), which
        # under fullgraph=True is dynamo's own "Observed exception" (docs/limits.md)
        call = torch.compile(attn, fullgraph=path.bad is None, backend="aot_eager") if compiled else attn
        out, lse = _call(call, path, case, *qkv, inputs, cu)
        leaves = [*qkv, *(t for t in inputs.values() if t.requires_grad)]
        return out, lse, _grads(out, lse, leaves, case.seed)

    eager, eager_err = _attempt(lambda: run(False))
    if path.compiled:
        compiled, compiled_err = _attempt(lambda: run(True))
        require((eager_err is None) == (compiled_err is None) and (eager_err is None or (
            (eager_err.message, eager_err.where) == (compiled_err.message, compiled_err.where))),
            f"eager and compiled differ: eager {eager_err or 'ran'}; compiled {compiled_err or 'ran'}")
    reference, reference_err = _attempt(lambda: _reference(pat, case, path, qkv64, inputs64, case.seed))
    _event(f"path: {path.backend}, {'compiled' if path.compiled else 'eager'}, {path.shape}, {path.layout}")
    _event(f"outcome: {'refused: ' + eager_err.message[:48] if eager_err else 'ran'}")
    if path.bad is not None:
        require(eager_err is not None, f"the bad input ({path.bad}) was not refused")
        if reference_err is not None and path.shape != "packed":
            require(eager_err.where == reference_err.where,
                    f"refused naming {eager_err.where!r}, the reference names {reference_err.where!r}: "
                    f"{eager_err} / {reference_err}")
        return
    if eager_err is not None:
        _event(f"{path.backend} refused: {eager_err}", note)
        if reference_err is not None:  # the call itself is bad (a window longer than a packed sequence):
            # the same refusal, maybe of another packed sequence (the sizes in it aside)
            require(re.sub(r"\d+", "N", eager_err.message) == re.sub(r"\d+", "N", reference_err.message),
                    f"refused otherwise than the reference: {eager_err} / {reference_err}")
        return  # else a backend's declared refusal, the same on both paths (above)
    require(reference_err is None, f"the reference refused a call {path.backend} ran: {reference_err}")
    tol, grow = TOL["cpu" if path.backend != "triton" else "triton"], 1.0 + min(S, 100.0) / 4
    results = [eager] + ([compiled] if path.compiled else [])
    names = ["q", "k", "v", *(n for n, t in inputs.items() if t.requires_grad)]
    for out, lse, grads in results:
        close("out", out, reference[0], tol["out"] * grow)
        close("lse", lse, reference[1], tol["out"] * grow)
        for name, a, b in zip(names, grads, reference[2], strict=True):
            close(f"grad {name}", a, b, tol["grad"] * grow)


def check_path(case: Case, path: Path) -> None:
    note(f"pattern:\n{case.text}\npath: {path}")
    try:
        run_path(case, path)
    except AssertionError as err:
        raise AssertionError(f"{path} differs from the reference on\n{case.text}\n{err}\nreproduce: "
                             f"python -c 'import sys; sys.path[:0] = [\"tests\", \"tests/backends\"]; import test_fuzz_paths as f; "
                             f"from test_fuzz_backends import Case; f.run_path({case!r}, f.{path!r})'") from err
    except Exception as err:
        if type(err).__module__.startswith("hypothesis"):
            raise
        raise AssertionError(f"{path} raised {type(err).__name__}: {err}\non\n{case.text}") from err


@fuzz_settings(ci_examples=14)
@given(case=cases(triton=False), data=st.data())
def test_fuzz_paths_cpu_and_flex(case, data):
    check_path(case, data.draw(paths(case, ["cpu", "flex"])))


@fuzz_settings(ci_examples=4)
@given(case=cases(triton=True), data=st.data())
def test_fuzz_paths_triton(case, data):
    check_path(case, data.draw(paths(case, ["triton"])))
