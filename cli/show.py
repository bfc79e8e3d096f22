"""``attnc show``: a pattern's mask drawn (text, PNG or ``--json``), its tiles, one query's keys, a combined
pattern's branches, a recurrence's rule."""

from __future__ import annotations

from ..core.errors import SpecError
from .args import (
    call_inputs,
    int_sizes,
    load_args,
    tile_arg,
    tokens_of,
)
from .output import note as _note
from .output import print_json as _print_json
from .refusals import refuse_bucketed as _refuse_bucketed

#: Tokens drawn where --n is not given.
SHOW_DEFAULT_N = 32
#: The head dimension of the sampled q and k from which `attnc show` draws a clustering pattern's ids.
SHOW_HEAD_DIM = 64
SHOW_DEFAULT_AXIS = 8
SHOW_MAX_TOKENS = 4096
#: Characters per row of a drawn mask: a larger mask is drawn pooled, each character a square of pairs
SHOW_MAX_COLUMNS = 160
SHOW_MAX_TILES = 256
#: the most queries or keys a tile map classifies (``--tiles``: 4M tokens took 380 MB)
SHOW_MAX_TILE_TOKENS = 1 << 24


def cmd_show(args) -> int:
    from ..core import ir

    args.notes, args.shown = [], []  # --json: the notes, and each drawing as a dict
    if args.png is not None and not args.png.strip():
        raise SpecError("--png takes the path of the PNG picture to write", where="argument --png",
                        hint="e.g. --png mask.png")
    if args.png is not None and not args.png.lower().endswith(".png"):
        raise SpecError(f"{args.png}: --png writes a PNG picture, so the path ends in .png",
                        where="argument --png", hint=f"e.g. --png {_png_name(args.png)}")
    pat = load_args(args)
    _refuse_bucketed(pat, "show")
    heads = args.heads
    if heads is not None and heads < 1:
        raise SpecError(f"must be a positive int, got {heads}", where="argument --heads")
    if args.query is not None and not isinstance(pat, ir.PatternIR):
        what = "a recurrence" if isinstance(pat, ir.RecurrenceIR) else "a combined pattern"
        raise SpecError(f"'{pat.name}' is {what}: --query draws one softmax pattern's keys", where="argument --query")
    if isinstance(pat, ir.RecurrenceIR):
        status = _show_recurrence(args, pat, heads or 4)
    elif isinstance(pat, ir.CombinedIR):
        status = _show_combined(args, pat, heads)
    else:
        status = _show_softmax(args, pat, heads)
    if args.json:
        data = args.shown[0] if len(args.shown) == 1 else {"name": pat.name, "kind": "combined",
                                                           "branches": args.shown}
        _print_json({**data, "notes": args.notes})
    return status


def _png_name(path: str) -> str:
    import os

    return os.path.splitext(path)[0] + ".png"


def _show_combined(args, pat, heads: int | None) -> int:
    """``attnc show`` of a combined pattern: each branch's mask in turn (a pooled branch's keys are its runs)."""
    if args.png:
        raise SpecError(f"'{pat.name}' combines several attentions: --png draws one mask", where="argument --png",
                        hint="show it without --png (each branch in turn)")
    if args.nk is not None:
        raise SpecError(f"'{pat.name}' combines attentions over one sequence: show draws each branch over --n tokens",
                        where="argument --nk", hint="leave --nk out (a pooled branch's keys are its runs)")
    n = args.n if args.n is not None else SHOW_DEFAULT_N
    if args.n is None:
        _note(args, f"no --n: showing {SHOW_DEFAULT_N} tokens")
    if pat.merge == "softmax":
        terms = f"one softmax over the keys of {', '.join(b for _, b in pat.terms)}"
    else:
        terms = " + ".join(b if g is None else f"{g} * {b}" for g, b in pat.terms)
    if not args.json:
        print(f"{pat.name}: {len(pat.branches)} branches over the same queries, combined as {terms}")
    for b in pat.branches:
        nk = None
        if b.pool is not None:
            nk = -(-n // int(b.pool[1]))
            said = f"# branch {b.name}: keys pooled by {b.pool[0]} over runs of {b.pool[1]} tokens (k is a run, {nk} runs)"
        else:
            said = f"# branch {b.name}" + (f": its route is scored by probs({b.probs_of})" if b.probs_of else "")
        if not args.json:
            print()
            print(said)
        extra = {}
        if b.probs_of is not None:  # the mask before selection does not read the route's scores
            import torch

            blocks = -(-n // int(b.pattern.route.block[0]))
            extra[b.pattern.route.scores_input] = torch.zeros(heads or 1, n, blocks)
        status = _show_softmax(args, b.pattern, heads, n=n, nk=nk, extra=extra)
        if status:
            return status
    return 0


def _show_softmax(args, pat, heads: int | None, n: int | None = None, nk: int | None = None,
                  extra: dict | None = None) -> int:
    from ..compiler.analysis import evaluate as E

    sizes = int_sizes(args.sizes, pat)
    needed = {str(s).removeprefix("size_") for lay in (pat.queries, pat.keys) for e in lay.extents() for s in e.free_symbols}
    defaulted = sorted(needed - set(sizes))
    for name in defaulted:
        sizes[name] = SHOW_DEFAULT_AXIS
    if defaulted:
        _note(args, f"no --sizes for {', '.join(defaulted)}: showing {SHOW_DEFAULT_AXIS} each "
              f"(--sizes {','.join(f'{d}=..' for d in defaulted)})")
    if n is None:  # (a combined pattern's branch: n and nk given, the note said once)
        n = tokens_of(args, pat, SHOW_DEFAULT_N)
        if args.n is None and n == SHOW_DEFAULT_N and pat.queries.token_count() is None:
            _note(args, f"no --n: showing {SHOW_DEFAULT_N} tokens")
        nk = args.nk if args.nk is not None else (n if pat.keys.token_count() is None and not pat.self_attention else None)
    depends_on_head = any(str(s) == "h" for s in pat.mask.free_symbols)
    heads = heads or (4 if depends_on_head else 1)
    # --nk beyond --n on a self-attention: the queries are the last n of nk tokens (after a KV cache)
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes, dk=SHOW_HEAD_DIM, offset_ok=True)
    inputs = {**call_inputs(args.input), **(extra or {})}
    if any(d.derived is not None for d in pat.inputs):  # cluster(): ids of a seeded sample of q and k
        from ..runtime.plan.clusters import sample_derived

        inputs, notes = sample_derived(pat, bound, inputs, head_dim=SHOW_HEAD_DIM)
        for note in notes:
            _note(args, note)
    # checked before anything is allocated; blame what set the size
    what = "--sizes" if pat.queries.token_count() is not None else "--nk" if args.nk is not None and bound.n <= SHOW_MAX_TOKENS else "--n"
    from ..runtime.tuning.kernel_cache import human_size

    if args.tiles or args.q_tile or args.kv_tile:
        if bound.q_offset:
            raise SpecError("the tile map covers a whole sequence's queries, not those after a KV cache",
                            where="argument --nk", hint="leave --nk out with --tiles")
        if max(bound.n, bound.nk) > SHOW_MAX_TILE_TOKENS:  # the tiles' token lists: about 80 bytes a token
            raise SpecError(f"{bound.n} queries x {bound.nk} keys is too large for a tile map (its tiles' token lists "
                            f"alone would need about {human_size(80 * (bound.n + bound.nk))}; at most "
                            f"{SHOW_MAX_TILE_TOKENS} tokens)", where=f"argument {what}",
                            hint="choose a smaller size, or 'attnc sim' for the tile counts at any size")
        return _show_tiles(args, pat, bound, inputs)
    if bound.n * bound.nk > SHOW_MAX_TOKENS * SHOW_MAX_TOKENS:
        need = bound.n * bound.nk * bound.heads  # one byte per (head, query, key)
        raise SpecError(f"{bound.n} queries x {bound.nk} keys is too large to show (the mask alone would need "
                        f"{human_size(need)}; at most {SHOW_MAX_TOKENS} x {SHOW_MAX_TOKENS})",
                        where=f"argument {what}", hint="choose a smaller size")
    if pat.route is not None:
        _note(args, "a route selects at every call (from q and k, or its inputs); this shows the mask before "
              "the selection")
        import dataclasses

        pat = dataclasses.replace(pat, route=None)  # the mask alone: the inputs only the route reads are not needed
    mask = E.mask_tensor(pat, bound, inputs)[0]
    title = f"{pat.name}: {pat.queries.describe()}"
    if bound.axis_sizes:
        title += " with " + ", ".join(f"{k}={v}" for k, v in bound.axis_sizes.items())
    title += (f", {bound.n} queries (the last of {bound.nk} tokens, after a KV cache)" if bound.q_offset
              else f", {bound.n} queries") + f" x {bound.nk} keys"
    shown_heads = range(heads) if depends_on_head else range(1)
    if args.query is not None:
        from .neighbourhood import show_query

        return show_query(args, pat, bound, mask, list(shown_heads) if depends_on_head else [0])
    if args.json:
        args.shown.append({"name": pat.name, "kind": "pattern", "layout": pat.queries.describe(),
                           "keys_layout": pat.keys.describe(), "sizes": dict(bound.axis_sizes), "n": bound.n,
                           "nk": bound.nk, "q_offset": bound.q_offset,
                           "heads": [{"head": h, "density": mask[h].double().mean().item(),
                                      "mask": mask[h].to(int).tolist()} for h in shown_heads]})
        if args.png:
            from ..png import write_mask_png

            write_mask_png(args.png, mask[list(shown_heads)])
        return 0
    if args.png:  # the picture only, and one line saying what it holds (no text dump)
        from ..png import write_mask_png

        write_mask_png(args.png, mask[list(shown_heads)])
        density = mask[list(shown_heads)].double().mean().item()
        heads_note = f", {len(shown_heads)} heads" if depends_on_head else ""
        print(f"wrote {args.png}: {title}{heads_note} (density {density:.3f})")
        return 0
    cell = -(-max(bound.n, bound.nk) // SHOW_MAX_COLUMNS)  # pairs per character along each side
    if cell > 1:
        title += f"; each character {cell} x {cell} pairs: # all allowed, + some, . none (--png draws every pair)"
    for h in shown_heads:
        density = mask[h].double().mean().item()
        print(f"{title}" + (f", head {h}" if depends_on_head else "") + f" (density {density:.3f})")
        for row in _pooled_rows(mask[h], cell):
            print(row)
        if h != shown_heads[-1]:
            print()
    return 0


def _pooled_rows(mask, cell: int) -> list[str]:
    """The rows of a bool mask ``[n, nk]`` as text, ``cell`` x ``cell`` pairs a character."""
    import torch

    if cell == 1:
        return ["".join("#" if x else "." for x in row.tolist()) for row in mask]
    n, nk = mask.shape
    padded = torch.zeros(-(-n // cell) * cell, -(-nk // cell) * cell, dtype=torch.int32)
    counted = torch.zeros_like(padded)
    padded[:n, :nk] = mask.to(torch.int32)
    counted[:n, :nk] = 1
    pool = lambda x: x.view(x.shape[0] // cell, cell, x.shape[1] // cell, cell).sum((1, 3))  # noqa: E731
    allowed, pairs = pool(padded), pool(counted)
    return ["".join("#" if a == c else "." if a == 0 else "+" for a, c in zip(ra.tolist(), rc.tolist(), strict=True))
            for ra, rc in zip(allowed, pairs, strict=True)]


def _show_recurrence(args, rec, heads: int) -> int:
    import contextlib
    import io
    import math

    from ..compiler.analysis import evaluate as E
    from ..core.recurrence_rules import RULES

    rule = RULES[rec.rule]
    data = {"name": rec.name, "kind": "recurrence", "rule": rec.rule, "gate": rec.gate,
            "decay": rec.decay if isinstance(rec.decay, str) else None, "rates": list(rec.rates or ()), "heads": []}
    if rec.gate == "head":
        values = E.head_values(rec.decay, {E.S.HEADS: heads}, heads)
        data["heads"] = [{"head": h, "log_decay": g, "decay": math.exp(g)} for h, g in enumerate(values.tolist())]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _print_recurrence(rec, rule, data)
    if args.json:
        args.shown.append({**data, "text": text.getvalue().splitlines()})
    else:
        print(text.getvalue(), end="")
    return 0


def _print_recurrence(rec, rule, data: dict) -> None:
    print(f"{rec.name}: recurrence, {rec.gate} gate" + (f", {rule.title}" if rule.rates else ""))
    if rule.rates:
        given = ", ".join(f"'{name}' ({what})" for name, what in zip(rec.rates, rule.rates, strict=True))
        print(f"update: {rule.update} after the decay; rates, call-time inputs per token and head: {given}")
        if rec.qk_l2norm:
            print("q and k: divided by their L2 norm over the head dimension first, x / sqrt(sum(x^2) + 1e-6) (qk_l2norm)")
    if rec.gate != "head":
        print(f"decay is the call-time input '{rec.decay}' ({'per token and head' if rec.gate == 'scalar' else 'per token, head and key channel'})")
        return
    for h in data["heads"]:
        print(f"head {h['head']}: log decay {h['log_decay']:.6g}, per-step decay {h['decay']:.6g}")


def _default_tile(extents: tuple[int, ...]) -> tuple[int, ...]:
    """A tile giving a small map: about 16 tiles on a sequence, 4 per grid axis."""
    per = 16 if len(extents) == 1 else 4
    return tuple(1 << (max(1, L // per).bit_length() - 1) for L in extents)


def _show_tiles(args, pat, bound, inputs: dict) -> int:
    import torch

    from ..compiler.analysis import tiles as T
    from ..compiler.cost.hardware import get_hardware
    from ..compiler.cost.search import ScheduleSearch

    q_ext = T.layout_extents(pat.queries, bound, bound.n)
    kv_ext = T.layout_extents(pat.keys, bound, bound.nk)
    q_tile, kv_tile = tile_arg(args.q_tile, "--q-tile"), tile_arg(args.kv_tile, "--kv-tile")
    if q_tile is None and kv_tile is None:  # else the one convention of compiler.analysis.tile_args (a missing one follows)
        q_tile, kv_tile = _default_tile(q_ext), _default_tile(kv_ext)
    search = ScheduleSearch(pat, bound, get_hardware("h100"), inputs=inputs or None)
    cand = search.run(q_tile, kv_tile, top=1)[0]
    sched = cand.schedule
    if max(sched.num_q_tiles, sched.num_kv_tiles) > SHOW_MAX_TILES:
        raise SpecError(f"{sched.num_q_tiles} x {sched.num_kv_tiles} tiles are too many to draw",
                        where="argument --q-tile", hint="choose larger tiles or smaller sizes")
    classes = sched.classes()
    if pat.route is not None:
        _note(args, "routing depends on q and k; these are the tiles holding the pairs of the simulator's model "
              "of the selection (per query: keep blocks, then the nearest)")
    if args.json:
        args.shown.append({"name": pat.name, "kind": "tiles", "q_tile": list(sched.q_tile),
                           "kv_tile": list(sched.kv_tile), "q_tiles": sched.num_q_tiles,
                           "kv_tiles": sched.num_kv_tiles, "full": sched.full, "partial": sched.partial,
                           "empty": sched.empty, "classes": classes.to(torch.int64).tolist(),
                           "classes_legend": {"0": "empty", "1": "partial", "2": "full"}})
        if args.png:
            from ..png import write_classes_png

            write_classes_png(args.png, classes.to(torch.int64))
        return 0
    print(f"{pat.name}: Q tile {'x'.join(map(str, sched.q_tile))}, KV tile {'x'.join(map(str, sched.kv_tile))}, "
          f"{sched.num_q_tiles} x {sched.num_kv_tiles} tiles: {sched.full} full (#), {sched.partial} partial (+), "
          f"{sched.empty} empty (.)")
    glyph = {0: ".", 1: "+", 2: "#"}
    for h in range(classes.shape[0]):
        if classes.shape[0] > 1:
            print(f"head {h}")
        for row in classes[h].tolist():
            print("".join(glyph[c] for c in row))
    if args.png:
        from ..png import write_classes_png

        write_classes_png(args.png, classes.to(torch.int64))
        print(f"wrote {args.png}")
    return 0
