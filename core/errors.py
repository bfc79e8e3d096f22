"""The one error type a user of attnc sees for a bad spec or a bad argument."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Pos:
    """A source position: 1-based line and column in a named file."""

    line: int
    col: int
    end_line: int | None = None
    end_col: int | None = None


class SpecError(ValueError):
    """A bad spec or argument, rendered as ``FILE:LINE:COL: error: message``.

    ``where`` names what is at fault when there is no source position (an
    argument of ``compile_attention``, say); ``hint`` is an optional
    suggestion printed under the caret.
    """

    def __init__(
        self,
        message: str,
        pos: Pos | None = None,
        *,
        filename: str | None = None,
        source: str | None = None,
        hint: str | None = None,
        where: str | None = None,
    ) -> None:
        self.message = message
        self.pos = pos
        self.filename = filename
        self.source = source
        self.hint = hint
        self.where = where
        # the rendered text as the exception's one argument, set rather than passed to ValueError.__init__: dynamo
        # traces this assignment, so under torch.compile(fullgraph=True) a refusal reaches the user as torch's
        # "Observed exception" caused by this error and its message, not as an untraceable constructor
        self.args = (self.render(),)

    def located(self, filename: str | None, source: str | None) -> SpecError:
        """The same error, attributed to a file (kept if it already had one)."""
        if self.filename is not None or self.pos is None:
            return self
        return SpecError(
            self.message, self.pos, filename=filename, source=source, hint=self.hint, where=self.where
        )

    def render(self) -> str:
        if self.pos is not None:
            head = f"{self.filename or '<spec>'}:{self.pos.line}:{self.pos.col}: error: {self.message}"
        elif self.where is not None:
            head = f"{self.where}: error: {self.message}"
        else:
            head = f"error: {self.message}"
        lines = [head]
        if self.pos is not None and self.source is not None:
            src_lines = self.source.split("\n")  # lines as the lexer counts them (not splitlines())
            if 1 <= self.pos.line <= len(src_lines):
                text = src_lines[self.pos.line - 1].removesuffix("\r")
                shown = "".join(c if c.isprintable() else "?" for c in text.expandtabs(1))
                if len(shown) > 200:  # keep the caret on screen for huge lines
                    start = max(0, self.pos.col - 100)
                    shown = shown[start : start + 200]
                    caret_col = self.pos.col - start
                else:
                    caret_col = self.pos.col
                width = 1
                if self.pos.end_line == self.pos.line and self.pos.end_col is not None:
                    width = max(1, min(self.pos.end_col - self.pos.col, len(shown) - caret_col + 1))
                lines.append("    " + shown)
                lines.append("    " + " " * (caret_col - 1) + "^" + "~" * (width - 1))
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean ...' hint for a misspelt name, or None."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def argument_error(argument: str, message: str, hint: str | None = None) -> SpecError:
    """An error about an API or CLI argument (no source position)."""
    return SpecError(message, where=f"argument {argument}", hint=hint)
