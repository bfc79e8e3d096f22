"""``attnc show --query A,B,..``: the keys one query attends, drawn on the keys' grid (text, JSON or a
PNG picture with axes and a legend) rather than as a row of the flattened pair matrix."""

from __future__ import annotations

import math

from ..core.errors import SpecError
from .args import int_list


def show_query(args, pat, bound, mask, heads: list[int]) -> int:
    """``mask``: the pattern's bool mask ``[heads, n, nk]`` at ``bound``; ``heads``: those to draw."""
    from ..compiler.analysis.tiles import layout_extents

    for layout, what in ((pat.queries, "queries"), (pat.keys, "keys")):
        if layout.segments:
            raise SpecError(
                f"'{pat.name}' lays its {what} out as {layout.describe()}: --query draws a grid's "
                "(or a sequence's) keys",
                where="argument --query",
                hint="without --query: the whole mask",
            )
    q_axes = pat.queries.axis_names or ("position",)
    k_axes = pat.keys.axis_names or ("position",)
    q_ext = tuple(
        int(e) for e in layout_extents(pat.queries, bound, bound.nk if bound.q_offset else bound.n)
    )
    k_ext = tuple(int(e) for e in layout_extents(pat.keys, bound, bound.nk))
    coords = int_list(args.query, "--query")
    if len(coords) != len(q_ext):
        raise SpecError(
            f"expected {len(q_ext)} coordinate{'s' if len(q_ext) > 1 else ''} ({', '.join(q_axes)}), "
            f"got {len(coords)}",
            where="argument --query",
            hint="e.g. --query " + ",".join(str(e // 2) for e in q_ext),
        )
    for axis, c, extent in zip(q_axes, coords, q_ext, strict=True):
        if not 0 <= c < extent:
            raise SpecError(
                f"{axis}={c} is outside the grid ({axis} in 0..{extent - 1})",
                where="argument --query",
            )
    token = sum(c * math.prod(q_ext[i + 1 :]) for i, c in enumerate(coords))
    row = token - bound.q_offset
    if row < 0:
        raise SpecError(
            f"token {token} is before the queries (the last {bound.n} of {bound.nk} tokens)",
            where="argument --query",
        )
    where = ", ".join(f"{a}={c}" for a, c in zip(q_axes, coords, strict=True))
    same_grid = q_ext == k_ext and q_axes == k_axes  # the query's own cell is drawn among the keys
    sizes = ", ".join(f"{k}={v}" for k, v in bound.axis_sizes.items())
    layout = pat.keys.describe() + (f" with {sizes}" if sizes else "")
    shown = []
    for h in heads:
        keys = mask[h, row].reshape(k_ext)
        count = int(keys.sum())
        shown.append({"head": h, "keys": count, "attended": keys.to(int).tolist()})
        title = (
            f"{pat.name}: the query at ({where}) attends {count} of {keys.numel()} keys on {layout}"
        )
        if len(heads) > 1:
            title += f", head {h}"
        if args.png:
            _png(
                args.png if len(heads) == 1 else _per_head(args.png, h),
                keys,
                coords if same_grid else None,
                k_axes,
                title,
            )
            if not args.json:
                print(f"wrote {args.png if len(heads) == 1 else _per_head(args.png, h)}: {title}")
        elif not args.json:
            print(
                f"{title} (Q the query, # a key it attends, . one it does not; the query's own cell q when "
                "it does not attend itself)"
            )
            for line in _text(keys, coords if same_grid else None, k_axes):
                print(line)
    if args.json:
        args.shown.append(
            {
                "name": pat.name,
                "kind": "query",
                "query": dict(zip(q_axes, coords, strict=True)),
                "token": token,
                "axes": list(k_axes),
                "extents": list(k_ext),
                "heads": shown,
            }
        )
    return 0


def _per_head(path: str, head: int) -> str:
    return f"{path[:-4]}_head{head}.png"


def _slices(keys, query):
    """(caption, 2-D bool map, the query's (row, col) in it or None) per slice of the leading axes."""
    import itertools

    import torch

    ext = tuple(keys.shape)
    if len(ext) == 1:
        return [("", keys.reshape(1, -1), None if query is None else (0, query[0]))]
    lead = ext[:-2]
    out = []
    for index in itertools.product(*(range(e) for e in lead)):
        panel = keys[index] if index else keys
        here = query is not None and tuple(query[:-2]) == index
        out.append((index, torch.as_tensor(panel), (query[-2], query[-1]) if here else None))
    return out


def _caption(axes, index) -> str:
    return ", ".join(f"{a}={i}" for a, i in zip(axes, index, strict=False))


def _text(keys, query, axes) -> list[str]:
    lines = []
    for index, panel, q in _slices(keys, query):
        if index:
            lines.append(f"{_caption(axes, index)}:")
        rows, cols = panel.shape
        row_axis = axes[-2] if len(axes) > 1 else ""
        width = max(len(row_axis), len(str(rows - 1)))
        # the row axis's name in the corner, the column axis's after its digits (ones of each index)
        lines.append(
            f"{row_axis:>{width}} " + "".join(str(c % 10) for c in range(cols)) + f"  {axes[-1]}"
        )
        for r in range(rows):
            cells = ["#" if x else "." for x in panel[r].tolist()]
            if q is not None and q[0] == r:
                cells[q[1]] = "Q" if panel[r, q[1]] else "q"
            label = str(r) if len(axes) > 1 else ""
            lines.append(f"{label:>{width}} " + "".join(cells))
    return lines


def _png(path: str, keys, query, axes, title: str) -> None:
    from ..png import write_query_png

    panels = [
        (_caption(axes, index) if index else "", panel, q)
        for index, panel, q in _slices(keys, query)
    ]
    write_query_png(path, panels, axes[-2] if len(axes) > 1 else None, axes[-1], title)
