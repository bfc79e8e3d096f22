"""A paged batch in one launch (``attnc_fwd_paged``): every row of a batch over a paged KV cache, each with its own
key count and query count, read through its block table inside the kernel.

What the host does per call: look up the module kept for the batch's shapes (``PagedTemplate``, made at the first
call of those shapes and reused at every length), allocate the outputs, launch. Nothing is made or read back per
call: the rows' key counts (``seqlens``), query counts (``q_count``) and first query rows (``q_start``) stay device
tensors that the kernel reads, and the tile lists were made once per template (``range_lists``), sized by bounds the
shapes fix (the block table's capacity in keys), so the launch is the same at every step of a growing cache and a
CUDA graph captured once replays it.

The lists are the mask's classification of every (range of query positions, list class, KV tile), and of every
pair of consecutive ranges, by interval reasoning over the range's positions and the tile's keys (the host
classifier's rules, ``device_intervals``): FULL only where every pair is allowed, PARTIAL where some pair may be (the
kernel evaluates the mask there, so the answer is exact whatever the classes). A program takes the lists of the
range its Q tile's positions fall in (a Q tile of at most ``POSITION_RANGE`` queries spans one range or two) and
cuts them at its row's KV tiles by a binary search of the ascending list (``_entries_below`` in the kernel); the
keys past the row's length in its last tile are masked by the length, in the FULL loop too. Where the mask reads
the head, the group's lists (FULL where FULL for every head of it) serve its packed query heads, as
``grouped.group_lists``. A range is ``POSITION_RANGE`` positions, larger where the capacity would make more than
``MAX_RANGES`` (the lists' memory: ranges x 2 x classes x their widths, int32).

It serves the self-attention patterns whose module has ``attnc_fwd_paged`` (``KernelSource.paged_forward_applies``:
FoX gates only without a route (each call's prefix sums over the capacity, each packed row reading its own head's),
a sequence, no input made per call but cluster ids (``paged_clusters``), a route only where one is chosen per call on
the device: ``paged_routes`` for blocks, ``paged_tokens`` for single keys) and whose terms the template's lists serve at any
length (``_terms_served``): a mask that names positions, the head, the row's length (read by the kernel as the row's
key count) and inputs the caller gives (read by the kernel at each call at the row's positions, its batch entry; the
lists take any value for them, so their tiles are PARTIAL where the positions allow a pair); a bias that names no
growing size and reads inputs, if at all, at the query's or key's position and the head; a softcap that reads none:
``applies``. Forward only.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.interval_numbers import Num
from ....compiler.analysis.route_blocks import route_sizes
from ....compiler.analysis.schedule import TileSchedule
from ....compiler.analysis.tiles import head_classes
from ....compiler.codegen.triton.paged_lines import DERIVED_ON_DEVICE, QUERY_TABLES
from ....compiler.codegen.triton.source import (
    ROW_LENGTHS,
    ScheduleShape,
    but_row_lengths,
    generate_source,
)
from ....compiler.cost.decode_cost import PACKED_ROWS
from ....compiler.cost.decode_cost import split_kv as split_rule
from ....compiler.cost.model import KernelConfig
from ....compiler.cost.search import block_config
from ....core import ir, route_kinds
from ....core import symbols as S
from ...checks import PAGED_VALUES_FAILED
from ...plan import decode_lists, tile_plan
from ...plan.device_intervals import DeviceIntervals
from ...plan.device_tiles import compact
from ...tritonenv import interpreting
from . import (
    blocks,
    paged_antidiagonal,
    paged_clusters,
    paged_flags,
    paged_routes,
    paged_stripes,
    paged_tables,
    paged_tokens,
    split_kv,
)
from . import forward as F
from . import kernel_launch as KL
from . import launcher as launcher_of
from .paged_queries import queries_of, score_scaled

#: KV tile of the paged forward, in keys (any page size: each key's page is looked up).
PAGED_KV_TILE = 64
#: What makes the inputs a pattern derives from q and k (``paged_lines.DERIVED_ON_DEVICE``), each
#: ``(template, queries, k_cache, block_table, seqlens, inputs, scale) -> inputs``.
DERIVERS = (paged_clusters.derive, paged_tables.derive, paged_flags.derive)


def applies(pat) -> bool:
    """Whether a paged call of ``pat`` runs in one launch of ``attnc_fwd_paged`` (module docstring)."""
    return (
        isinstance(pat, ir.PatternIR)
        and pat.self_attention
        and (pat.route is None or (pat.decay is None and _route_served(pat)))
        and pat.queries.kind == "seq"
        and pat.keys.kind == "seq"
        and not pat.queries.segments
        and not pat.keys.segments
        and _terms_served(pat)
    )


def _route_served(pat) -> bool:
    """Whether the one launch chooses ``pat``'s route on the device: top-k blocks or tokens (``paged_routes``,
    ``paged_tokens``), or a prefill method's selection across a block's queries (``paged_antidiagonal``,
    ``paged_stripes``)."""
    return paged_routes.applies(pat) or paged_antidiagonal.applies(pat) or paged_stripes.applies(pat)


def _terms_served(pat) -> bool:
    """Whether a paged template's module and lists, made once, serve every call of ``pat``: a mask naming positions,
    the head, the template's sizes, the row's length (``names_row_length``) and inputs the caller gives (read by the
    kernel at each call, any value to the lists); a bias and softcap naming no growing size and no input."""
    # made at each call: cluster ids over the pool (``paged_clusters``), the tables of the present queries from q
    # (``paged_tables``), vertical-slash flags from each row's last queries (``paged_flags``: forced units that name
    # no length)
    if not _derived_served(pat):
        return False
    # an input read at the query's or the key's own position, and the head (never out of its range: the ordinary
    # call's check of a shifted index, doc[k - 1], reads the values)
    terms = [e for e in (pat.mask, pat.bias, pat.softcap) if isinstance(e, sympy.Basic)]
    tables = {decl.name for decl in pat.inputs if decl.derived is not None and decl.derived[0] in QUERY_TABLES}
    flags = {decl.name for decl in pat.inputs if decl.derived is not None and decl.derived[0] == "vertical_slash"}
    for site in (site for e in terms for site in E.input_sites(e)):
        if S.input_name(site.func) in tables:  # read at the query's row in q: its row index the query's own
            if site.args[1] != S.Q:
                return False
        elif S.input_name(site.func) not in flags and set(site.args) - {S.Q, S.K, S.H}:
            return False  # (a diagonal flag's index, q - k + n - 1, is in range wherever k <= q < n)
    if pat.softcap is not None and E.input_names(pat.softcap):
        return False
    if pat.bias is not None and not pat.bias.free_symbols <= decode_lists.LENGTH_FREE:
        return False
    mask = pat.mask
    if not isinstance(mask, sympy.Basic):
        return True
    # a window of fixed size, dilation and stride (the kernel's)
    if any(not isinstance(a, sympy.Integer) for w in mask.atoms(S.Window) for a in w.args[3:6]):
        return False
    return mask.free_symbols <= decode_lists.LENGTH_FREE | ROW_LENGTHS


def _derived_served(pat) -> bool:
    """Whether every input ``pat`` makes from q and k is one the paged call makes on the device (above)."""
    for decl in pat.inputs:
        if decl.derived is None:
            continue
        if decl.derived[0] not in DERIVED_ON_DEVICE:
            return False
        if decl.derived[0] != "vertical_slash":
            continue
        rule = decl.derived[2]
        keeps = [e for e in (rule.keep_columns, rule.keep_diagonals) if isinstance(e, sympy.Basic)]
        if any(e.free_symbols & ROW_LENGTHS for e in keeps):
            return False
    return True


def names_row_length(pat) -> bool:
    """Whether ``pat``'s mask names the sequence's length (NATTEN's windows, shifted inward at its end; MoA's spans
    that grow with it): the template's module reads it as each row's key count (``KernelSource.row_lengths``), its
    lists hold for any."""
    return bool(getattr(pat.mask, "free_symbols", set()) & ROW_LENGTHS)


@dataclasses.dataclass
class PagedTemplate:
    """What every paged call of one batch shape shares: the launch state (module, plan, config), the mask the
    lists are classified on, and the sizes the lists are made at."""

    launch: KL.Launch
    source: str
    mask: object
    classes: int  # list classes of the mask: every query head where it reads the head, else one
    group: int  # query heads per K/V head
    tile: int  # queries of one head in a Q tile
    kv_tile: int
    q_tiles: int
    kv_tiles: int
    capacity: int  # keys a row's block table holds
    range: int  # query positions of one range of the lists (range_of)
    ranges: int
    route_block: int = 0  # a routed pattern's key block (its lists made per call: ``paged_routes``)
    windows: dict = dataclasses.field(default_factory=dict)  # window bounds per device (device_intervals)
    tables: dict = dataclasses.field(default_factory=dict)  # device -> its lists and launch (range_lists)
    #: per batch shape: (rows, n, device) -> (q_start, q_count) of equal rows; ("splits", ...) -> split count;
    #: ("flags", rows, device) -> the rows' check flags
    uniform: dict = dataclasses.field(default_factory=dict)


def template(runner, load, q: torch.Tensor, kv_heads: int, dv: int, max_q: int, capacity: int) -> PagedTemplate:
    """The template of paged calls with q ``q`` (``[B | 1, Hq, rows, D]``), ``kv_heads`` K/V heads, rows of at most
    ``max_q`` queries and tables of ``capacity`` keys: made at the first such call, kept in the runner's
    ``block_plans`` (the source does not depend on any length: one compiled module for every step). ``load(source,
    interpret)``: the module of a source (the runner's)."""
    heads, head_dim = q.shape[1], q.shape[-1]
    key = (
        "paged",
        heads,
        kv_heads,
        max_q,
        capacity,
        q.device.type,
        head_dim,
        dv,
        q.dtype,
        runner.native,
    )
    made = runner.block_plans.get(key)
    if made is not None:
        return made
    pat = runner.pattern
    group = heads // kv_heads
    tile = max(1, min(max_q, PACKED_ROWS // group))
    kv_tile = min(PAGED_KV_TILE, capacity)
    whole = E.bind_sizes(pat, n=capacity, nk=capacity, heads=heads, dk=head_dim)
    bound = E.block_bound(whole, capacity - max_q, max_q, 0, capacity)
    config = KernelConfig((tile,), (kv_tile,), "flat")
    hw = blocks.block_hardware(runner, q)
    if hw is not None:  # launch parameters under which the forward fits on this GPU
        config = block_config(pat, bound, config, head_dim, q.element_size(), hw)
    one = torch.zeros(
        1, dtype=torch.int64
    )  # the template's own schedule is never launched: each call lists
    sched = TileSchedule.from_pairs(
        (max_q,),
        (capacity,),
        (tile,),
        (kv_tile,),
        heads,
        1,
        one,
        one,
        one,
        torch.ones(1, dtype=torch.bool),
        torch.zeros(1, dtype=torch.float64),
        False,
        False,
    )
    plan = tile_plan.Plan.build(pat, bound, sched)
    shape = ScheduleShape.of(sched)
    interpret = q.device.type != "cuda" and not runner.native
    row_lengths = names_row_length(pat)  # the mask's length is each row's, read by the kernel
    tables = any(decl.derived is not None and decl.derived[0] in QUERY_TABLES for decl in pat.inputs)
    source = generate_source(pat, bound, shape, config, row_lengths=row_lengths, query_rows=tables)
    module = load(source, interpret)
    _, extra, checks = blocks.launch_extras(runner, bound, plan, q.device)
    launch = KL.Launch(
        module,
        interpret,
        config,
        shape,
        plan,
        pat,
        bound,
        {},
        frozenset(),
        {},
        (0, 0),
        extra,
        checks,
    )
    made = runner.block_plans[key] = PagedTemplate(
        launch,
        source,
        but_row_lengths(pat.mask, bound) if row_lengths else E.substitute(pat.mask, bound),
        head_classes(pat, bound),
        group,
        tile,
        kv_tile,
        -(-max_q // tile),
        -(-capacity // kv_tile),
        capacity,
        range_of(capacity),
        -(-capacity // range_of(capacity)),
        route_sizes(pat, bound)[0][0] if pat.route is not None else 0,
    )
    return made


#: Query positions one row of a template's lists covers at least: a Q tile (at most ``PACKED_ROWS`` queries of a
#: head) spans at most two ranges. Larger caches take larger ranges (``range_of``), so the lists stay small.
POSITION_RANGE = PACKED_ROWS
#: The most ranges a template's lists hold (each range a row of lists per class, each pair of ranges another).
MAX_RANGES = 1024


def range_of(capacity: int) -> int:
    """Query positions per range: ``POSITION_RANGE``, doubled until the table's capacity makes at most
    ``MAX_RANGES`` ranges."""
    size = POSITION_RANGE
    while -(-capacity // size) > MAX_RANGES:
        size *= 2
    return size


def range_lists(t: PagedTemplate, device) -> dict:
    """The template's lists on ``device``, made once and read by every call's kernel (nothing made per call):
    per (range of ``t.range`` query positions, list class) and per (pair of consecutive ranges, class), the KV
    tiles where the mask holds for every query of the range(s) and key of the tile (``FULL_N``, ``FULL_I``) and
    those where it may hold otherwise (``PART_N``, ``PART_I``), ascending, by interval reasoning
    (``device_intervals``, the host classifier's rules); where the mask reads the head, the classes are the K/V
    groups (FULL where FULL for every head of the group). The kernel takes the lists of its Q tile's range, or
    pair, and cuts them at its row's KV tiles; a tile FULL here whose keys are not all cached is masked by the
    row's length in the FULL loop, as a block's last tile is. With them, ``FULL_STEPS`` / ``PART_STEPS``, the
    halvings of the kernel's search of a list, and ``cls``."""
    key = torch.device(device)
    made = t.tables.get(key)
    if made is not None:
        return made
    ranges, nkv = t.ranges, t.kv_tiles
    q_lo = torch.arange(ranges, device=device, dtype=torch.int64) * t.range
    q_hi = (q_lo + t.range).clamp(max=t.capacity) - 1
    k_lo = torch.arange(nkv, device=device, dtype=torch.int64) * t.kv_tile
    k_hi = (k_lo + t.kv_tile).clamp(max=t.capacity) - 1
    f64 = torch.float64
    env = {S.Q: Num(q_lo.to(f64).view(-1, 1, 1), q_hi.to(f64).view(-1, 1, 1)),
           S.K: Num(k_lo.to(f64).view(1, 1, -1), k_hi.to(f64).view(1, 1, -1))}
    # a mask naming the length reads each row's: more than the range's first position, at most the capacity
    env.update(dict.fromkeys(ROW_LENGTHS, Num((q_lo + 1).to(f64).view(-1, 1, 1), torch.full_like(q_lo, t.capacity,
                                                                                             dtype=f64).view(-1, 1, 1))))
    if t.classes > 1:  # the mask reads the head: the class is the head
        env[S.H] = torch.arange(t.classes, device=device).view(1, -1, 1)
    elif t.launch.bound.heads == 1:
        env[S.H] = 0
    unknown = {decl.name: decl.dtype for decl in t.launch.pattern.inputs}  # read by the kernel, any value here
    result = DeviceIntervals(env, {}, {S.Q, S.K}, t.windows, {}, unknown).boolean(t.mask)
    shape = (ranges, t.classes, nkv)
    listed = torch.zeros(shape, dtype=torch.bool, device=device) | result.t
    full = ~(torch.zeros(shape, dtype=torch.bool, device=device) | result.f)
    if t.classes > 1:  # the group's: FULL where FULL for every head of it
        groups = t.classes // t.group
        full = full.view(ranges, groups, t.group, nkv).all(2)
        listed = listed.view(ranges, groups, t.group, nkv).any(2)
    # then each pair of consecutive ranges (the last one's pair is never read: its range's own)
    full = torch.cat([full, full & torch.cat([full[1:], full[-1:]])])
    listed = torch.cat([listed, listed | torch.cat([listed[1:], listed[-1:]])])
    classes = full.shape[1]
    index = torch.arange(nkv, device=device, dtype=torch.int64).expand(*full.shape)
    made = {}
    for name, keep in (("FULL", full), ("PART", listed & ~full)):
        count, entries = compact(index, keep)
        width = max(1, int(count.max()))  # once per template: the lists' width
        made[f"{name}_N"] = count.reshape(-1).contiguous()
        made[f"{name}_I"] = entries[..., :width].reshape(-1, width).contiguous()
        made[f"{name}_STEPS"] = width.bit_length()
    made["cls"] = (classes, 1) if classes > 1 else (1, 0)
    t.tables[key] = made
    return made


def rows_of(t: PagedTemplate, batch: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_start, q_count)`` of ``batch`` rows of ``n`` queries each, in ``[B, H, n, D]`` q (each row's at its
    own batch entry): made once per shape and device."""
    key = (batch, n, torch.device(device))
    made = t.uniform.get(key)
    if made is None:
        made = t.uniform[key] = (
            torch.zeros(batch, dtype=torch.int32, device=device),
            torch.full((batch,), n, dtype=torch.int32, device=device),
        )
    return made


def forward(
    runner,
    load,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqlens: torch.Tensor,
    q_start: torch.Tensor | None,
    q_count: torch.Tensor | None,
    max_q: int,
    scale: float,
    inputs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a paged batch: q ``[B, Hq, n, D]`` (each row's n queries at its batch entry: ``q_start``
    and ``q_count`` None) or ``[1, Hq, total, D]`` (row b's ``q_count[b]`` queries from row ``q_start[b]``, at
    most ``max_q``); the pools ``[num_pages, page_size, Hkv, D | Dv]``; row b's keys the first ``seqlens[b]``
    slots of its pages ``block_table[b]``. out ``[B | 1, Hq, rows, Dv]`` in q's dtype, lse fp32. The arguments'
    types and shapes are checked by the caller (``frontends.paged``), their values by the kernel: a row that breaks
    a rule fails the device assert that follows the launch (``PAGED_VALUES_FAILED``; on the CPU at once). ``load`` as
    ``template``'s. ``inputs``: the pattern's inputs, checked by the caller (``frontends.paged.one_launch_inputs``):
    a token dimension of the table's capacity at least, indexed by each row's positions, a leading batch dimension
    of the table's rows where they have one."""
    out, lse, flags = _launch(runner, load, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q, scale,
                              inputs)
    torch._assert_async(flags.min(), PAGED_VALUES_FAILED)  # 0 where a row broke a rule
    return out, lse


def bind(runner, load, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q: int, scale: float):
    """A paged call's launches bound for replay at later calls of its signature (``launcher.bind``):
    ``replay(q, k_cache, v_cache, block_table, seqlens, q_start, q_count) -> (out, lse) | None``, which launches and
    asserts the rows' check flags as ``forward`` does; or None where the launches would copy a tensor of the call
    (a block table of strided rows, lengths or offsets not contiguous int32), one tensor is passed twice (but one
    pool for K and V: the caller's key says so, ``WarmCalls.paged_key``), or the pattern routes (its selection is
    made per call: ``paged_routes``)."""
    if runner.pattern.route is not None or runner.pattern.score_scale is not None:
        return None  # its selection and lists (its scaled queries) are made per call, by ops a replay would skip
    given = [t for t in (q, k_cache, block_table, seqlens, q_start, q_count) if t is not None]
    if any(a is b for i, a in enumerate(given) for b in given[i + 1:]) or block_table.stride(-1) != 1:
        return None
    if v_cache is not k_cache and any(v_cache is t for t in given):
        return None
    if any(_int32(t) is not t for t in (seqlens, q_start, q_count) if t is not None):
        return None
    fixed = (q, k_cache, v_cache, block_table, seqlens, q_start, q_count)
    got: list = []

    def run():
        out, lse, flags = _launch(runner, load, *fixed, max_q, scale)
        got.append(flags)
        return out, lse

    made = launcher_of.bind(run, fixed, q.device.type != "cuda" and not runner.native)
    if made is None or got[0] is not got[1]:
        return None
    flags = got[0]
    made.owner = runner
    made.plan_of = (runner.last_source, runner.last_plan, runner.last_config)

    def replay(*tensors):
        result = made(*tensors)
        if result is not None:
            torch._assert_async(flags.min(), PAGED_VALUES_FAILED)  # 0 where a row broke a rule
        return result

    return replay


def _launch(runner, load, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q: int, scale: float,
            inputs: dict | None = None):
    """``forward``'s launches: ``(out, lse, flags)``, ``flags`` the rows' check flags (int32 ``[B]``, 1 where the
    row's values keep the rules) that the kernel writes."""
    batch, heads, rows, head_dim = q.shape
    num_pages, page, kv_heads, dv = v_cache.shape
    device = q.device
    packed = q_start is not None
    capacity = block_table.shape[1] * page
    # a row holds no more queries than keys
    t = template(runner, load, q, kv_heads, dv, min(max_q, capacity), capacity)
    if not packed:
        q_start, q_count = rows_of(t, batch, rows, device)
    seqlens = _int32(seqlens)
    pat = t.launch.pattern
    derived = any(decl.derived is not None for decl in pat.inputs)
    scaled = pat.score_scale is not None
    qs = queries_of(q, seqlens, q_start, q_count, packed, capacity) if t.route_block or derived or scaled else None
    chosen_by = qs  # a route scores the scaled queries; inputs made from q read them unscaled (the ordinary call's)
    if scaled:  # `scale E`: each query times E at its own position and row, as the contiguous call folds it in
        q, flat = score_scaled(q, qs, pat.score_scale, t.launch.bound)
        chosen_by = dataclasses.replace(qs, flat=flat)
    sel = kept = None
    if t.route_block:  # a routed pattern: this call's selection and the rows' own lists, made on the device
        chooser = {route_kinds.TOPP_ANTIDIAGONAL.name: paged_antidiagonal.select,
                   route_kinds.STRIPES.name: paged_stripes.select}.get(
            pat.route.kind, paged_tokens.select if pat.route.tokens else paged_routes.select)
        sel, lists, kept = chooser(t, q, chosen_by, k_cache, block_table, seqlens, inputs)
        launch = dataclasses.replace(t.launch, lists=lists, cls=lists["cls"])
    else:
        lists = range_lists(t, device)
        launch = lists.get("launch")
        if launch is None:  # the template's launch with its lists on this device, once
            launch = lists["launch"] = dataclasses.replace(t.launch, lists=lists, cls=lists["cls"])
    runner.last_source, runner.last_plan, runner.last_config = t.source, launch.plan, launch.config
    if pat.inputs:  # this call's inputs the kernel reads (a route's own were scored by ``select``)
        inputs = inputs or {}
        for derive in DERIVERS if derived else ():  # made from q and k on the device
            inputs = derive(t, qs, k_cache, block_table, seqlens, inputs, scale)
        read = _kernel_inputs(pat, inputs)
        launch = dataclasses.replace(launch, tensors=read, unread=frozenset(
            decl.name for decl in launch.pattern.inputs if decl.name not in read), batched=frozenset(
            decl.name for decl in launch.pattern.inputs if decl.name in read
            and read[decl.name].dim() == len(decl.dims) + 1),
            extra={key: value for key, value in launch.extra.items() if not key.startswith("in:")})
    rows_b = block_table.shape[0]
    splits = _splits(t, rows_b, kv_heads, KL.sms_of(device))
    out = torch.empty(batch, heads, rows, dv, dtype=q.dtype, device=device)
    lse = torch.empty(batch, heads, rows, dtype=torch.float32, device=device)
    partial = split_kv.partials(splits, batch, heads, rows, dv, device) if splits > 1 else None
    if packed:  # q's rows past the last row's queries (a serving loop's padding): zeros, lse -inf
        for t_out, t_lse in [(out, lse)] + ([partial] if partial is not None else []):
            F.fill_or_record(t_out, 0.0)
            F.fill_or_record(t_lse, float("-inf"))
    dest = F.forward_outputs(out, lse, partial)
    if packed:  # every row's queries in the one batch entry, from its own first row
        dest = {name: (t, 0, *rest) for name, (t, _, *rest) in dest.items()}
    table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    flags = _row_flags(t, rows_b, device)
    lists = launch.lists
    named = {  # every value the kernel may read, by its parameter's name (it takes those its body reads)
        "Q": (q, 0 if packed else q.stride(0), q.stride(1), q.stride(2)),
        "K": (k_cache, k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)),  # page, head, slot
        "V": (v_cache, v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)),
        **dest, **KL.common_args(launch, device, KL.decay_cumsum(launch, device), row_sizes=False),
        "BT": (table, table.stride(0)), "SEQ": seqlens, "QS": _int32(q_start), "QN": _int32(q_count),
        "Q_ROWS": rows, "NUM_PAGES": num_pages, "MAX_KEYS": t.capacity, "RANGES": t.ranges, "MAX_Q": max_q,
        "OK": flags, **KL.sizes(scale, t.group, head_dim, dv),
    }
    if sel is not None:  # indexed as q's rows: a packed call's by their rows, batch entry 0
        named["SEL"] = (sel, 0 if packed else sel.stride(0), sel.stride(1), sel.stride(2))
    kernel = launch.module.attnc_fwd_paged
    blocks_meta = KL.block_sizes(launch, head_dim, dv)
    meta = dict(
        blocks_meta,
        BLOCK_M=max(16, 1 << (t.group * t.tile - 1).bit_length()),
        DOT=KL.dot_mode(launch, q.dtype),
        PAGE=page,
        POOL_ROWS=_pool_rows(k_cache, v_cache, page, num_pages),
        RANGE=t.range,
        FULL_STEPS=lists["FULL_STEPS"],
        PART_STEPS=lists["PART_STEPS"],
        FULL_RUN=False,
        PART_RUN=False,
        **F.scale_sign(launch, scale),
    )
    grid = (t.q_tiles, rows_b * kv_heads)
    if partial is not None:
        grid, meta = (*grid, splits), {**meta, "SPLIT_KV": True}
    with interpreting(launch.interpret):
        F.record_or_launch(launch, kernel, grid, named, meta, backward=False)
        if partial is not None:
            F.combine_splits(launch, *partial, out, lse)
    paged_routes.keep(kept, flags)  # an open KeySummary keeps the rows whose values the kernel found right
    return out, lse, flags


def _kernel_inputs(pat, inputs: dict) -> dict:
    """The inputs the kernel's terms read (the mask's and the bias's: not a token route's indexer, scored before)."""
    names = {name for e in (pat.mask, pat.bias, pat.softcap) if isinstance(e, sympy.Basic) for name in E.input_names(e)}
    names |= {pat.decay} if pat.decay is not None else set()  # FoX gates: their prefix sums over the capacity
    return {name: t for name, t in inputs.items() if name in names}


def _row_flags(t: PagedTemplate, rows: int, device) -> torch.Tensor:
    """The rows' check flags the kernel writes (int32 ``[rows]``), kept per batch shape and device: every launch
    writes each row's (no reset), and a captured graph reads the same tensor at every replay."""
    key = ("flags", rows, torch.device(device))
    made = t.uniform.get(key)
    if made is None:
        made = t.uniform[key] = torch.ones(rows, dtype=torch.int32, device=device)
    return made


def _pool_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, page: int, num_pages: int) -> bool:
    """Whether both pools are rows of whole pages (a page's stride ``page`` slots'), so that one int32 slot index
    (page * page_size + slot, below 2**31) addresses a key and its value: fewer live registers than two int64
    offsets (the kernel spilled 56 B on sm_80 at 2 stages, d 128, with them)."""
    return (k_cache.stride(0) == page * k_cache.stride(1) and v_cache.stride(0) == page * v_cache.stride(1)
            and num_pages * page < 2**31)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _splits(t: PagedTemplate, rows: int, kv_heads: int, sms: int) -> int:
    """The split count (``split_kv``): forced, or 1 where the programs fill the SMs, else the decode model's rule
    on the lists' widths (the most tiles a row may visit: nothing is read back)."""
    forced = split_kv.forced_splits()
    if forced is not None:
        return forced
    if t.q_tiles * rows * kv_heads >= sms:
        return 1
    key = ("splits", rows, kv_heads, sms)
    if key not in t.uniform:  # the rule on the host's ints, once per batch shape
        t.uniform[key] = split_rule([t.kv_tiles], rows * kv_heads, sms).splits
    return t.uniform[key]


__all__ = ["PAGED_KV_TILE", "PagedTemplate", "applies", "bind", "forward", "range_lists", "template"]
