"""The lines ``attnc_fwd_paged`` has beside the grouped forward's (``kernels.KernelBodies._forward_grouped(paged=True)``):
its parameters, each row's sizes read on the device, K and V read through the block table, and the search that cuts
a range's list at the row's KV tiles. The runtime side is ``runtime.backends.triton.paged``."""

from __future__ import annotations

import sympy

from ....core import route_kinds
from .helpers import DOT_HELPERS
from .signature import Param, constexprs, tensor, value

#: The grouped forward's block sizes that a paged program reads per row instead of taking them.
GIVEN_SIZES = ("Q_OFF", "K_OFF", "Q_EXT", "K_EXT")
#: What a paged program takes besides: the block table (its row stride), each row's key count, first query row and
#: query count, q's rows, the pool's pages, the table's capacity in keys (those three never specialised on: they
#: change between calls), the lists' ranges, the most queries of a row and each row's check flag (``ROW_CHECK``).
PAGED_RUNTIME = [tensor("BT", "sbt_b"), value("SEQ"), value("QS"), value("QN"),
                 *(value(name, fixed=True) for name in ("Q_ROWS", "NUM_PAGES", "MAX_KEYS")),
                 value("RANGES"), value("MAX_Q"), value("OK")]
#: Page ids a row's check reads at once.
CHECK_PAGES = 32
CONSTEXPRS = constexprs("PAGE", "POOL_ROWS", "RANGE", "FULL_STEPS", "PART_STEPS")


#: The derived score tables (``ir.InputDecl.derived``) made from the present queries, ``[B, Hq, queries, ...]``: a
#: paged module (``KernelSource.query_rows``) reads them at the query's row in q.
QUERY_TABLES = ("relative", "landmark")
#: The inputs made from q and k that a paged call makes on the device before its launch (cluster ids over the pool,
#: the present queries' tables, vertical-slash flags: ``runtime.backends.triton.paged``'s ``DERIVERS``).
DERIVED_ON_DEVICE = ("cluster", *QUERY_TABLES, "vertical_slash")


def applies(pat, bound) -> bool:
    """Whether a block module of ``pat`` has ``attnc_fwd_paged`` (its bias reading no input at an index the forward
    must check, which the caller asks): FoX gates only unrouted, a route only where ``route_block`` serves it, inputs the
    caller gives, cluster ids (made per call over the pool: ``scores_pool``) or the present queries' score tables
    (read at the query's row in q: ``KernelSource.query_rows``); no other input made from q and k (a paged row reads
    its inputs at its own positions, its batch entry); on sequences."""
    return ((pat.route is None or (pat.decay is None and route_block(pat, bound) is not None))
            and all(decl.derived is None or decl.derived[0] in DERIVED_ON_DEVICE for decl in pat.inputs)
            and pat.queries.kind == "seq" and pat.keys.kind == "seq" and not pat.queries.segments
            and not pat.keys.segments)


def scores_pool(pat) -> bool:
    """Whether a paged call of ``pat`` scores vectors against every cached key (``attnc_paged_token_scores``): a
    token route by ``q @ k``, the keys' cluster ids (``cluster(k, CENTROIDS)``: each centroid against each key), or
    landmark gates (``landmark(BLOCK)``: each query against its row's keys)."""
    route = pat.route
    return ((route is not None and route.tokens and route.is_top_k() and route.params.indexer is None)
            or any(decl.derived is not None and (decl.derived[:2] == ("cluster", "k")
                                                  or decl.derived[0] in ("landmark", "vertical_slash"))
                   for decl in pat.inputs))


def serves_route(route) -> bool:
    """Whether ``attnc_fwd_paged`` serves ``route``: top-k blocks of one size, scored from their keys' summaries
    (MoBA's means, Quest's bounds: ``attnc_paged_summary``) or given (SeerAttention's gate), one selection per query
    head; or top-k tokens scored
    by ``q @ k`` (``attnc_paged_token_scores``), by indexer inputs (``QI @ KI``, DeepSeek's indexer) or by a score
    per key (DMA); or a prefill method's selection across a block's queries, made for its rows before the launch:
    top-p blocks by antidiagonal scoring (XAttention, ``paged_antidiagonal``), stripes by anchor (AnchorAttention,
    ``paged_stripes``). The paged kernel reads each row's selection (``SEL``) and its own lists."""
    if route is not None and route.kind in (route_kinds.TOPP_ANTIDIAGONAL.name, route_kinds.STRIPES.name):
        return True
    if route is None or route.kind not in (route_kinds.TOPK_BLOCKS.name, route_kinds.TOPK_TOKENS.name):
        return False
    p = route.params
    if p.shared:
        return False
    if route.tokens:
        return p.scores is None and p.score in ("token", "key", "indexer")
    return p.score in ("token", "bound") and len(route.block) == 1


def route_block(pat, bound) -> int | None:
    """The key block of the route ``attnc_fwd_paged`` serves (``serves_route``) at ``bound``, or None."""
    if not serves_route(pat.route):
        return None
    size = sympy.sympify(pat.route.block[0]).subs(bound.subs)
    return int(size) if isinstance(size, sympy.Integer) else None


def runtime_params(common: list[Param]) -> list[Param]:
    """The grouped forward's shared parameters (``_common_params``) as a paged program takes them."""
    return [p for p in common if p.name not in GIVEN_SIZES] + PAGED_RUNTIME


def row_setup(tile: int, kv_tile: int, self_attention: bool, least_keys: int = 1, routed: bool = False
              ) -> list[str]:
    """A program's row: its sizes read on the device (clamped, so a bad table or length never reads out of bounds)
    and whether they keep the rules (``row_fine``, ``row_check``), and the lists of its Q tile's positions
    (``lrow``), cut at ``kv_limit`` KV tiles. ``least_keys``: the fewest keys a row holds (its mask's windows fit
    its length: ``ir.least_length``). ``routed``: the lists are the row's own, per K/V head (its queries'
    selection's: ``runtime.backends.triton.paged_routes``), not its positions' range's."""
    # a row of no queries may hold no key (a serving batch padded to a captured size)
    least = f"tl.where(raw_q > 0, tl.maximum(raw_q, {least_keys}), 0)" if self_attention else \
        f"tl.where(raw_q > 0, {least_keys}, 0)"
    if routed:
        lists = ["# the row's own lists for this K/V head: the KV tiles its queries' selection reaches",
                 f"q_any = qt * {tile} < Q_EXT",
                 "lrow = batch * cls_b + kvh * cls_h"]
    else:
        lists = [
            "# the lists of the Q tile's positions: of the range of RANGE positions they fall in, or of the pair",
            "# of ranges they span (after the RANGES single ones), for this class",
            f"q_any = qt * {tile} < Q_EXT",
            f"r_lo = tl.minimum((Q_OFF + qt * {tile}) // RANGE, RANGES - 1)",
            f"r_hi = tl.minimum((Q_OFF + tl.minimum(qt * {tile} + {tile}, Q_EXT) - 1) // RANGE, RANGES - 1)",
            "lrow = tl.where(r_hi > r_lo, RANGES + r_lo, r_lo) * cls_b + kvh * cls_h"]
    return [
        "# this row's sizes, read on the device (clamped: a bad table or length never reads out of bounds)",
        "raw_k = tl.load(SEQ + batch)",
        "raw_q = tl.load(QN + batch)",
        "raw_first = tl.load(QS + batch)",
        "K_EXT = tl.minimum(tl.maximum(raw_k, 0), MAX_KEYS)  # the row's keys",
        "Q_EXT = tl.minimum(tl.maximum(raw_q, 0), K_EXT)  # its queries",
        "q_first = tl.minimum(tl.maximum(raw_first, 0), Q_ROWS)  # its first query's row in q, out and lse",
        "# whether they keep the rules (its pages are checked at the end: row_fine there)",
        f"row_fine = (raw_k >= {least}) & (raw_k <= MAX_KEYS) & (raw_q >= 0) & (raw_q <= MAX_Q)",
        "row_fine = row_fine & (raw_first >= 0) & (raw_first + raw_q <= Q_ROWS) & ((batch > 0) | (raw_first == 0))",
        ("Q_OFF = K_EXT - Q_EXT  # its queries are the last Q_EXT of its keys" if self_attention
         else "Q_OFF = 0  # cross-attention: the queries keep their own positions"),
        "K_OFF = 0",
        *lists,
        f"kv_limit = (K_EXT + {kv_tile - 1}) // {kv_tile}  # the row's KV tiles"]


def row_check() -> list[str]:
    """One program of each row (its first Q tile, first K/V head and split) checks the row's values as the host
    rules do (``frontends.paged_checks.check_pages``, ``varlen_rows``) and writes ``OK[row]``: its sizes kept the rules
    (``row_fine``, made by ``row_setup``: its key count within [its queries (self-attention; else 1; 0 for a row of no queries), the table's
    capacity], its query count within [0, ``MAX_Q``], its first query row at 0 for the first row and its queries
    within q's rows) and every page id its keys reach is a page of the pool. The host asserts every flag after the
    launch (on the device: no read back); every program read the values clamped, so a bad value never reads out of
    bounds. The page ids are read at the end of the kernel, where nothing of the attention is live (at its start
    the check cost the sm_80 forward 60 B of spills at 2 stages)."""
    return [
        "",
        "# ---- this row's values checked by one of its programs: OK[batch] = 1 where they keep the rules (the",
        "# host asserts every flag after the launch; every program read them clamped)",
        "check_row = (qt == 0) & (kvh == 0)",
        "if SPLIT_KV:",
        "    check_row = check_row & (split == 0)",
        "if check_row:",
        "    reach = (K_EXT + PAGE - 1) // PAGE  # the pages its keys reach",
        f"    p = tl.arange(0, {CHECK_PAGES})",
        "    stray = 0",
        f"    for p0 in range(0, reach, {CHECK_PAGES}):",
        "        ids = tl.load(BT + batch * sbt_b + p0 + p, mask=p0 + p < reach, other=0)  # a table under 2**31 ids",
        "        stray += tl.reduce((((ids < 0) | (ids >= NUM_PAGES)) & (p0 + p < reach)).to(tl.int32), 0, _add)",
        "    tl.store(OK + batch, (row_fine & (stray == 0)).to(tl.int32))"]


#: K's and V's bases: the K/V head's; each key's page is looked up in the loop.
BASES = ["k_base = K + kvh.to(tl.int64) * sk_h  # the page of a key is looked up per key",
         "v_base = V + kvh.to(tl.int64) * sv_h"]

#: A KV tile's keys and values through the row's block table.
KV_LOADS = [
    "k_page = tl.load(BT + batch.to(tl.int64) * sbt_b + k_row // PAGE, mask=k_ok, other=0)",
    "k_page = tl.minimum(tl.maximum(k_page, 0), NUM_PAGES - 1)  # always a page of the pool",
    "if POOL_ROWS:  # pools of whole pages ([num_pages, PAGE, Hkv, D] rows): one slot index for K and V",
    "    k_at = (k_page * PAGE + k_row % PAGE).to(tl.int64)",
    "    kk = tl.load(k_base + k_at[:, None] * sk_n + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)",
    "    vv = tl.load(v_base + k_at[:, None] * sv_n + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), "
    "other=0.0)",
    "else:  # any strides: each address from the page's and the slot's",
    "    k_at = k_page.to(tl.int64) * sk_b + (k_row % PAGE) * sk_n",
    "    kk = tl.load(k_base + k_at[:, None] + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)",
    "    v_at = k_page.to(tl.int64) * sv_b + (k_row % PAGE) * sv_n",
    "    vv = tl.load(v_base + v_at[:, None] + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)"]

#: ``attnc_fwd_paged``'s search of a sorted list (module text, emitted where the module has that kernel).
ENTRIES_BELOW = '''

@triton.jit
def _entries_below(base, n, limit, STEPS: tl.constexpr):
    """How many of the n ascending entries at base are below limit: a binary search of STEPS halvings
    (2**STEPS > n), one scalar load each."""
    lo = n * 0
    hi = n
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        at = tl.load(base + mid, mask=mid < hi, other=0)
        below = (mid < hi) & (at < limit)
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo
'''


def route_lines(block: int) -> list[str]:
    """A PARTIAL tile's selection in ``attnc_fwd_paged`` (a routed pattern): each packed row reads, per key, the word
    of its query's selection (``SEL``: ``[rows' batch, query heads, queries, words]`` bits of the route's blocks of
    ``block`` keys, at ``sel_at``, made by ``route_setup``) holding the key's block, and keeps the keys of the blocks
    it selected."""
    return ["# routing: only the key blocks each row's query selected (the word of each key's block)",
            f"kb = k_tok // {block}  # the route's block of each key",
            "word = tl.load(SEL + sel_at[:, None] + kb[None, :] // 32, mask=q_ok[:, None] & k_ok[None, :], other=0)",
            "allowed = allowed & (((word >> (kb[None, :] % 32)) & 1) != 0)"]


def route_setup(q_rows: str) -> list[str]:
    """Where each packed row's selection starts in ``SEL`` (its batch entry, its own head, its query row)."""
    return [f"sel_at = batch.to(tl.int64) * sel_b + h_row.to(tl.int64) * sel_h + {q_rows}.to(tl.int64) * sel_n"]


#: Block summaries of a paged pool for a block route's scores (module text, emitted with ``attnc_fwd_paged`` where
#: the pattern routes): per (row, K/V head, block of ``BLOCK`` keys) the mean of its cached keys (MoBA's
#: ``q @ mean(k)``) or their per-dimension maximum and minimum (Quest's ``q @ bound(k)``), each key read once
#: through the row's block table. ``runtime.backends.triton.paged_routes`` launches it.
SUMMARY_KERNEL = '''

@triton.jit
def attnc_paged_summary(K, sk_b, sk_h, sk_n, BT, sbt_b, SEQ, KEPT, OUT, so_s, so_b, so_h, so_j, NUM_PAGES,
                        MAX_KEYS, KV_HEADS, NBLOCKS, D, PAGE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_D: tl.constexpr, BOUND: tl.constexpr, KEEPS: tl.constexpr):
    """One program per (route block, row x K/V head), ``NBLOCKS`` blocks a row: the block's summary over the row's cached keys in it (an
    empty block, past the row's keys, gets zeros: it is no candidate). KEEPS: the blocks before KEPT[row] hold
    their summaries from earlier calls (a kept summary): neither read nor written."""
    # one axis: a grid's second may hold no more than 65,535 (rows x K/V heads reach that at 2,048 x 32)
    j = tl.program_id(0) % NBLOCKS
    row = tl.program_id(0) // NBLOCKS // KV_HEADS
    kvh = tl.program_id(0) // NBLOCKS % KV_HEADS
    keys = tl.minimum(tl.maximum(tl.load(SEQ + row), 0), MAX_KEYS)  # clamped: the attention checks the row
    kept = tl.load(KEPT + row) if KEEPS else 0
    d = tl.arange(0, BLOCK_D)
    c = tl.arange(0, CHUNK)
    fresh = d * 0 + j >= kept  # (vectors: the interpreter takes no 0-d mask term)
    total = tl.full([BLOCK_D], 0.0, tl.float32)  # (tl.full: a builtin, as the interpreter needs)
    high = tl.full([BLOCK_D], float("-inf"), tl.float32)
    low = tl.full([BLOCK_D], float("inf"), tl.float32)
    count = j * 0  # an int32 tensor: carried by the loop
    for c0 in range(0, BLOCK, CHUNK):
        pos = j * BLOCK + c0 + c
        ok = (c0 + c < BLOCK) & (pos < keys) & (c * 0 + j >= kept)
        page = tl.load(BT + row.to(tl.int64) * sbt_b + pos // PAGE, mask=ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1)
        at = page.to(tl.int64) * sk_b + (pos % PAGE) * sk_n + kvh.to(tl.int64) * sk_h
        kk = tl.load(K + at[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        if BOUND:
            high = tl.maximum(high, tl.reduce(tl.where(ok[:, None], kk, float("-inf")), 0, _maximum))
            low = -tl.maximum(-low, tl.reduce(tl.where(ok[:, None], -kk, float("-inf")), 0, _maximum))
        else:
            total += tl.reduce(kk, 0, _add)
        count += tl.reduce(ok.to(tl.int32), 0, _add)
    out = OUT + row.to(tl.int64) * so_b + kvh.to(tl.int64) * so_h + j.to(tl.int64) * so_j
    if BOUND:
        tl.store(out + d, tl.where(count > 0, high, 0.0), mask=(d < D) & fresh)
        tl.store(out + so_s + d, tl.where(count > 0, low, 0.0), mask=(d < D) & fresh)
    else:
        tl.store(out + d, total / tl.maximum(count, 1).to(tl.float32), mask=(d < D) & fresh)
'''


#: Combiner's max summaries over a paged pool (``keys pooled(max, SIZE)``): per (run, row x K/V head) the elementwise
#: maximum of the run's cached keys, and for each query head of the group the run's attention over its own keys by the
#: elementwise maximum of its queries, ``softmax(scale * qmax . k_j) v_j`` (``combined.pool_summary``), each key and
#: value read once through the row's block table. ``runtime.backends.triton.paged_max_summaries`` launches it.
MAX_SUMMARY_KERNEL = '''

@triton.jit
def attnc_paged_max_summary(K, sk_b, sk_h, sk_n, V, sv_b, sv_h, sv_n, BT, sbt_b, SEQ, QMAX, sq_b, sq_h, sq_r, KEYS,
                            sko_b, sko_h, sko_r, VALUES, svo_b, svo_h, svo_r, NUM_PAGES, MAX_KEYS, KV_HEADS, NBLOCKS,
                            GROUP, D, DV, scale, PAGE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_G: tl.constexpr, DOT: tl.constexpr):
    """One program per (run j, row x K/V head), ``NBLOCKS`` runs a row: KEYS[row, kvh, j] the elementwise max of the run's cached keys, and
    VALUES[row, head, j] for each query head of the group the online softmax of scale * QMAX[row, head, j] . k over
    the run's keys, times their values (``_dot``: the cache's dtype on tensor cores, qmax exact in it as a max of
    queries; fp32 exact for fp32). A run past the row's keys gets zeros: no query reads it."""
    # one axis: a grid's second may hold no more than 65,535 (rows x K/V heads reach that at 2,048 x 32)
    j = tl.program_id(0) % NBLOCKS
    row = tl.program_id(0) // NBLOCKS // KV_HEADS
    kvh = tl.program_id(0) // NBLOCKS % KV_HEADS
    keys = tl.minimum(tl.maximum(tl.load(SEQ + row), 0), MAX_KEYS)  # clamped: the attention checks the row
    d = tl.arange(0, BLOCK_D)
    e = tl.arange(0, BLOCK_DV)
    g = tl.arange(0, BLOCK_G)
    c = tl.arange(0, CHUNK)
    head = kvh * GROUP + g
    qm = tl.load(QMAX + row.to(tl.int64) * sq_b + head.to(tl.int64)[:, None] * sq_h + j.to(tl.int64) * sq_r
                 + d[None, :], mask=(g[:, None] < GROUP) & (d[None, :] < D), other=0.0)  # [G, D] fp32
    high = tl.full([BLOCK_D], float("-inf"), tl.float32)  # (tl.full: a builtin, as the interpreter needs)
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_DV], 0.0, tl.float32)
    for c0 in range(0, BLOCK, CHUNK):
        pos = j * BLOCK + c0 + c
        ok = (c0 + c < BLOCK) & (pos < keys)
        page = tl.load(BT + row.to(tl.int64) * sbt_b + pos // PAGE, mask=ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1)
        slot = (pos % PAGE).to(tl.int64)
        at_k = page.to(tl.int64) * sk_b + slot * sk_n + kvh.to(tl.int64) * sk_h
        at_v = page.to(tl.int64) * sv_b + slot * sv_n + kvh.to(tl.int64) * sv_h
        kk = tl.load(K + at_k[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        vv = tl.load(V + at_v[:, None] + e[None, :], mask=ok[:, None] & (e[None, :] < DV), other=0.0)
        high = tl.maximum(high, tl.reduce(tl.where(ok[:, None], kk.to(tl.float32), float("-inf")), 0, _maximum))
        s = _dot(qm.to(kk.dtype), tl.trans(kk), DOT) * scale  # [G, CHUNK]
        s = tl.where(ok[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.reduce(s, 1, _maximum))
        base = tl.where(new_top == float("-inf"), 0.0, new_top)  # no key yet: nothing to rescale
        p = tl.exp(s - base[:, None])
        kept = tl.exp(top - base)
        total = total * kept + tl.reduce(p, 1, _add)
        acc = acc * kept[:, None] + _dot(p.to(vv.dtype), vv, DOT)
        top = new_top
    any_key = d * 0 + j * BLOCK < keys  # (vectors: the interpreter takes no 0-d mask term)
    tl.store(KEYS + row.to(tl.int64) * sko_b + kvh.to(tl.int64) * sko_h + j.to(tl.int64) * sko_r + d,
             tl.where(any_key, high, 0.0), mask=d < D)
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(VALUES + row.to(tl.int64) * svo_b + head.to(tl.int64)[:, None] * svo_h + j.to(tl.int64) * svo_r
             + e[None, :], out, mask=(g[:, None] < GROUP) & (e[None, :] < DV))
'''


#: The block summaries alone, as a module of their own: a combined pattern's pooled keys and values over a paged pool
#: (``keys pooled(mean, SIZE)``: each run's mean, the run a block of ``SIZE`` keys; ``keys pooled(max, SIZE)``:
#: Combiner's max summaries), which no branch's module holds (``runtime.backends.triton.paged_routes.pool_means`` and
#: ``paged_max_summaries`` load and launch them).
def summary_module() -> str:
    """The source of a module holding ``attnc_paged_summary`` and ``attnc_paged_max_summary`` alone, with the helpers
    they read (their reductions' combine functions)."""
    header = ('"""attnc generated Triton kernel (do not edit: regenerated).\n\n'
              "attnc_paged_summary      the means (or bounds) of blocks of keys over a paged KV cache\n"
              "attnc_paged_max_summary  Combiner's max summaries of runs of keys and values over a paged KV cache\n"
              '"""\n\nimport triton\nimport triton.language as tl\n')
    return "\n\n".join(part.strip("\n") for part in (header, DOT_HELPERS, SUMMARY_KERNEL, MAX_SUMMARY_KERNEL)) + "\n"


#: A token route's scores over a paged pool (module text, emitted with ``attnc_fwd_paged`` where the pattern routes
#: by ``q @ k`` per token): per (chunk of keys, query, K/V head) the dot of each query head of the group with each of
#: the query's row's cached keys in the chunk, each key read once per query through the row's block table, in fp32.
#: ``runtime.backends.triton.paged_tokens`` launches it.
TOKEN_SCORE_KERNEL = '''

@triton.jit
def attnc_paged_token_scores(Q, sq_x, sq_h, K, sk_b, sk_h, sk_n, BT, sbt_b, SEQ, ROW, OUT, so_x, so_h, NUM_PAGES,
                             MAX_KEYS, GROUP, D, PAGE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_G: tl.constexpr):
    """One program per (chunk of CHUNK keys, query x, K/V head): q . k of the query's heads of the group (Q
    ``[queries, Hq, D]``) with its row's (``ROW[x]``) cached keys in the chunk; a key past the row's keys gets 0
    (the selection's check of the row's length drops it)."""
    c = tl.program_id(0)
    x = tl.program_id(1)
    kvh = tl.program_id(2)
    row = tl.load(ROW + x)
    keys = tl.minimum(tl.maximum(tl.load(SEQ + row), 0), MAX_KEYS)  # clamped: the attention checks the row
    pos = c * CHUNK + tl.arange(0, CHUNK)
    ok = pos < keys
    page = tl.load(BT + row.to(tl.int64) * sbt_b + pos // PAGE, mask=ok, other=0)
    page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1)
    d = tl.arange(0, BLOCK_D)
    at = page.to(tl.int64) * sk_b + (pos % PAGE) * sk_n + kvh.to(tl.int64) * sk_h
    kk = tl.load(K + at[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    for g in tl.static_range(BLOCK_G):  # each query head of the group against the chunk's keys, read once
        head = kvh * GROUP + g
        live = d * 0 + g < GROUP  # (vectors: the interpreter takes no 0-d mask term)
        qq = tl.load(Q + x.to(tl.int64) * sq_x + head.to(tl.int64) * sq_h + d, mask=live & (d < D), other=0.0)
        score = tl.reduce(kk * qq.to(tl.float32)[None, :], 1, _add)
        tl.store(OUT + x.to(tl.int64) * so_x + head.to(tl.int64) * so_h + pos, score,
                 mask=(pos < MAX_KEYS) & (pos * 0 + g < GROUP))
'''
