"""FlexAttention's own objects of a pattern, for a caller who runs ``flex_attention`` itself:
``mask_mod``, ``score_mod`` and a ``BlockMask`` (``attnc.to_flex``, ``integrations.flex``).

The backend's machinery, at the positions Flex passes (token t of a ``[B, H, N, D]`` tensor is Flex
position t, row-major on a grid):

- the plan is the runner's with forced flat tiles of the requested block size (``FlexRunner`` with
  ``q_tile`` / ``kv_tile`` set: 1-D tiles of the row-major token order, so nothing is permuted, on a
  grid too), exactly classified (``compiler.analysis.tiles``, ``compiler.cost.search.classify_flat``);
- the mods are the generated ones (``compiler.codegen.flex``) bound to their captured tensors (the
  pattern's inputs and tables, FoX prefix sums) as the runner binds them;
- the ``BlockMask`` is made from attnc's tile lists (``block_masks.block_mask_of``), never by evaluating
  the mask on every pair as ``create_block_mask`` does; where the classification is exact
  (``blocks_exact``) its FULL and PARTIAL blocks are ``create_block_mask``'s (but for a last block past
  the end of a sequence: ``FlexExport``);
- a pattern's ``scale E`` (a per-query factor of the scores, which the runners multiply into q) is
  folded into the ``score_mod`` as a captured ``[heads, n]`` table.

``refusal`` says what a pattern needs that Flex's objects cannot hold; ``REFUSED`` lists those kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.codegen.flex import DECAY_BUFFERS
from ....core import ir
from ....core import symbols as S
from ....core.errors import SpecError
from ...checks import check_softcap
from ...plan import clusters
from .block_masks import bind_mask_mod, bind_score_mod, block_mask_of
from .kernels import prefix_sums
from .runner import FlexRunner

#: Flex's own default block size (``torch.nn.attention.flex_attention._DEFAULT_SPARSE_BLOCK_SIZE``): what
#: its CUDA kernels take without further options.
DEFAULT_BLOCK_SIZE = 128

#: The kinds of pattern Flex's objects cannot express, and why (``refusal``'s messages say the same).
REFUSED = {
    "recurrence": "a state carried token by token (linear attention, delta rule, Titans): FlexAttention "
    "computes a softmax over scores, it holds no state",
    "combined": "several attentions summed with gates or merged into one softmax (branch ... combine: nsa, "
    "combiner): one Flex call is one attention with one mask_mod and one score_mod",
    "bucketed": "attentions averaged over buckets chosen from q and k at every call (routing_transformer)",
    "routed": "a route (route topk ...: moba, quest, nsa's selection, dsa, xattention, ...) selects key blocks per "
    "query from q and k, or from scores given per call, at every call; a BlockMask and a mask_mod are "
    "made before the call and see positions, not vectors",
    "vector mask": "a mask that reads values computed from the q and k vectors (cluster(q, C), vertical_slash's "
    "flags): a mask_mod sees positions only",
    "vector score": "a score term that reads a table computed from the query vectors (relative(E, r): q . E; "
    "landmark()): a score_mod receives the score, not q",
    "unnormalized weights": "weights not divided by their row sum (weights ... unnormalized: sigmoid): Flex "
    "always normalizes the row",
}


def refusal(pat) -> tuple[str, str] | None:
    """(the kind in ``REFUSED``, the message naming the pattern) for a pattern whose attention Flex's
    ``mask_mod``, ``score_mod`` and ``BlockMask`` cannot express; None where they can."""
    name = getattr(pat, "name", "?")
    if isinstance(pat, ir.RecurrenceIR):
        kind = "recurrence"
    elif isinstance(pat, ir.CombinedIR):
        kind = "combined"
    elif isinstance(pat, ir.BucketedIR):
        kind = "bucketed"
    elif pat.route is not None:
        kind = "routed"
    elif clusters.mask_derived_inputs(pat):
        kind = "vector mask"
    elif clusters.derived_inputs(pat):
        kind = "vector score"
    elif pat.weights is not None and not pat.weights.normalized:
        kind = "unnormalized weights"
    else:
        return None
    return kind, f"'{name}' cannot be exported to FlexAttention: {REFUSED[kind]}"


def refuse(pat) -> None:
    """Raise ``refusal``'s ``SpecError`` for a pattern Flex's objects cannot express."""
    why = refusal(pat)
    if why is None:
        return
    hint = {
        "combined": "export a branch's pattern: pattern.branch(NAME).pattern",
        "routed": "compile_attention(..., backend='flex') runs it on Flex, routing per call",
    }.get(why[0], "run it with compile_attention(...)")
    raise SpecError(why[1], where="argument pattern", hint=hint)


@dataclass
class FlexExport:
    """A pattern's FlexAttention objects at fixed sizes, for ``flex_attention(q, k, v, score_mod=...,
    block_mask=...)`` on ``[B, heads, n, D]`` queries and ``[B, kv_heads, nk, D]`` keys and values.

    ``mask_mod(b, h, q_idx, kv_idx)``: whether query q_idx may attend key kv_idx (head h, batch element
    b; b is read only where an input has a batch dimension). ``score_mod(score, b, h, q_idx, kv_idx)``:
    the pattern's score terms after ``scale * q . k`` (softcap, bias, FoX decay, weights, a ``scale E``);
    None where the pattern has none. ``block_mask``: Flex's ``BlockMask`` (``BLOCK_SIZE`` as asked,
    ``mask_mod`` attached). ``source``: the generated functions' text. ``blocks_exact``: every PARTIAL
    block holds both an allowed and a masked pair, so the blocks are ``create_block_mask``'s (else some
    PARTIAL block may be FULL or EMPTY: the same result, a little more work). One difference from
    ``create_block_mask`` remains where a sequence is not a whole number of blocks: attnc classifies a
    last block by its positions inside the sequence (FULL when they are all allowed), Flex's function
    counts the positions past the end as masked (PARTIAL); Flex's kernels mask those positions
    themselves, so both give the same attention. ``heads`` is None where the pattern reads no head
    (any head count serves); ``batch`` the batch of the inputs that have one (None: any batch)."""

    name: str
    mask_mod: Callable
    score_mod: Callable | None
    block_mask: object
    source: str
    n: int
    nk: int
    heads: int | None  # None: the pattern reads no head, any count serves
    batch: int | None
    blocks_exact: bool

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        kernel_options: dict | None = None,
        flex_attention: Callable | None = None,
    ):
        """``flex_attention(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask, ...)`` after
        checking the shapes against the exported sizes; ``enable_gqa`` where q has more heads than k.
        ``flex_attention``: the function to call (e.g. a ``torch.compile``'d one; default torch's)."""
        if flex_attention is None:
            from torch.nn.attention.flex_attention import flex_attention
        for what, t, want in (("q", q, self.n), ("k", k, self.nk), ("v", v, self.nk)):
            if t.dim() != 4 or t.shape[2] != want:
                raise SpecError(
                    f"{what} has shape {list(t.shape)}; '{self.name}' was exported for {want} "
                    f"{'queries' if what == 'q' else 'keys'} in [B, H, N, D]",
                    where=f"argument {what}",
                    hint="export again with to_flex(..., n=, nk=) at these sizes",
                )
        if self.heads is not None and q.shape[1] != self.heads:
            raise SpecError(
                f"q has {q.shape[1]} heads; '{self.name}' was exported for {self.heads}",
                where="argument q",
                hint="export again with to_flex(..., heads=)",
            )
        if self.batch is not None and q.shape[0] != self.batch:
            raise SpecError(
                f"q has a batch of {q.shape[0]}; the inputs given to the export have {self.batch}",
                where="argument q",
            )
        return flex_attention(
            q,
            k,
            v,
            score_mod=self.score_mod,
            block_mask=self.block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            return_lse=return_lse,
            kernel_options=kernel_options,
        )


def export(
    pat: ir.PatternIR,
    bound: E.Bound,
    tensors: dict,
    device: torch.device,
    block_size: tuple[int, int] = (DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE),
) -> FlexExport:
    """The Flex objects of ``pat`` bound as ``bound`` with its call-time inputs ``tensors`` (checked by
    ``evaluate.bind_inputs``), on ``device``, with Flex blocks of ``block_size`` (Q, KV) tokens."""
    refuse(pat)
    read = set()  # the symbols the terms read at these sizes
    for expr in (pat.mask, pat.bias, pat.softcap, pat.score_scale):
        free = E.substitute(expr, bound).free_symbols if expr is not None else set()
        if S.DK in free:
            raise SpecError(
                f"'{pat.name}' reads dk, the head dimension, in {expr}",
                where="argument dk",
                hint="pass dk= (q's last dimension)",
            )
        read |= free
    check_softcap(pat, bound)
    batched = frozenset(n for n, t in tensors.items() if t.dim() > len(pat.input(n).dims))
    batch = next((int(tensors[n].shape[0]) for n in sorted(batched)), None)
    try:
        runner = FlexRunner(pat, q_tile=(block_size[0],), kv_tile=(block_size[1],))
    except SpecError as err:  # a construct with no Flex lowering (codegen.flex.check_lowerable)
        raise SpecError(
            f"'{pat.name}' cannot be exported to FlexAttention: {err.message}",
            where=err.where,
            hint=err.hint,
        ) from None
    # on CUDA no tables (runner.CUDA_TABLES): a table read is a gather per pair in Flex's GPU kernels
    plan = runner.plan(bound, tensors, batched, device.type == "cuda")
    # a bias index out of range on an attended pair raises here: a score_mod cannot report it
    runner.check_indices(plan, tensors, batched, None)
    source = plan.source
    # the mask is not differentiated (Flex refuses mask_mod buffers that require grad)
    mask_bufs = tuple(
        source.tables[n].to(device) if n in source.tables else tensors[n].detach().to(device)
        for n in source.mask_inputs
    )
    score_bufs = [tensors[n].to(device) for n in source.score_inputs if n not in DECAY_BUFFERS]
    if pat.decay is not None:
        gates = tensors[pat.decay].to(device)
        hi, lo, reset = prefix_sums(gates, gates.dtype)
        score_bufs += [hi, lo, reset, hi.clone(), lo.clone()]  # DECAY_BUFFERS: key-side reads apart
    ns = plan.namespace
    mask_mod = bind_mask_mod(ns["mask_mod"], mask_bufs)
    score_mod = bind_score_mod(ns["score_mod"], tuple(score_bufs)) if source.has_score_mod else None
    text = source.text
    if pat.score_scale is not None:
        score_mod = _scaled(score_mod, _score_scale(pat, bound).to(device))
        text += (
            f"\n\n# and before score_mod: score = score * SCALE[h, q_idx], the pattern's "
            f"scale {pat.score_scale} at every (head, query)\n"
        )
    block_mask = block_mask_of(
        plan.schedule, mask_mod, plan.q_map.length, plan.k_map.length, device, 1, block_size
    )
    per_head = S.H in read or pat.decay is not None  # else the objects serve any number of heads
    return FlexExport(
        pat.name,
        mask_mod,
        score_mod,
        block_mask,
        text,
        bound.n,
        bound.nk,
        bound.heads if per_head else None,
        batch,
        bool(plan.schedule.exact),
    )


def _score_scale(pat: ir.PatternIR, bound: E.Bound) -> torch.Tensor:
    """The pattern's ``scale E`` at every (head, query row), float64 ``[heads, n]``; a value that is not a
    finite number is refused (as the runners refuse it at a call)."""
    rows = torch.arange(bound.n).view(1, -1)
    env = E.token_env(
        pat,
        bound,
        rows,
        torch.zeros(1, 1, dtype=torch.int64),
        torch.arange(bound.heads).view(-1, 1),
    )
    value = E.Evaluator(env, {}, set(), None)(E.substitute(pat.score_scale, bound))
    table = torch.as_tensor(value, dtype=torch.float64)
    table = torch.broadcast_to(table, (bound.heads, bound.n)).contiguous()
    bad = (~torch.isfinite(table)).nonzero()
    if len(bad):
        h, row = int(bad[0, 0]), int(bad[0, 1])
        raise SpecError(
            f"the score scale of '{pat.name}', {pat.score_scale}, is {float(table[h, row])} at query "
            f"{row + bound.q_offset} (head {h}): it must be a finite number at every query",
            where="argument n",
        )
    return table


def _scaled(score_mod: Callable | None, table: torch.Tensor) -> Callable:
    """``score_mod`` (None: the identity) applied to the score times ``table[h, q_idx]`` (indices
    clamped: Flex may evaluate a mod past the sequence, on positions it then masks)."""
    heads, n = table.shape

    def scaled(score, b, h, q_idx, kv_idx):
        factor = table[torch.clamp(h, 0, heads - 1), torch.clamp(q_idx, 0, n - 1)]
        s = (score * factor).to(score.dtype)
        return s if score_mod is None else score_mod(s, b, h, q_idx, kv_idx)

    return scaled
