"""Split-KV forward (flash decoding) on the Triton backend, under the interpreter: queries after a KV cache with
each program's KV tiles split over 1, 2, 3 and 7 programs (more splits than tiles too), their partials merged
by ``attnc_fwd_combine``, against the float64 reference; the split count the runner chooses
(``runtime.backends.triton.split_kv``, the decode model's rule) for a decode step and for a prefill; a call
that needs gradients keeps one program per Q tile."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.compiler.cost.decode_cost import split_kv
from attnc.core.errors import SpecError

pytest.importorskip("triton")

from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton import runner as TB  # noqa: E402
from attnc.runtime.backends.triton import split_kv as SK  # noqa: E402

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"
#: (name, spec, params, inputs): masks of every kind the forward's lists carry
PATTERNS = [
    ("causal", CAUSAL, {}, False),
    ("sliding_window", "stdlib:sliding_window", {"window": 100}, False),
    # routed: lists per (batch, head), made per call
    ("moba", "stdlib:moba", {"block": 32, "topk": 2}, False),
    ("alibi", "stdlib:alibi", {}, False),  # a bias
    ("document", "stdlib:document", {}, True),  # a mask reading an input
]
#: (queries, cache length, split counts forced): 1 query after 257 keys (at most 5 KV tiles of 64, the last
#: holding one key: 7 splits are more) and 3 after 130 (3 tiles)
CASES = [(1, 257, (2, 7)), (3, 130, (1, 3))]
#: grouped-query attention, 2 query heads on 1 K/V head: the interpreter's cost grows with the query heads
HEADS, KV_HEADS, D = 2, 1, 16
#: the forward kernels: one program per query head, or per K/V head with its group packed (a few rows after a cache)
FORWARDS = ("attnc_fwd", "attnc_fwd_grouped")


def qkv(nk: int, seed: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(batch, h, nk, D, generator=g, dtype=torch.float64)
        for h in (HEADS, KV_HEADS, KV_HEADS)
    )


def doc_ids(nk: int, batch: int = 2) -> torch.Tensor:
    """Document ids [batch, nk]: a few documents, the last query's starting late (rows reach few keys)."""
    g = torch.Generator().manual_seed(7)
    return torch.sort(torch.randint(0, 4, (batch, nk), generator=g)).values


def spy(monkeypatch) -> list[tuple[str, tuple]]:
    """Every Triton launch of the runner as (kernel name, grid)."""
    seen: list[tuple[str, tuple]] = []
    real = KL.launch_kernel

    def launch(launch, kernel, grid, args, meta, *, backward):
        seen.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, tuple(grid)))
        return real(launch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", launch)
    return seen


@pytest.mark.parametrize(
    ("name", "spec", "params", "with_doc"), PATTERNS, ids=[p[0] for p in PATTERNS]
)
def test_split_forward_equals_the_reference(monkeypatch, name, spec, params, with_doc):
    """1 and 3 queries after caches of 257 and 130 keys (``CASES``), 2 query heads on 1 K/V head, a batch of 2: out
    and lse equal the float64 reference's last rows at 1, 2, 3 and 7 forced splits, each launched with that many
    programs per Q tile and merged by one combine launch."""
    launched = spy(monkeypatch)
    ref = attnc.compile_attention(spec, backend="reference", **params)
    tri = attnc.compile_attention(spec, backend="triton", **params)
    for n, nk, counts in CASES:
        q, k, v = qkv(nk, seed=nk)
        extra = {"doc": doc_ids(nk)} if with_doc else {}
        want, want_lse = ref(q, k, v, return_lse=True, **extra)
        qf, kf, vf = (t.float() for t in (q[:, :, -n:], k, v))
        for splits in counts:
            monkeypatch.setattr(SK, "FORCE_SPLITS", splits)
            launched.clear()
            out, lse = tri(qf, kf, vf, return_lse=True, **extra)
            torch.testing.assert_close(out.double(), want[:, :, -n:], rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(lse.double(), want_lse[:, :, -n:], rtol=2e-5, atol=2e-5)
            forward = [grid for kernel, grid in launched if kernel in FORWARDS]
            combine = [grid for kernel, grid in launched if kernel == "attnc_fwd_combine"]
            if splits == 1:  # the kernel as before: two launch axes, no merge
                assert [len(g) for g in forward] == [2] and not combine, launched
            else:
                assert [g[2] for g in forward] == [splits] and len(combine) == 1, launched
                assert combine[0][1] == 2 * HEADS  # batch x query heads
                # a group's query heads packed in one program (attnc_fwd_grouped); a route's, one each
                assert forward[0][1] == 2 * (HEADS if name == "moba" else KV_HEADS)


def test_rows_without_any_key_stay_empty(monkeypatch):
    """Rows no split has a key for (odd positions) keep out = 0 and lse = -inf after the merge; a row reached by
    one split alone (the others' lse -inf) takes that split's partial as it is."""
    spec = "pattern gaps\n  tokens seq\n  mask causal and q - k > 150 and q % 2 == 0\n"
    q, k, v = qkv(200, seed=3, batch=1)
    want, want_lse = attnc.compile_attention(spec, backend="reference")(q, k, v, return_lse=True)
    monkeypatch.setattr(SK, "FORCE_SPLITS", 3)
    out, lse = attnc.compile_attention(spec, backend="triton")(
        *(t.float() for t in (q[:, :, -3:], k, v)), return_lse=True
    )
    assert torch.isneginf(want_lse[:, :, -3:]).any() and torch.isfinite(want_lse[:, :, -3:]).any()
    torch.testing.assert_close(out.double(), want[:, :, -3:], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse[:, :, -3:], rtol=2e-5, atol=2e-5)
    empty = torch.isneginf(lse)
    assert torch.equal(empty, torch.isneginf(want_lse[:, :, -3:])) and bool((out[empty] == 0).all())


def test_the_runner_chooses_splits_for_a_decode_step_and_none_for_a_prefill(monkeypatch):
    """The decode model's rule on the plan's lists and the interpreter's stand-in GPU (``CPU_SMS``, H100's 132
    SMs): one query against a causal cache of 640 keys (10 KV tiles, 2 programs) is split, as the rule says; a
    prefill of 128 queries is not (its first Q tile has one KV tile); both equal the reference."""
    launched = spy(monkeypatch)
    attn = attnc.compile_attention(CAUSAL, backend="triton")
    ref = attnc.compile_attention(CAUSAL, backend="reference")
    q, k, v = qkv(640, seed=1, batch=1)
    want, want_lse = ref(q, k, v, return_lse=True)
    out, lse = attn(*(t.float() for t in (q[:, :, -1:], k, v)), return_lse=True)
    torch.testing.assert_close(out.double(), want[:, :, -1:], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse[:, :, -1:], rtol=2e-5, atol=2e-5)
    grid = next(g for kernel, g in launched if kernel == "attnc_fwd_grouped")
    sched = attn.runner.last_schedule
    tiles = (sched.full_count + sched.partial_count).reshape(-1).tolist()
    assert tiles == [10] and KL.CPU_SMS == 132
    expected = split_kv(tiles, KV_HEADS, KL.CPU_SMS).splits  # a program per K/V head: its group packed
    assert expected > 1 and grid == (1, KV_HEADS, expected)
    launched.clear()
    q, k, v = qkv(128, seed=2, batch=1)
    out = attn(*(t.float() for t in (q, k, v)))
    torch.testing.assert_close(out.double(), ref(q, k, v), rtol=2e-5, atol=2e-5)
    assert [len(g) for kernel, g in launched if kernel == "attnc_fwd"] == [2] and len(launched) == 1


def test_a_call_that_needs_gradients_keeps_one_program_per_q_tile(monkeypatch):
    """With the split forced, a call whose tensors require gradients runs the unsplit forward (its backward
    reads the merged out and lse): the gradients of the last rows equal the reference's; the same call under
    ``torch.no_grad`` splits."""
    launched = spy(monkeypatch)
    monkeypatch.setattr(SK, "FORCE_SPLITS", 3)
    q, k, v = qkv(100, seed=4, batch=1)
    w = torch.randn(1, HEADS, 2, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def grads(backend: str) -> list[torch.Tensor]:
        leaves = [
            t.clone().requires_grad_()
            for t in ((q, k, v) if backend == "reference" else (q.float(), k.float(), v.float()))
        ]
        out = attnc.compile_attention(CAUSAL, backend=backend)(
            leaves[0][:, :, -2:], leaves[1], leaves[2]
        )
        (out.double() * w).sum().backward()
        return [t.grad.double() for t in leaves]

    for got, want in zip(grads("triton"), grads("reference"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert [len(g) for kernel, g in launched if kernel in FORWARDS] == [2]
    assert not [kernel for kernel, _ in launched if kernel == "attnc_fwd_combine"]
    launched.clear()
    with torch.no_grad():
        attnc.compile_attention(CAUSAL, backend="triton")(
            *(t.float().requires_grad_() for t in (q[:, :, -2:], k, v))
        )
    assert [g for kernel, g in launched if kernel in FORWARDS] == [(1, KV_HEADS, 3)]  # the group in one program


def test_choose_splits_is_the_decode_rule(monkeypatch):
    """``choose_splits`` applies ``decode_cost.split_kv`` to each list class's tiles, each class standing for the
    programs that read it; a launch of a program per SM or more keeps one split without asking; a bad forced
    count names the switch."""
    pat = attnc.load(CAUSAL)
    from attnc.compiler.analysis import evaluate as E
    from attnc.compiler.analysis.tiles import classify_tiles
    from attnc.runtime.plan import tile_plan

    whole = E.bind_sizes(pat, n=2000, nk=2000, heads=8)
    bound = E.block_bound(whole, 1990, 10, 0, 2000)
    plan = tile_plan.Plan.build(pat, bound, classify_tiles(pat, bound, (10,), (64,), None))
    assert (plan.schedule.full_count + plan.schedule.partial_count).tolist() == [[32]]
    for batch, sms in ((1, 132), (2, 132), (4, 108), (16, 132)):
        programs = batch * 8
        want = 1 if programs >= sms else split_kv([32], programs, sms).splits
        assert SK.choose_splits(plan, batch, 8, sms) == want
    assert SK.choose_splits(plan, 1, 8, 132) > 1 and SK.choose_splits(plan, 16, 8, 132) == 1
    # the merge's rows per program: what the rows need (a power of two, 16 at least), 8K elements at most
    assert [SK.combine_rows(64, r) for r in (1, 16, 17, 100)] == [16, 16, 32, 64]
    assert SK.combine_rows(512, 100) == 16
    for bad in (0, -1, 2.0, True):
        monkeypatch.setattr(SK, "FORCE_SPLITS", bad)
        with pytest.raises(SpecError, match="FORCE_SPLITS") as err:
            SK.choose_splits(plan, 1, 8, 132)
        assert err.value.where == "argument FORCE_SPLITS"


def test_the_split_code_is_a_constexpr_branch():
    """The generated forward holds the split under ``SPLIT_KV`` (off by default) and the module its merge kernel;
    the dQ kernel's loops are not split."""
    src = TB.emit(attnc.load(CAUSAL), n=256, heads=2)
    fwd = src[src.index("def attnc_fwd(") : src.index("def attnc_fwd_combine(")]
    assert (
        "SPLIT_KV: tl.constexpr = False" in fwd and fwd.count("if SPLIT_KV:") == 4
    )  # axis, two lists, stores
    dq = src[src.index("def attnc_bwd_dq(") : src.index("def attnc_bwd_dkdv(")]
    assert "SPLIT_KV" not in dq and "j_lo" not in dq


def test_a_split_forward_runs_the_two_loops_on_descriptors(monkeypatch):
    """A config that warp-specializes the forward on Hopper (one loop over both lists, ``ONE_LOOP``, on descriptors
    the kernel makes) is launched split as the two loops on the host's descriptors (``DESC``): there is no share
    of the one loop. 70 tokens in tiles of 16 (the last one part-filled), 4 query heads on 2 K/V heads, against
    the reference; unsplit, the same call runs the one loop."""
    from attnc.compiler.cost.model import KernelConfig

    launched: list[dict] = []
    real = KL.launch_kernel

    def launch(launch, kernel, grid, args, meta, *, backward):
        keys = ("ONE_LOOP", "WARP_SPEC", "DESC", "SPLIT_KV")
        launched.append({"grid": tuple(grid), **{k: meta.get(k) for k in keys}})
        return real(launch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", launch)
    monkeypatch.setattr(KL, "CPU_ARCH", "sm90")
    cfg = KernelConfig((16,), (16,), "flat", tma=True, warp_specialize=True)
    hook = staticmethod(lambda pat, bound, q, inputs, kv_heads: cfg)
    monkeypatch.setattr(TB.TritonRunner, "config_hook", hook)
    spec = "pattern window\n  tokens seq\n  mask causal and q - k < 40\n"
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 70, D, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    want, want_lse = attnc.compile_attention(spec, backend="reference")(q, k, v, return_lse=True)
    for splits, expect in ((1, (True, True, False, None)), (3, (None, None, True, True))):
        monkeypatch.setattr(SK, "FORCE_SPLITS", splits)
        launched.clear()
        out, lse = attnc.compile_attention(spec, backend="triton")(
            *(t.float() for t in (q, k, v)), return_lse=True
        )
        torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse.double(), want_lse, rtol=2e-5, atol=2e-5)
        fwd = launched[0]
        assert (fwd["ONE_LOOP"], fwd["WARP_SPEC"], fwd["DESC"], fwd["SPLIT_KV"]) == expect, launched
        assert len(fwd["grid"]) == (2 if splits == 1 else 3)
