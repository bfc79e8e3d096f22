"""The ``attnc`` command's arguments: the parser that turns argparse's errors into one clean message, the
options every pattern-loading command shares, and what they parse into (parameters, sizes, inputs, tiles)."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import SpecError

#: Tokens of a seq layout for ``check-gpu`` and ``emit --arch`` without --n (the kernels bake sizes in; the
#: schedule depends on n).
CHECK_GPU_DEFAULT_N = 8192
#: the most tokens ``check-gpu`` plans for (its tile lists take about 512 bytes a token: 2 GiB here)
CHECK_GPU_MAX_TOKENS = 1 << 22


def key_values(items: list[str] | None, what: str, per_axis: bool = False) -> dict[str, object]:
    """``K=V,K=V`` (repeatable) as a dict. ``per_axis`` (``-p``): values after a ``K=V`` without
    a name of their own are more values of K, a tuple (``kernel_size=3,5``: one per axis, as
    ``kernel_size=(3, 5)`` in Python)."""
    out: dict[str, object] = {}
    for item in items or []:
        key = None
        for part in item.split(","):
            if not part:
                continue
            if "=" not in part:
                if per_axis and key is not None:
                    value = literal(part.strip(), f"{what} {key}")
                    before = out[key] if isinstance(out[key], tuple) else (out[key],)
                    out[key] = (*before, value)
                    continue
                raise SpecError(f"expected NAME=VALUE, got {part!r}", where=f"argument {what}")
            key, value = part.split("=", 1)
            key = key.strip()
            out[key] = literal(value.strip(), f"{what} {key}")
    return out


def literal(text: str, what: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for base in (0, 10):  # 0x.., 0b.., and decimal with leading zeros (007 is 7, as in specs)
        try:
            return int(text, base)
        except ValueError:
            pass
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"expected a number or true/false, got {text!r}", where=f"argument {what}") from None
    return value


def key_values_raw(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(f"expected NAME=V1,V2,.. or NAME=FILE.pt, got {item!r}", where="argument --input")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def read_file(path: str) -> tuple[str, str]:
    from ..spec.library import read_path

    if not path.strip():  # (the error would be located at an empty name: ": error: no such file: ")
        raise SpecError("an empty FILE: expected a .attn file or stdlib:NAME", where="argument FILE",
                        hint="run 'attnc list' to see the stdlib patterns")
    return read_path(path, where=path), path


def tile_arg(text: str | None, what: str) -> tuple[int, ...] | None:
    """``--q-tile 2,8,8`` -> (2, 8, 8)."""
    if text is None:
        return None
    try:
        tile = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise SpecError(f"expected ints separated by commas, got {text!r}", where=f"argument {what}") from None
    if not tile:
        raise SpecError("expected at least one extent", where=f"argument {what}")
    return tile


def int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"expected ints separated by commas, got {text!r}", where=f"argument {what}") from None
    if not out:
        raise SpecError("expected at least one value", where=f"argument {what}")
    return out


def load_args(args):
    """The pattern of FILE (a path or stdlib:NAME) with --name and -p."""
    from ..spec.library import STDLIB_PREFIX, lower, pick, read_source
    from ..spec.parser import parse

    if args.file.startswith(STDLIB_PREFIX):
        text, filename = read_source(args.file, where=args.file)
        stdlib_name = args.file[len(STDLIB_PREFIX):]
    else:
        text, filename = read_file(args.file)
        stdlib_name = None
    module = parse(text, filename)
    pat = lower(module, pick(module, args.name, stdlib_name, option="--name"),
                key_values(args.param, "-p", per_axis=True))
    args.loaded = pat  # its input names turn an error's 'argument NAME' into '--input NAME' (cli_error)
    return pat


def int_sizes(items, pat=None) -> dict[str, int]:
    """``--sizes A=N,..``; with ``pat``, every name is one of its sizes (checked before anything is printed)."""
    sizes = key_values(items, "--sizes")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"expected an int, got {value!r}", where=f"argument --sizes {name}")
    if pat is not None:
        from ..compiler.analysis.evaluate import check_size_names

        check_size_names(pat, sizes)
    return sizes


def call_inputs(items) -> dict:
    """``--input NAME=V1,V2,..`` (a 1-D input) or ``--input NAME=FILE.pt`` (a tensor saved with
    ``torch.save``, any shape)."""
    import os

    import torch

    inputs = {}
    for name, given in key_values_raw(items).items():
        values = given.strip()
        where = f"argument --input {name}"
        if values.strip().endswith((".pt", ".pth")) or os.path.isfile(values.strip()):
            path = values.strip()
            try:
                value = torch.load(path, weights_only=True)
            except FileNotFoundError:
                raise SpecError(f"no such file: {path}", where=where) from None
            except IsADirectoryError:
                raise SpecError(f"{path} is a directory, not a tensor file", where=where) from None
            except OSError as err:
                raise SpecError(f"cannot read {path}: {err.strerror or err}", where=where) from None
            except Exception as err:  # torch's own text is pages long: one line, naming the file
                what = ("holds objects other than tensors" if "Unsupported global" in str(err)
                        else "is not a tensor file written by torch.save")
                hint = ("write it with torch.save(tensor, PATH), or give the values: "
                        f"--input {name}=V1,V2,..")
                raise SpecError(f"{path} {what}", where=where, hint=hint) from None
            if not isinstance(value, torch.Tensor):
                raise SpecError(f"{path} holds a {type(value).__name__}, not a tensor", where=where)
            inputs[name] = value
            continue
        inputs[name] = torch.tensor(input_values(values, name))
    return inputs


def input_values(text: str, name: str) -> list:
    """``V1,V2,..`` with ``V*COUNT`` for a run of COUNT equal values (``0*3000,1*5192``: two documents)."""
    where = f"argument --input {name}"
    expected = "expected numbers separated by commas (V*COUNT repeats V), or a .pt file"
    out: list = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        value, star, count = part.partition("*")
        try:
            v = literal(value.strip(), f"--input {name}")
        except SpecError:
            raise SpecError(f"{expected}, got {part!r}", where=where) from None
        if not star:
            out.append(v)
            continue
        try:
            times = int(count)
        except ValueError:
            times = 0
        if times < 1:
            raise SpecError(f"a run is VALUE*COUNT with COUNT a positive int, got {part!r}", where=where)
        out.extend([v] * times)
    if not out:
        raise SpecError(f"{expected}, got {text!r}", where=where)
    return out


def sampled_inputs(pat, args, sizes: dict, given: dict) -> dict:
    """``attnc sim`` without some declared inputs: a documented sample of each, said in a note
    (int inputs: sorted uniform draws in [0, n), e.g. document ids or index lists; float inputs:
    standard normal draws; seed 0)."""
    import sympy
    import torch

    from ..compiler.analysis import evaluate as E
    from ..core import ir

    # (derived inputs, the ids of cluster(), are sampled by simulate from sampled q and k, and so are the centroids
    # they read: left to it, so that the CLI's sample is the API's)
    from ..runtime.plan.clusters import mask_derived_inputs

    centroids = {d.derived[2] for d in mask_derived_inputs(pat) if d.derived[0] == "cluster"} if isinstance(
        pat, ir.PatternIR) else set()
    missing = [d for d in getattr(pat, "inputs", ()) if d.name not in given and d.derived is None
               and d.name not in centroids]
    # an input the mask reads decides which pairs are computed, so the bound itself: a sample would
    # invent its answer (a uniform draw of document ids makes thousands of one-token documents)
    structural = [d for d in missing if d.name in mask_inputs(pat)]
    if structural:
        d = structural[0]
        shape = ", ".join(map(str, d.dims))
        n = args.n if args.n is not None and args.n > 1 else 1024
        example = f"0*{n // 2},1*{n - n // 2}"
        raise SpecError(f"'{pat.name}' reads input '{d.name}' ({d.dtype}[{shape}]) in its mask: the bounds depend "
                        "on it, so it is not sampled", where=f"argument --input {d.name}",
                        hint=f"give it, e.g. --input {d.name}={example} (V*COUNT repeats V; or V1,V2,..), or "
                             f"--input {d.name}=FILE.pt")
    if not missing or not isinstance(pat, ir.PatternIR):
        return given
    bound = E.bind_sizes(pat, n=args.n, nk=args.nk, heads=args.heads, sizes=sizes or None, dk=args.head_dim)
    g = torch.Generator().manual_seed(0)
    out = dict(given)
    for decl in missing:
        shape = [int(sympy.sympify(d).subs(bound.subs)) for d in decl.dims]
        if decl.dtype == "int":
            value = torch.randint(0, bound.n, shape, generator=g).sort(dim=-1).values if shape else torch.tensor(0)
            how = f"sorted uniform ints in [0, {bound.n})"
        else:
            value = torch.randn(shape, generator=g, dtype=torch.float64)
            how = "standard normal floats"
        out[decl.name] = value
        print(f"# note: input '{decl.name}' not given: simulated with a sample of {how}, shape {shape} (seed 0); "
              f"pass --input {decl.name}=FILE.pt for your own",
              file=sys.stderr if getattr(args, "json", False) else sys.stdout)  # --json: stdout is JSON only
    return out


def mask_inputs(pat) -> set[str]:
    """The declared (not derived) inputs a pattern's mask reads (a combined pattern: any branch's)."""
    import sympy

    from ..compiler.analysis.evaluate import input_names
    from ..core import ir

    if isinstance(pat, ir.CombinedIR):
        return set().union(*(mask_inputs(b.pattern) for b in pat.branches))
    mask = getattr(pat, "mask", None)
    if not isinstance(pat, ir.PatternIR) or not isinstance(mask, sympy.Basic):
        return set()
    declared = {d.name for d in pat.inputs if d.derived is None}
    return set(input_names(mask)) & declared


def pattern_args(p, *, sizes_help: str = "grid sizes", n_help: str = "number of tokens of a seq layout",
                  inputs: bool = True) -> None:
    """FILE and what picks and sizes the pattern in it (every command that loads one)."""
    p.add_argument("file", metavar="FILE", help="a .attn file or stdlib:NAME")
    p.add_argument("-p", "--param", action="append", metavar="K=V",
                   help="set a parameter (repeatable, or K=V,K=V); K=V1,V2 sets one value per grid axis "
                   "(kernel_size=3,5) or per head of a NAME[heads] parameter (moa's alpha=64,512)")
    p.add_argument("--sizes", action="append", metavar="A=N,..", help=sizes_help)
    p.add_argument("--n", type=int, help=n_help)
    p.add_argument("--nk", type=int, help="number of keys (cross attention)")
    p.add_argument("--name", help="which declaration of the file")
    if inputs:
        p.add_argument("--input", action="append", metavar="NAME=V1,V2,..|FILE.pt",
                       help="a call-time input: 1-D values, or a tensor of any shape saved with torch.save")


def check_kv_heads(args) -> None:
    """``--kv-heads`` divides ``--heads`` (checked before anything is modelled or timed)."""
    if args.kv_heads is not None:
        from ..compiler.cost.model import checked_kv_heads

        checked_kv_heads(args.heads, args.kv_heads, where="argument --kv-heads")


def shape_args(p) -> None:
    """Heads, head dimension and batch of a modelled or tuned call."""
    p.add_argument("--heads", type=int, default=1, help="number of heads (default 1)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--kv-heads", type=int, help="K/V heads shared by the query heads (grouped-query attention; "
                   "default one per head)")


def tokens_of(args, pat, default: int) -> int | None:
    """``--n``, else ``default`` tokens on a seq layout (a grid's or a concatenation's count
    comes from its sizes)."""
    queries = getattr(pat, "queries", None)  # a recurrence has no layout
    sized = queries is not None and queries.token_count() is not None
    return args.n if args.n is not None or sized else default


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 with usage; we exit 1 with one line
        raise SpecError(message, where=self.prog)


class SaidAs(argparse.Action):
    """A flag with aliases (``--hardware``/``--gpu``): its value stored as ``store`` does, and the alias the user
    typed kept in ``args.said`` (argument -> flag), so an error about the value names that flag (``cli_error``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        said = dict(getattr(namespace, "said", None) or {})
        said[self.dest] = option_string
        namespace.said = said
