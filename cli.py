"""The ``attnc`` command: list, check, show. Every user error is one clean
message and exit status 1; no traceback reaches the user."""

from __future__ import annotations

import argparse
import sys

from .spec.errors import SpecError

SHOW_DEFAULT_N = 32
SHOW_DEFAULT_AXIS = 8
SHOW_MAX_TOKENS = 4096


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 with usage; we exit 1 with one line
        raise SpecError(message, where=self.prog)


def _key_values(items: list[str] | None, what: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items or []:
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part:
                raise SpecError(f"expected NAME=VALUE, got {part!r}", where=f"argument {what}")
            key, value = part.split("=", 1)
            out[key.strip()] = _literal(value.strip(), f"{what} {key.strip()}")
    return out


def _literal(text: str, what: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"expected a number or true/false, got {text!r}", where=f"argument {what}") from None
    return value


def cmd_list(_args) -> int:
    from .spec.library import stdlib_index

    for name, (module, decl) in sorted(stdlib_index().items()):
        summary = _summary(module.source, decl.pos.line)
        params = ", ".join(p.name + ("" if p.default is None else f"={_fmt(p.default)}") for p in decl.params)
        print(f"{name:18s} {decl.kind:10s} {summary}" + (f"  ({params})" if params else ""))
    return 0


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _summary(source: str, decl_line: int) -> str:
    """The first comment line of the file's header: what the pattern is."""
    for line in source.splitlines()[: decl_line - 1]:
        line = line.strip()
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def cmd_check(args) -> int:
    from .spec.library import check_text, read_source

    status = 0
    for path in args.files:
        try:
            text, filename = read_source(path) if path.startswith("stdlib:") else _read_file(path)
            decls = check_text(text, filename)
            print(f"{filename}: ok ({len(decls)} declaration{'s' if len(decls) != 1 else ''}: "
                  + ", ".join(d.name for d in decls) + ")")
        except SpecError as err:
            print(err.render(), file=sys.stderr)
            status = 1
    return status


def _read_file(path: str) -> tuple[str, str]:
    from .spec.parser import decode_source

    try:
        with open(path, "rb") as f:
            return decode_source(f.read(), path), path
    except FileNotFoundError:
        raise SpecError(f"no such file: {path}", where=path) from None
    except IsADirectoryError:
        raise SpecError("is a directory", where=path) from None
    except OSError as err:
        raise SpecError(f"cannot read: {err.strerror}", where=path) from None


def cmd_show(args) -> int:
    import torch

    from .compiler import evaluate as E
    from .compiler import ir
    from .spec.library import STDLIB_PREFIX, lower, pick
    from .spec.parser import parse

    if args.file.startswith(STDLIB_PREFIX):
        from .spec.library import read_source

        text, filename = read_source(args.file)
        stdlib_name = args.file[len(STDLIB_PREFIX):]
    else:
        text, filename = _read_file(args.file)
        stdlib_name = None
    module = parse(text, filename)
    decl = pick(module, args.name, stdlib_name)
    pat = lower(module, decl, _key_values(args.param, "-p"))
    heads = args.heads
    if isinstance(pat, ir.RecurrenceIR):
        return _show_recurrence(pat, heads or 4)
    sizes = {k: v for k, v in _key_values(args.sizes, "--sizes").items()}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"expected an int, got {value!r}", where=f"argument --sizes {name}")
    needed = {str(s).removeprefix("size_") for lay in (pat.queries, pat.keys) for _, e in lay.axes for s in e.free_symbols}
    for name in sorted(needed - set(sizes)):
        sizes[name] = SHOW_DEFAULT_AXIS
    n = args.n if args.n is not None else (SHOW_DEFAULT_N if pat.queries.kind == "seq" else None)
    nk = args.nk if args.nk is not None else (n if pat.keys.kind == "seq" and not pat.self_attention else None)
    depends_on_head = any(str(s) == "h" for s in pat.mask.free_symbols)
    heads = heads or (4 if depends_on_head else 1)
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes)
    if bound.n * bound.nk > SHOW_MAX_TOKENS * SHOW_MAX_TOKENS:
        raise SpecError(f"{bound.n} x {bound.nk} is too large to show", where="argument --sizes",
                        hint="choose smaller sizes")
    inputs = {}
    for name, values in _key_values_raw(args.input).items():
        try:
            inputs[name] = torch.tensor([_literal(v, f"--input {name}") for v in values.split()])
        except (TypeError, ValueError):
            raise SpecError("expected numbers separated by spaces", where=f"argument --input {name}") from None
    if pat.route is not None:
        print("# note: routing depends on q and k; this shows the mask before block selection")
    mask = E.mask_tensor(pat, bound, inputs)[0]
    title = f"{pat.name}: {pat.queries.describe()}"
    if bound.axis_sizes:
        title += " with " + ", ".join(f"{k}={v}" for k, v in bound.axis_sizes.items())
    title += f", {bound.n} queries x {bound.nk} keys"
    shown_heads = range(heads) if depends_on_head else range(1)
    for h in shown_heads:
        density = mask[h].float().mean().item()
        print(f"{title}" + (f", head {h}" if depends_on_head else "") + f" (density {density:.3f})")
        for row in mask[h]:
            print("".join("#" if x else "." for x in row.tolist()))
        if h != shown_heads[-1]:
            print()
    if args.png:
        from .png import write_mask_png

        write_mask_png(args.png, mask[list(shown_heads)])
        print(f"wrote {args.png}")
    return 0


def _key_values_raw(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(f"expected NAME=V1 V2 ..., got {item!r}", where="argument --input")
        key, value = item.split("=", 1)
        out[key.strip()] = value.replace(",", " ")
    return out


def _show_recurrence(rec, heads: int) -> int:
    from .compiler import evaluate as E

    print(f"{rec.name}: recurrence, {rec.gate} gate")
    if rec.gate != "head":
        print(f"decay is the call-time input '{rec.decay}' ({'per token and head' if rec.gate == 'scalar' else 'per token, head and key channel'})")
        return 0
    values = E.head_values(rec.decay, {E.S.HEADS: heads}, heads)
    for h, g in enumerate(values.tolist()):
        import math

        print(f"head {h}: log decay {g:.6g}, per-step decay {math.exp(g):.6g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnc", description="attnc: a compiler for attention patterns")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("list", help="the stdlib patterns, one line each")
    p = sub.add_parser("check", help="parse and check .attn files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p = sub.add_parser("show", help="draw the mask of a pattern at a small size")
    p.add_argument("file", metavar="FILE", help="a .attn file or stdlib:NAME")
    p.add_argument("-p", "--param", action="append", metavar="K=V", help="set a parameter (repeatable, or K=V,K=V)")
    p.add_argument("--sizes", action="append", metavar="A=N,..", help="grid sizes (default 8 per axis)")
    p.add_argument("--n", type=int, help=f"number of tokens of a seq layout (default {SHOW_DEFAULT_N})")
    p.add_argument("--nk", type=int, help="number of keys (cross attention)")
    p.add_argument("--heads", type=int, help="number of heads (head-dependent patterns show each)")
    p.add_argument("--name", help="which declaration of the file")
    p.add_argument("--input", action="append", metavar="NAME=V1,V2,..", help="a 1-D call-time input")
    p.add_argument("--png", metavar="PATH", help="also write the mask as a PNG picture")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 1
        handler = {"list": cmd_list, "check": cmd_check, "show": cmd_show}[args.command]
        return handler(args)
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnc: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except Exception as err:  # a bug in attnc, not the user's fault: still no traceback
        print(f"attnc: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        print("please report this with the command and the spec file", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
