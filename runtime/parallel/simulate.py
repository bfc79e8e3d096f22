"""What context parallelism costs, per mode, before anything runs: bytes each rank sends, its share
of the compute, whether the transfers hide behind the compute, and the best mode.

Compute per rank is the single-device simulator's time for the whole pattern (its best schedule)
times the rank's share of the non-empty (query chunk, key chunk) pairs. Transfers run at the link's
data-sheet bandwidth per direction (``LINKS``). A ring step's transfer overlaps the compute of the
previous step's block, so only its excess over that compute is exposed; an all-gather and the Ulysses
all-to-alls finish before the compute that needs them and are exposed whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...compiler.analysis import evaluate as E
from ...compiler.cost.model import checked_kv_heads, dtype_bytes
from ...core import ir
from ...core.errors import SpecError
from ..plan.vertical_slash import rule_of as vertical_slash_rule
from . import refusals
from .pairs import PairPlan, choose_order, chunk_pairs, rank_need


@dataclass(frozen=True)
class Link:
    """An interconnect: bandwidth per direction (GB/s) and the data sheet it comes from."""

    name: str
    gbps: float
    source: str


#: Data-sheet peaks, per direction; measured all-to-all and ring throughput is lower (often 70-85%).
LINKS = {
    "nvlink": Link("nvlink", 450.0, "NVIDIA H100 SXM data sheet: NVLink 900 GB/s, both directions together"),
    "pcie": Link("pcie", 64.0, "PCI Express 5.0 x16: 32 GT/s x 16 lanes, 64 GB/s each direction"),
    "ib": Link("ib", 50.0, "NVIDIA ConnectX-7 / Quantum-2 NDR InfiniBand: 400 Gb/s per port"),
}


@dataclass
class ModeEstimate:
    """One way to run: ``kv`` mode and Ulysses degree; per-rank bytes sent (forward), compute and
    exposed transfer time (seconds) on the busiest rank."""

    kv: str
    ulysses: int
    ring: int
    zigzag: bool
    sent_bytes: list[int]
    compute_s: float
    exposed_s: float
    need: list[list[int]] = field(default_factory=list)

    @property
    def time_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def hidden(self) -> bool:
        return self.exposed_s <= 0.05 * self.compute_s

    def name(self) -> str:
        if self.ring == 1:
            return f"ulysses {self.ulysses}"
        return self.kv + (f" + ulysses {self.ulysses}" if self.ulysses > 1 else "")


@dataclass
class ParallelReport:
    pattern: str
    ranks: int
    link: Link
    single_device_s: float
    modes: list[ModeEstimate]
    assumptions: list[str]

    @property
    def best(self) -> ModeEstimate:
        return min(self.modes, key=lambda m: m.time_s)

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "ranks": self.ranks, "link": self.link.name, "link_gbps": self.link.gbps,
                "link_source": self.link.source, "single_device_forward_s": self.single_device_s,
                "best": self.best.name(), "assumptions": list(self.assumptions),
                "modes": [{"mode": m.name(), "kv": m.kv, "ulysses_degree": m.ulysses, "ring": m.ring,
                           "zigzag": m.zigzag, "sent_bytes_per_rank": m.sent_bytes, "compute_s": m.compute_s,
                           "exposed_comm_s": m.exposed_s, "time_s": m.time_s, "comm_hidden": m.hidden,
                           "key_exchange": m.need} for m in self.modes]}

    def __str__(self) -> str:
        lines = [f"context parallel: '{self.pattern}' over {self.ranks} ranks, link {self.link.name} "
                 f"({self.link.gbps:g} GB/s per direction: {self.link.source})",
                 f"  one device: {self.single_device_s * 1e3:.3f} ms forward",
                 f"  {'mode':<22}{'order':<12}{'max sent':>12}{'compute':>12}{'exposed':>12}{'total':>12}  hidden"]
        for m in sorted(self.modes, key=lambda m: m.time_s):
            lines.append(f"  {m.name():<22}{'zigzag' if m.zigzag else 'contiguous':<12}"
                         f"{_mib(max(m.sent_bytes)):>12}{m.compute_s * 1e3:>10.3f}ms{m.exposed_s * 1e3:>10.3f}ms"
                         f"{m.time_s * 1e3:>10.3f}ms  {'yes' if m.hidden else 'no'}")
        lines.append(f"  best: {self.best.name()}")
        lines += [f"  assumes: {a}" for a in self.assumptions]
        return "\n".join(lines)


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f} MiB"


def ring_sent_bytes(plan: PairPlan, shard_kv_bytes: int) -> list[int]:
    """Bytes each ring position sends in ring mode: its keys and values to every position needing them."""
    return [shard_kv_bytes * sum(1 for i in plan.targets(j) if i != j) for j in range(plan.order.ring)]


def simulate_parallel(pat: ir.PatternIR, *, n: int, ranks: int, link: str = "nvlink", sizes: dict | None = None,
                      heads: int = 1, kv_heads: int | None = None, head_dim: int = 128, batch: int = 1,
                      single_device_s: float, dtype: str = "bf16", inputs: dict | None = None) -> ParallelReport:
    """Per-mode estimates for ``ranks`` ranks; ``single_device_s``: the simulator's forward time of the
    whole pattern on one device; ``inputs``: the call-time inputs the mask reads (document ids, cluster
    ids), whole-sequence, as the single-device simulation took them."""
    if link not in LINKS:
        raise SpecError(f"unknown link {link!r}; expected one of {', '.join(LINKS)}", where="argument --link")
    ranks = E.positive_int("--ranks", ranks)
    if not isinstance(pat, ir.PatternIR) or not pat.self_attention:
        raise SpecError("the context-parallel estimate covers self-attention softmax patterns",
                        where="argument --ranks")
    refusals.refuse(pat, "argument --ranks")
    kv_heads = checked_kv_heads(heads, kv_heads)
    item = dtype_bytes(dtype)
    bw = LINKS[link].gbps * 1e9
    bound = E.bind_sizes(pat, n=n, nk=n, heads=heads, sizes=sizes, dk=head_dim)
    tensors, _ = E.bind_inputs(pat, bound, inputs or {})
    vertical_slash = vertical_slash_rule(pat)
    modes = []
    for u in [d for d in range(1, ranks + 1) if ranks % d == 0 and heads % d == 0 and kv_heads % d == 0]:
        r = ranks // u
        try:
            order = choose_order(pat, bound, r, u)
        except SpecError:
            continue  # this split does not divide the sequence
        chunk_need = chunk_pairs(pat, bound, tensors, None, order.chunks)
        plan = PairPlan(order, rank_need(order, chunk_need))
        total = max(1, int(chunk_need.sum()))
        share = max(int(chunk_need[order.chunks_of(i)].sum()) for i in range(r)) / total
        compute = single_device_s * share / u  # Ulysses splits the heads of a ring position u ways
        local = batch * (n // ranks) * item
        kv_shard = 2 * kv_heads // u * head_dim * local * u  # a ring position's keys and values, per rank's heads
        a2a = (u - 1) * (2 * heads + 2 * kv_heads) * head_dim * local // u  # q, k, v there, out back
        if vertical_slash:  # every rank gathers k and the last L queries first (not overlapped)
            tail = order.tail_width(min(int(vertical_slash.last), n))
            a2a += (ranks - 1) * head_dim * item * batch * (kv_heads * (n // ranks) + heads * tail)
        for kv in ("ring", "allgather"):
            if r == 1 and kv == "allgather":
                continue
            if kv == "ring":
                sent = [b + a2a for b in ring_sent_bytes(plan, kv_shard)]
                per_step = kv_shard / bw
                blocks = max(len(plan.sources(i)) for i in range(r))
                exposed = max(0.0, per_step - compute / max(1, blocks)) * max(0, blocks - 1) if r > 1 else 0.0
            else:
                sent = [(r - 1) * kv_shard + a2a] * r
                exposed = (r - 1) * kv_shard / bw
            exposed += a2a / bw
            modes.append(ModeEstimate(kv, u, r, order.zigzag, [sent[i // u] for i in range(ranks)], compute,
                                      exposed, plan.need.int().tolist()))
    if not modes:
        raise SpecError(f"no way to split {n} tokens and {heads} heads over {ranks} ranks", where="argument --ranks")
    assumptions = [
        "compute per rank: the one-device forward time times the rank's share of non-empty chunk pairs "
        "(at the generated kernels' rate, as the blocks run where the attention's backend runs blocks; the "
        "reference evaluator's blocks are slower)",
        f"transfers at the link's data-sheet bandwidth, {LINKS[link].gbps:g} GB/s per direction, no latency",
        "ring: a step's transfer overlaps the previous block's compute; all-gather and all-to-all are not overlapped",
    ]
    if vertical_slash:
        assumptions.append("vertical-slash: every rank gathers the whole k and the last queries to select "
                           "(counted, not overlapped); the selection's compute is not counted")
    if pat.route is not None:
        assumptions.append("routing: the shards exchanged and the compute are the mask's (the selection reads "
                           "fewer pairs); the all-reduce of block means (blocks x head dim per head) is not counted")
    return ParallelReport(pat.name, ranks, LINKS[link], single_device_s, modes, assumptions)
