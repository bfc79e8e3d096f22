"""What the commands print besides their text: ``--json``'s one document, and notes on what was assumed."""

from __future__ import annotations


def print_json(data) -> None:
    import json

    print(json.dumps(data, indent=2, default=str))


def note(args, text: str) -> None:
    """A note on what was assumed: a ``# note:`` line, or the ``notes`` of ``--json``'s document."""
    if getattr(args, "json", False):
        args.notes.append(text)
    else:
        print(f"# note: {text}")
