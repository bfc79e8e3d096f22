"""An error of the Python API, said in the command line's words.

The compiler names what is at fault by its Python argument (``argument sizes``, ``hint: pass
sizes={'height': ...}``); a command-line user typed flags, so the message names the flag they
typed (``argument --sizes``, ``hint: pass --sizes height=..``)."""

from __future__ import annotations

import re

from ..core.errors import SpecError

#: A Python argument -> the flag that sets it.
FLAGS = {
    "n": "--n",
    "nk": "--nk",
    "sizes": "--sizes",
    "heads": "--heads",
    "kv_heads": "--kv-heads",
    "head_dim": "--head-dim",
    "batch": "--batch",
    "q_tile": "--q-tile",
    "kv_tile": "--kv-tile",
    "hardware": "--hardware",
    "dtype": "--dtype",
    "inputs": "--input",
    "layers": "--layers",
    "arch": "--arch",
    "top": "--top",
    "block": "--block",
    "paged": "--paged",
    "name": "--name",
    "source": "FILE",
    "pattern": "FILE",
}

_SIZES_DICT = re.compile(r"sizes=\{([^}]*)\}")
_SIZE_ENTRY = re.compile(r"'([^']+)'\s*:\s*[^,]+")
_KEYWORD = re.compile(r"(\bpass )?\b([a-z_][a-z0-9_]*)=(\.\.\.|(?=[,) ]|$))")


def cli_error(err: SpecError, inputs: set[str] = frozenset(), said: dict[str, str] | None = None,
              params: set[str] = frozenset()) -> SpecError:
    """``err`` with its ``where`` and ``hint`` naming flags; an error with a source position (a spec
    file's line and column) is the file's and is kept. ``inputs``: the pattern's input names
    (``argument doc`` -> ``argument --input doc``). ``said``: a Python argument -> the flag the user typed
    for it, where two flags set one argument (``sim --gpu`` for ``--hardware``). ``params``: the pattern parameters
    given with -p: ``argument block`` is the -p block= the user typed, not a flag of the same name (check-gpu's
    ``--block``)."""
    if err.pos is not None:
        return err
    flags = {name: flag for name, flag in {**FLAGS, **(said or {})}.items() if name not in params}
    where = _where(err.where, inputs, flags)
    hint = _hint(err.hint, inputs, flags) if err.hint else err.hint
    if where == err.where and hint == err.hint:
        return err
    return SpecError(err.message, where=where, hint=hint)


def _where(where: str | None, inputs: set[str], flags: dict[str, str] = FLAGS) -> str | None:
    if not where or not where.startswith("argument "):
        return where
    what = where[len("argument ") :]
    sized = re.fullmatch(r"sizes(?:\[\s*'([^']+)'\s*\]|\s+'([^']+)')", what)
    if sized:  # sizes['height'], sizes 'height'
        return f"argument --sizes {sized.group(1) or sized.group(2)}"
    if what in flags:
        return f"argument {flags[what]}"
    if what in inputs:
        return f"argument --input {what}"
    return where


def _hint(hint: str, inputs: set[str], flags: dict[str, str] = FLAGS) -> str:
    def sizes(match: re.Match) -> str:
        names = _SIZE_ENTRY.findall(match.group(1))
        return "--sizes " + ",".join(f"{name}=.." for name in names) if names else "--sizes A=N,.."

    hint = _SIZES_DICT.sub(sizes, hint)

    def keyword(match: re.Match) -> str:
        said, name, dots = match.group(1) or "", match.group(2), match.group(3)
        if name in flags:
            return said + flags[name] + (" .." if dots else "")
        if name in inputs:
            return f"{said}--input {name}=" + (".." if dots else "")
        if said:  # 'pass window=...': a pattern's parameter
            return f"pass -p {name}=" + (".." if dots else "")
        return match.group(0)

    return _KEYWORD.sub(keyword, hint)
