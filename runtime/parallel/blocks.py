"""Attention of queries at given absolute positions against keys at given absolute positions: the
unit of work of context parallelism (one rank's queries against one rank's keys).

Forward returns ``(out, lse)`` of the block; blocks merge by their log-sum-exp
(``numerics.merge_by_lse``). Backward is flash attention's: from the MERGED ``lse`` and ``delta = rowsum(dout *
out)`` of the whole row, each block gives its share of dq and the whole dk, dv of its keys, so no
block needs another block's values.

Two ways to compute a block, the same answer (the schedule never changes it):

- ``BlockProblem.runner`` set (``block_runner``: the attention's own runner where its
  ``Support.key_offset`` names the tensors' device: the CPU executor for ``backend="cpu"`` or
  ``"auto"`` on CPU tensors, the Triton kernels for ``"triton"`` or ``"auto"`` on CUDA tensors):
  the rows are cut into runs of consecutive positions (a zigzag rank holds two), and
  each (query run, key run) is one call of the runner's ``block_forward`` / ``block_backward`` with
  ``evaluate.block_bound``: its tile classification with both offsets (EMPTY tiles skipped, FULL
  ones unmasked), mask, bias, softcap and FoX decay at absolute positions.
- otherwise (the reference and Flex runners; Ulysses ranks, which hold a share of the heads, where the
  pattern reads the head): the reference backend's scores (``pair_scores``), computed in slabs of
  query rows so memory stays at ``SLAB_SCORES`` scores whatever the block sizes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.tiles import reads_heads
from ...core import ir
from ...core.errors import SpecError
from ..backends.reference.dense import pair_mask, pair_scores, softcap_values
from ..numerics import compute_dtype, expand_kv, merge_by_lse

#: Scores held at once per slab of query rows (float32: 64 MiB).
SLAB_SCORES = 1 << 24


@dataclass(frozen=True)
class BlockProblem:
    """What every block of one call shares: the pattern bound at the WHOLE sequence (``bound.n`` is
    every token; its heads every head), the whole call-time inputs, the scale, and the pattern heads
    this rank computes (``head_index``: all of them, or a Ulysses rank's share).

    The mask, bias and gates are evaluated on the CPU (``tensors``, positions and ``head_index`` live
    there, as in the reference backend) and moved to the device of q, k, v per slab."""

    pattern: ir.PatternIR
    bound: E.Bound
    tensors: dict
    batch: int | None
    scale: float
    head_index: torch.Tensor
    #: routing patterns: the blocks this rank's queries selected ``[B, H, L, blocks]`` and the block
    #: of every key position (``parallel.routing.select``); None otherwise
    selected: torch.Tensor | None = None
    key_block: torch.Tensor | None = None
    #: a runner that runs blocks (``runtime.runner.BlockRunner``; ``block_runner``), or None: the
    #: reference scores
    runner: object | None = None
    #: the float inputs whose gradients the backward gives (``block_backward``'s ``d_inputs``)
    grad_inputs: tuple[str, ...] = ()

    def evaluator(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> E.Evaluator:
        env = E.token_env(self.pattern, self.bound, q_pos.view(1, 1, -1, 1), k_pos.view(1, 1, 1, -1),
                          self.head_index.view(1, -1, 1, 1))
        batched = {n for n, t in self.tensors.items() if t.dim() > len(self.pattern.input(n).dims)}
        return E.Evaluator(env, self.tensors, batched, self.batch)

    def scores(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, rows: slice):
        """(scores -inf where masked, mask) of q ``[B, H, r, D]`` (this rank's query ``rows``, at
        positions ``q_pos``) against k ``[B, H, c, D]``."""
        ev = self.evaluator(q_pos, k_pos)
        mask = pair_mask(self.pattern, self.bound, ev, len(self.head_index), len(q_pos), len(k_pos)).to(q.device)
        if self.selected is not None:
            mask = mask & self.selected[:, :, rows][..., self.key_block[k_pos].to(q.device)]
        return pair_scores(self.pattern, self.bound, ev, q, k, self.scale, q_pos, k_pos, self.head_index, mask), mask

    def softcap_grad(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
        """d(softcapped score)/d(scale * q.k), or None without a softcap."""
        if self.pattern.softcap is None:
            return None
        cap = softcap_values(self.pattern, self.bound, self.head_index, q.dtype).to(q.device)
        return 1 - torch.tanh(self.scale * (q @ k.transpose(-1, -2)) / cap) ** 2


def fold(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The inverse of ``expand_kv`` for gradients: a group's query heads summed onto its KV head."""
    B, H, N, D = t.shape
    return t if H == kv_heads else t.view(B, kv_heads, H // kv_heads, N, D).sum(2)


def _slabs(rows: int, per_row: int):
    step = max(1, SLAB_SCORES // max(1, per_row))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def block_runner(runner, device: torch.device, heads: int, pattern_heads: int, pattern: ir.PatternIR):
    """``runner`` where it runs blocks on ``device`` (``Support.key_offset``) for these ``heads`` of the
    ``pattern_heads``: all of them, or a Ulysses rank's share where nothing of the pattern depends on
    the head (``tiles.reads_heads``; a runner numbers its heads from 0); else None (the reference
    scores, which take the share's head indices)."""
    support = getattr(runner, "support", None)
    if support is None or device.type not in support.key_offset:
        return None
    if heads != pattern_heads and reads_heads(pattern):
        return None
    return runner


def blocks_backend(runner, device: torch.device) -> str:
    """The backend that runs the blocks of a call on ``device`` (``ContextParallel.last_blocks``):
    "reference" without a runner (the reference scores), else the runner's name; the auto runner's is
    the one its ``block_forward`` hands the blocks to there (the Triton kernels on CUDA, the CPU
    executor elsewhere), never "auto"."""
    if runner is None:
        return "reference"
    if runner.name == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    return runner.name


def runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(first row, first absolute position, length)`` of each run of consecutive positions."""
    p = pos.tolist()
    out, start = [], 0
    for i in range(1, len(p) + 1):
        if i == len(p) or p[i] != p[i - 1] + 1:
            out.append((start, p[start], i - start))
            start = i
    return out


def _run_pairs(prob: BlockProblem, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """Every (query run, key run) of a block, a runner call each: ``(query rows, key columns, block bound,
    selection of those queries, key blocks)`` (the last two None without a route)."""
    k_runs = runs(k_pos)
    for r0, q0, lq in runs(q_pos):
        for c0, k0, lk in k_runs:
            bound = E.block_bound(prob.bound, q0, lq, k0, lk)
            sel, kb = ((None, None) if prob.selected is None
                       else (prob.selected[:, :, r0:r0 + lq], prob.key_block[k0:k0 + lk]))
            yield slice(r0, r0 + lq), slice(c0, c0 + lk), bound, sel, kb


def _runner_forward(prob: BlockProblem, q, k, v, q_pos, k_pos):
    dt = compute_dtype(q.dtype)
    B, H, nq, _ = q.shape
    out = torch.zeros(B, H, nq, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.full((B, H, nq), -math.inf, dtype=dt, device=q.device)
    for rows, cols, bound, sel, kb in _run_pairs(prob, q_pos, k_pos):
        part, part_lse = prob.runner.block_forward(bound, q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                                   prob.tensors, prob.scale, sel, kb)
        out[:, :, rows], lse[:, :, rows] = merge_by_lse(out[:, :, rows], lse[:, :, rows], part.to(dt),
                                                                  part_lse.to(dt))
    return out, lse


def _runner_backward(prob: BlockProblem, q, k, v, q_pos, k_pos, lse, dout, out, dlse, d_inputs):
    dt = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    for rows, cols, bound, sel, kb in _run_pairs(prob, q_pos, k_pos):
        dq_b, dk_b, dv_b, d_in = prob.runner.block_backward(
            bound, q[:, :, rows], k[:, :, cols], v[:, :, cols], out[:, :, rows], lse[:, :, rows],
            dout[:, :, rows], prob.tensors, prob.scale, sel, kb, None if dlse is None else dlse[:, :, rows],
            prob.grad_inputs)
        dq[:, :, rows] += dq_b.to(dt)
        dk[:, :, cols] += dk_b.to(dt)
        dv[:, :, cols] += dv_b.to(dt)
        _add_input_grads(d_inputs, d_in, dt)
    return dq, dk, dv


def _add_input_grads(total: dict, part: dict, dt: torch.dtype) -> None:
    """Input gradients of one block (or slab) summed into ``total`` in the compute dtype."""
    for name, grad in part.items():
        if grad is not None:
            grad = grad.to(dt)
            total[name] = grad if name not in total else total[name] + grad


def block_forward(prob: BlockProblem, q, k, v, q_pos, k_pos) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, nq, Dv], lse [B, H, nq])`` of one block in the compute dtype; a query with no
    allowed key in the block gives 0 and lse -inf."""
    if prob.runner is not None:
        return _runner_forward(prob, q, k, v, q_pos, k_pos)
    dt = compute_dtype(q.dtype)
    B, H, nq, _ = q.shape
    kc, vc = expand_kv(k.to(dt), H), expand_kv(v.to(dt), H)
    out = torch.zeros(B, H, nq, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.full((B, H, nq), -math.inf, dtype=dt, device=q.device)
    for rows in _slabs(nq, B * H * len(k_pos)):
        s, _ = prob.scores(q[:, :, rows].to(dt), kc, q_pos[rows], k_pos, rows)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        total = p.sum(-1)
        out[:, :, rows] = (p @ vc) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
        lse[:, :, rows] = torch.where(total > 0, torch.log(total) + m.squeeze(-1), torch.full_like(total, -math.inf))
    return out, lse


def block_backward(prob: BlockProblem, q, k, v, q_pos, k_pos, lse, dout, delta, out=None, d_inputs=None,
                   dlse=None):
    """``(dq, dk, dv)`` of one block from the merged row statistics: ``lse`` and ``delta`` ``[B, H, nq]``
    of the whole row (``delta = rowsum(dout * out)``), ``dout`` ``[B, H, nq, Dv]``, ``out`` the merged
    output of the whole row (the runner path reads it, as flash attention's backward, in place of
    ``delta``), ``dlse`` the merged lse's gradient (or None). dk, dv have k's heads (GQA groups summed).
    The gradients of ``prob.grad_inputs`` (the whole inputs, through the scores) are added into the
    dict ``d_inputs``."""
    if prob.grad_inputs and d_inputs is None:
        raise SpecError("input gradients are summed into d_inputs", where="argument d_inputs")
    d_inputs = {} if d_inputs is None else d_inputs
    if prob.runner is not None:
        if out is None:
            raise SpecError("a block runner's backward reads the merged output", where="argument out")
        return _runner_backward(prob, q, k, v, q_pos, k_pos, lse, dout, out, dlse, d_inputs)
    if dlse is not None:  # d lse / d s = P: the lse's gradient joins the row term
        delta = delta - torch.where(torch.isneginf(lse), torch.zeros_like(lse), dlse.to(delta.dtype))
    dt = compute_dtype(q.dtype)
    B, H, nq, _ = q.shape
    kc, vc = expand_kv(k.to(dt), H), expand_kv(v.to(dt), H)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(kc.shape, dtype=dt, device=q.device)
    dv = torch.zeros(vc.shape, dtype=dt, device=q.device)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(dt)
    # the inputs as leaves of the scores' graph (each slab's scores differentiated with its ds)
    leaves = {name: prob.tensors[name].detach().requires_grad_() for name in prob.grad_inputs}
    scorer = dataclasses.replace(prob, tensors={**prob.tensors, **leaves}) if leaves else prob
    for rows in _slabs(nq, B * H * len(k_pos)):
        qr = q[:, :, rows].to(dt)
        with torch.set_grad_enabled(bool(leaves)):
            s, mask = scorer.scores(qr, kc, q_pos[rows], k_pos, rows)
        p = torch.where(mask, torch.exp(s.detach() - safe_lse[:, :, rows, None]), torch.zeros((), dtype=dt))
        do = dout[:, :, rows].to(dt)
        dv += p.transpose(-1, -2) @ do
        ds = p * (do @ vc.transpose(-1, -2) - delta[:, :, rows, None].to(dt))
        if leaves and s.requires_grad:
            grads = torch.autograd.grad(s, list(leaves.values()), ds, allow_unused=True)
            _add_input_grads(d_inputs, dict(zip(leaves, grads, strict=True)), dt)
        capped = prob.softcap_grad(qr, kc)
        if capped is not None:
            ds = ds * capped
        dq[:, :, rows] = prob.scale * (ds @ kc)
        dk += prob.scale * (ds.transpose(-1, -2) @ qr)
    return dq, fold(dk, k.shape[1]), fold(dv, v.shape[1])
