"""``ContextParallel``: one compiled softmax pattern or recurrence over a sequence sharded across the
ranks of a torch.distributed group.

The group has ``ulysses_degree * ring`` ranks: rank g is Ulysses rank ``g % u`` of ring position
``g // u``. Inside a Ulysses group an all-to-all trades token shards for head shards; across ring
positions keys move by ring steps or one all-gather (``softmax``), only between ranks whose tokens
share an allowed pair (``pairs``). Call-time inputs are gathered whole on every rank (they are
small: ids, gates). A recurrence's states are chained across ring positions instead, each rank
holding its share of the heads and their gates (``recurrence``).
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.distributed as dist

from ...compiler.analysis import evaluate as E
from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from ...core.recurrence_rules import RULES
from ..checks import check_qkv, resolve_scale, state_heads
from ..plan import clusters, vertical_slash
from ..plan.cache import score_input_names
from . import collectives as C
from . import refusals, routing
from .blocks import BlockProblem, block_runner, blocks_backend
from .pairs import PairPlan, choose_order, plan_pairs
from .recurrence import (
    chained_recurrence,
    check_parts,
    local_call,
    share_runner,
    token_dim,
    ulysses_inputs,
)
from .sharding import ShardOrder
from .softmax import RingAttention, RingCall
from .ulysses import Swap

KV_MODES = ("ring", "allgather")


class ContextParallel(torch.nn.Module):
    """Runs ``attn`` (an ``attnc.Attention``) on the shards of a sequence held by the ranks of
    ``group`` (None: the default group), forward and backward.

    ``ulysses_degree``: ranks per Ulysses group (heads, KV heads and, under the delta rule's grouped
    value attention, value heads must divide by it); the group's size must be a multiple of it.
    ``kv``: how keys cross ring positions, ``"ring"`` (point-to-point steps overlapped with compute)
    or ``"allgather"`` (one collective). A recurrence moves no keys: whatever ``kv``, each ring
    position's states are chained by one all-gather (``recurrence``), and with Ulysses each rank runs
    the whole sequence of its Ulysses group's ring position on its share of the heads (no chain when
    ``ulysses_degree`` is the group's size). Tensors are ``[B, H, N, D]``:
    ``shard(x)`` is this rank's part of a whole tensor (the same on every rank), ``unshard(x)`` the
    whole tensor again on every rank; ``cp(q, k, v, **inputs)`` the attention of this rank's queries,
    this rank's part of the output. Inputs may be this rank's part (``shard(x, dim=...)`` along their
    token dimension) or whole. Float inputs are differentiable: a part gets its exact gradient (every
    rank's queries' share, summed across the group); a whole input gets this rank's queries' share,
    whose sum over the ranks is the one-process gradient (as for a parameter replicated across the
    group, which data parallelism reduces). ``last_comm_bytes``: bytes this rank sent in the last
    forward.

    The blocks (this rank's queries against one rank's keys) run on the attention's own backend
    where its runner runs blocks on the tensors' device (``Support.key_offset``: the CPU executor
    for ``backend="cpu"`` or ``"auto"`` on CPU tensors, the Triton kernels for ``"triton"`` or
    ``"auto"`` on CUDA tensors), else on the reference scores (the reference and Flex runners, and
    Ulysses ranks, which hold a share of the heads, where a value of the pattern reads the head);
    ``last_blocks`` says which."""

    def __init__(self, attn, group=None, ulysses_degree: int = 1, kv: str = "ring", sizes: dict | None = None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise SpecError("torch.distributed is not initialized", where="argument group",
                            hint="call torch.distributed.init_process_group first")
        world = dist.get_world_size(group)
        record = {"kv": kv if isinstance(kv, str) else repr(kv), "ulysses_degree": repr(ulysses_degree),
                  "pattern": identity(getattr(attn, "pattern", None))}
        try:
            _check_arguments(attn, world, ulysses_degree, kv)
        except SpecError as err:
            record["error"] = (err.message, err.where)
        # every rank learns every rank's arguments before any subgroup is made: a bad or differing
        # argument on one rank is the same error on all, not a hang in new_group
        C.agree(group, record, "argument ulysses_degree", {"pattern": "argument attn", "kv": "argument kv"})
        self.attn, self.group, self.kv = attn, group, kv
        self.sizes = {**attn.sizes, **(sizes or {})}
        self.world, self.rank = world, dist.get_rank(group)
        self.u, self.ring = ulysses_degree, world // ulysses_degree
        self.ring_index, self.ulysses_index = divmod(self.rank, self.u)
        # every rank makes every subgroup, in the same order (torch.distributed's rule)
        self.ulysses_group, self.ring_group = None, None
        ranks = [C.global_rank(group, g) for g in range(world)]
        if self.u > 1:
            for i in range(self.ring):
                g = dist.new_group(ranks[i * self.u:(i + 1) * self.u])
                if i == self.ring_index:
                    self.ulysses_group = g
        if self.ring > 1 and self.u > 1:
            for j in range(self.u):
                g = dist.new_group(ranks[j::self.u])
                if j == self.ulysses_index:
                    self.ring_group = g
        elif self.ring > 1:
            self.ring_group = group
        self.last_comm_bytes = 0
        self.last_plan: PairPlan | None = None
        #: what computed the blocks of the last softmax call: a runner's name (its kernels, e.g.
        #: "cpu" for the executor) or "reference" (``blocks.block_runner``)
        self.last_blocks: str | None = None
        self._orders: dict = {}
        self._plans: dict = {}

    def extra_repr(self) -> str:
        return f"{self.attn.pattern.name}, ranks={self.world}, ulysses_degree={self.u}, kv={self.kv!r}"

    def order(self, n: int, sizes: dict | None = None) -> ShardOrder:
        """The shard order of an ``n``-token sequence (zigzag for causal sequence patterns); ``sizes``:
        grid sizes of this call, beside those given at construction."""
        sizes = {**self.sizes, **(sizes or {})}
        key = (n, tuple(sorted(sizes.items())))
        if key not in self._orders:
            pat = self.attn.pattern
            if isinstance(pat, ir.RecurrenceIR):
                self._orders[key] = _contiguous(n, self.world)
            else:
                bound = E.bind_sizes(pat, n=n, nk=n, sizes=sizes)  # the order reads no head
                self._orders[key] = choose_order(pat, bound, self.ring, self.u)
        return self._orders[key]

    def shard(self, x: torch.Tensor, dim: int = 2, sizes: dict | None = None) -> torch.Tensor:
        """This rank's part of the whole tensor ``x`` along ``dim`` (its tokens, in the order it computes)."""
        dim = _dim(x, dim, "argument x")
        try:
            order = self.order(x.shape[dim], sizes)
        except SpecError as err:  # the order's rules speak of a call's q; here the tensor is x
            if err.where != "argument q":
                raise
            raise SpecError(err.message, where="argument x", hint=err.hint) from None
        return order.shard(x, self.rank, dim)

    def unshard(self, x: torch.Tensor, dim: int = 2, sizes: dict | None = None) -> torch.Tensor:
        """The whole tensor on every rank from each rank's part along ``dim`` (not differentiable)."""
        dim = _dim(x, dim, "argument x")
        C.agree(self.group, {"shape": tuple(x.shape), "dtype": str(x.dtype)}, "argument x")
        return self.order(x.shape[dim] * self.world, sizes).unshard(C.all_gather(x.detach(), self.group), dim)

    def forward(self, q, k, v, *, scale: float | None = None, sizes: dict | None = None, return_lse: bool = False,
                **inputs):
        """This rank's part of the output ``[B, H, L, Dv]``; with ``return_lse`` also the log-sum-exp of
        its queries' scaled scores, ``[B, H, L]`` in the compute dtype (-inf for a query with no key),
        differentiable (to merge with attention computed elsewhere, as ``attnc.na3d``'s extra keys)."""
        if sizes is not None and not isinstance(sizes, dict):
            raise SpecError(f"expected a dict of sizes, got {type(sizes).__name__}", where="argument sizes")
        if not isinstance(return_lse, bool):
            raise SpecError(f"expected True or False, got {return_lse!r}", where="argument return_lse")
        self._call_sizes = {**self.sizes, **(sizes or {})}
        pat = self.attn.pattern
        # the pattern's whole definition (``identity``: route, bias, softcap, decay, parameters, a
        # recurrence's rule...), not its name: ranks compiled differently must not each run their own
        record = {"pattern": identity(pat), "kv": self.kv, "ulysses_degree": self.u,
                  "sizes": sorted(self._call_sizes.items())}
        try:
            # a rule's v may have more heads than q where it says so (the delta rule's GVA), as on one device
            check_qkv(q, k, v, gva=isinstance(pat, ir.RecurrenceIR) and RULES[pat.rule].grouped_values)
            if q.shape[2] != k.shape[2]:
                raise SpecError(f"q has {q.shape[2]} tokens but k has {k.shape[2]}: every rank holds the same "
                                "tokens of q, k and v", where="argument k")
            scale = resolve_scale(scale, q.shape[-1], q.dtype)
            if return_lse and not isinstance(pat, ir.PatternIR):
                raise SpecError(f"'{pat.name}' is a recurrence: it has no log-sum-exp", where="argument return_lse")
            for name in ("initial_state", "return_state", "cu_seqlens"):
                if isinstance(pat, ir.RecurrenceIR) and name in inputs:
                    raise SpecError(f"context parallelism runs '{pat.name}' on one sequence from a zero state, "
                                    f"chained over the ranks: it takes no {name}=", where=f"argument {name}",
                                    hint="call the module on one device for a state or packed sequences")
            if self.u > 1 and (q.shape[1] % self.u or k.shape[1] % self.u or v.shape[1] % self.u):
                gva = f", {v.shape[1]} value heads" if v.shape[1] != k.shape[1] else ""
                raise SpecError(f"{q.shape[1]} heads ({k.shape[1]} KV heads{gva}) do not split over ulysses_degree "
                                f"{self.u}", where="argument q", hint="pick a Ulysses degree dividing "
                                + ("all three" if gva else "both"))
            # what only this rank's tensors can get wrong, checked before the agreement so that every rank
            # raises its error instead of the others waiting in a collective it skips: the inputs' devices
            # and parts, and for a recurrence the call bound as every backend binds it (sizes, inputs, the
            # delta rule's gates: NaN, +inf and positive gates in this rank's part)
            if isinstance(pat, ir.RecurrenceIR):
                local_call(self.attn, q, v, inputs, self._call_sizes, self.rank, self.world, self.u)
            else:
                check_parts(pat, inputs, q.shape[2] * self.world, self.world, q.device)
        except SpecError as err:
            record["error"] = (err.message, err.where)
        else:
            record.update(q=tuple(q.shape), k=tuple(k.shape), v=tuple(v.shape), dtype=str(q.dtype), scale=scale,
                          inputs={n: (tuple(t.shape), str(t.dtype), t.requires_grad) if isinstance(t, torch.Tensor)
                                  else repr(t) for n, t in sorted(inputs.items())})
        C.agree(self.group, record, "argument q", {"pattern": "argument attn"})
        n = q.shape[2] * self.world
        if isinstance(pat, ir.RecurrenceIR):
            out, sent = self._recurrence(q, k, v, inputs, scale)
            self.last_comm_bytes = sent
            return out
        # cluster(q | k, C): each rank clusters its own tokens' vectors; the ids are gathered like any
        # per-token input (the centroids, with no token dimension, are passed whole)
        input_bytes = 0
        rule = vertical_slash.rule_of(pat)
        if rule is not None:
            # a vertical-slash selection scores the last queries against every key: every rank selects
            # from the same queries and the whole k, so all hold the same flags. Only the last L
            # queries are gathered, unless the pattern also clusters q (then all of them)
            whole_q = any(d.derived[0] == "cluster" for d in clusters.derived_inputs(pat))
            scored, q_bytes = (self.unshard(q), q.nbytes * (self.world - 1)) if whole_q else \
                self._last_queries(q, n, min(int(rule.last), n))
            inputs = clusters.derive_inputs(pat, scored, self.unshard(k), inputs, scale)
            input_bytes += q_bytes + k.nbytes * (self.world - 1)
        else:
            inputs = clusters.derive_inputs(pat, q, k, inputs)
        whole = {}
        for name, t in inputs.items():
            whole[name], sent = self._whole_input(name, t, n)
            input_bytes += sent
        out, lse = self._softmax(q, k, v, scale, whole, n, input_bytes, return_lse)
        return (out, lse) if return_lse else out

    def _recurrence(self, q, k, v, inputs: dict, scale: float) -> tuple[torch.Tensor, int]:
        """(this rank's output, bytes it sent) of a recurrence: chained over the ranks; with Ulysses, the
        all-to-all to a share of the heads over the ring position's tokens (the per-head inputs with
        them), the chain across ring positions only (none for a single one), and the all-to-all back."""
        if self.u == 1:
            return chained_recurrence(self.attn, self.group, self.rank, self.world, q, k, v, inputs,
                                      self._call_sizes, scale)
        n = q.shape[2] * self.world
        moved = [q, k, v]
        sent = sum(t.nbytes for t in moved) * (self.u - 1) // self.u
        q, k, v = (Swap.apply(t, self.ulysses_group, self.u, True) for t in moved)
        local, input_bytes = ulysses_inputs(self.attn.pattern, inputs, n, self.ring_index, self.ring, self.u,
                                            self.ulysses_index, self.ulysses_group)
        share = state_heads(q, v)  # the state's heads on this rank (v's under grouped value attention)
        runner = share_runner(self.attn.runner, self.ulysses_index * share, share * self.u)
        out, chain = chained_recurrence(self.attn, self.ring_group, self.ring_index, self.ring, q, k, v, local,
                                        self._call_sizes, scale, runner=runner)
        sent += out.nbytes * (self.u - 1) // self.u
        out = Swap.apply(out, self.ulysses_group, self.u, False)
        return out, sent + input_bytes + chain

    def _softmax(self, q, k, v, scale, whole, n, input_bytes: int, return_lse: bool):
        pat = self.attn.pattern
        B, H = q.shape[0], q.shape[1]
        bound = E.bind_sizes(pat, n=n, nk=n, heads=H, sizes=self._call_sizes, dk=q.shape[-1])
        tensors, batch = E.bind_inputs(pat, bound, whole, batch=B, device=q.device)
        plan = self.plan(bound, tensors, batch, self.order(n, self._call_sizes))
        self.last_plan = plan
        sent = 0
        if self.u > 1:
            moved = [q, k, v]
            sent += sum(t.nbytes for t in moved) * (self.u - 1) // self.u
            q, k, v = (Swap.apply(t, self.ulysses_group, self.u, True) for t in moved)
        share = H // self.u
        heads = torch.arange(self.ulysses_index * share, (self.ulysses_index + 1) * share)
        # inputs whose gradients are wanted: those the scores read (a route's indexer or a mask's table
        # is not differentiated, as on one device)
        score_inputs = score_input_names(pat)
        grad_inputs = tuple(name for name, t in tensors.items() if name in score_inputs
                            and torch.is_grad_enabled() and t.requires_grad and t.is_floating_point())
        # the attention's own runner where it runs blocks on this device (the CPU executor, the Triton
        # kernels), else the reference scores (blocks.block_runner), whose mask, bias and gates are
        # evaluated on the CPU
        runner = self.block_runner(q.device, share, H)
        self.last_blocks = blocks_backend(runner, q.device)
        problem = BlockProblem(pat, bound, {n: t.detach().cpu() for n, t in tensors.items()}, batch, scale,
                               heads, runner=runner, grad_inputs=grad_inputs)
        if pat.route is not None:  # the selection of this rank's queries, from every rank's block means
            pos = [plan.order.positions(j) for j in range(self.ring)]
            selected, key_block = routing.select(problem, q, k, pos[self.ring_index], pos, problem.tensors,
                                                 self.ring_group, self.ring)
            problem = dataclasses.replace(problem, selected=selected, key_block=key_block)
        if runner is not None and share != H:
            # a runner numbers a Ulysses share's heads from 0 (it runs only where no value reads the head)
            problem = dataclasses.replace(problem, bound=dataclasses.replace(
                bound, heads=share, subs={**bound.subs, S.HEADS: share}))
        call = RingCall(problem, plan, self.ring_index, self.ring_group, self.kv, whole_group=self.group)
        out, lse = RingAttention.apply(q, k, v, call, *(tensors[name] for name in grad_inputs))
        if self.u > 1:
            sent += out.nbytes * (self.u - 1) // self.u
            out = Swap.apply(out, self.ulysses_group, self.u, False)
            if return_lse:
                sent += lse.nbytes * (self.u - 1) // self.u
                lse = Swap.apply(lse.unsqueeze(-1), self.ulysses_group, self.u, False).squeeze(-1)
        self.last_comm_bytes = sent + call.sent["forward"] + input_bytes
        return out, lse

    def block_runner(self, device: torch.device, heads: int, pattern_heads: int):
        """The runner of the blocks of a call on ``device`` computing ``heads`` of the pattern's
        ``pattern_heads`` (``blocks.block_runner``), None for the reference scores."""
        return block_runner(self.attn.runner, device, heads, pattern_heads, self.attn.pattern)

    def plan(self, bound: E.Bound, tensors: dict, batch: int | None, order: ShardOrder) -> PairPlan:
        """Which ring positions exchange keys in this call (cached when the mask reads no input)."""
        pat = self.attn.pattern
        if E.input_names(pat.mask):
            return plan_pairs(pat, bound, tensors, batch, order)
        key = (order, bound.heads, tuple(sorted(self._call_sizes.items())))
        if key not in self._plans:
            self._plans[key] = plan_pairs(pat, bound, {}, None, order)
        return self._plans[key]

    def _last_queries(self, q: torch.Tensor, n: int, last: int) -> tuple[torch.Tensor, int]:
        """The queries at the last ``last`` positions of the sequence, in order, on every rank (each rank
        sends its rows among them, padded to the most any rank holds), and the bytes this rank sent."""
        order = self.order(n, self._call_sizes)
        positions = [order.rank_positions(r) for r in range(self.world)]
        tails = [order.tail_rows(r, last) for r in range(self.world)]
        width = order.tail_width(last)
        mine = q[:, :, tails[self.rank].to(q.device)]
        padded = torch.zeros(*q.shape[:2], width, q.shape[-1], dtype=q.dtype, device=q.device)
        padded[:, :, :mine.shape[2]] = mine
        parts = C.all_gather(padded, self.group)
        rows = torch.cat([part[:, :, :int(t.sum())] for part, t in zip(parts, tails, strict=True)], dim=2)
        at = torch.cat([pos[t] for pos, t in zip(positions, tails, strict=True)])
        return rows[:, :, torch.argsort(at).to(q.device)], padded.nbytes * (self.world - 1)

    def _whole_input(self, name: str, t, n: int) -> tuple:
        """A call-time input whole, and the bytes this rank sent for it: gathered from every rank's part
        along its token dimension (differentiably: the backward sums every rank's gradient of the
        whole and keeps this rank's part), or as given (0 bytes)."""
        dim = token_dim(self.attn.pattern, name, t)
        if dim is None or dim >= t.dim() or t.shape[dim] == n:
            return t, 0
        whole = GatherTokens.apply(t, self.order(n, self._call_sizes), self.group, self.rank, dim)
        return whole, t.nbytes * (self.world - 1)


class GatherTokens(torch.autograd.Function):
    """``GatherTokens.apply(part, order, group, rank, dim)``: the whole tensor from every rank's part
    along ``dim`` (``ShardOrder.unshard``); the backward all-reduces the whole tensor's gradient (each
    rank's queries read every rank's tokens) and returns this rank's part of it."""

    @staticmethod
    def forward(ctx, part, order, group, rank, dim):
        ctx.order, ctx.group, ctx.rank, ctx.dim = order, group, rank, dim
        return order.unshard(C.all_gather(part, group), dim)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return ctx.order.shard(total, ctx.rank, ctx.dim), None, None, None, None


def identity(pat) -> str | None:
    """What the ranks agree on about a pattern: its name and parameters, readable, and a digest of its
    whole IR (``core.ir``'s canonical form, the one ``key()`` hashes, over every field that takes part in
    the IR's equality: layouts, mask, bias, softcap, decay, route, inputs, parameters, a recurrence's gate,
    rule and options), so that a field added later is agreed on too. None for anything but an IR."""
    if not isinstance(pat, ir.PatternIR | ir.RecurrenceIR | ir.CombinedIR):
        return None
    digest = hashlib.sha256(ir._canon(pat).encode()).hexdigest()
    params = ", ".join(f"{name}={value!r}" for name, value in pat.params)
    return f"'{pat.name}'({params}) [IR sha256 {digest[:20]}]"


def _check_arguments(attn, world: int, ulysses_degree, kv) -> None:
    if isinstance(getattr(attn, "pattern", None), ir.BucketedIR):
        raise SpecError(f"'{attn.pattern.name}' chooses its buckets among all of a sequence's tokens: context "
                        "parallelism does not run bucketed patterns in this version", where="argument attn")
    if isinstance(getattr(attn, "pattern", None), ir.CombinedIR):
        raise SpecError(f"'{attn.pattern.name}' combines several attentions (branches): context parallelism does "
                        "not run combined patterns in this version", where="argument attn")
    if not hasattr(attn, "pattern") or not hasattr(attn, "runner"):
        raise SpecError(f"expected an attnc.Attention, got {type(attn).__name__}", where="argument attn")
    if kv not in KV_MODES:
        raise SpecError(f"unknown kv mode {kv!r}; expected one of {', '.join(KV_MODES)}", where="argument kv")
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1:
        raise SpecError(f"expected a positive int, got {ulysses_degree!r}", where="argument ulysses_degree")
    if world % ulysses_degree:
        raise SpecError(f"a group of {world} ranks is not ulysses_degree x ring ranks for ulysses_degree "
                        f"{ulysses_degree}", where="argument ulysses_degree")
    pat = attn.pattern
    if isinstance(pat, ir.PatternIR):
        refusals.refuse(pat, "argument attn")


def _contiguous(n: int, world: int) -> ShardOrder:
    if n % world:
        raise SpecError(f"{n} tokens do not split over {world} ranks", where="argument q",
                        hint=f"pad the sequence to a multiple of {world}")
    return ShardOrder(n, world, world, 1, False)


def _dim(x, dim, where: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise SpecError(f"expected a tensor, got {type(x).__name__}", where=where)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise SpecError(f"dim {dim!r} is not a dimension of a {x.dim()}-d tensor", where="argument dim")
    return dim % x.dim()
