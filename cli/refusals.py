"""What a command refuses before it starts: a pattern it has no model of (a bucketed one), one of several
attentions where it takes one (a combined one), queries after a KV cache where it models whole sequences."""

from __future__ import annotations

from ..core.errors import SpecError


def refuse_kv_cache(pat, args, command: str) -> None:
    """``--nk`` other than ``--n`` on a self-attention pattern: queries after a KV cache, which
    this command does not model (show draws them; sim --decode bounds a step)."""
    from ..core import ir

    if not isinstance(pat, ir.PatternIR) or not pat.self_attention or args.nk is None:
        return
    if args.n is not None and args.nk == args.n:
        return
    hint = {"emit": "emit shows a whole sequence's kernels: leave --nk out (attnc show --n Q --nk N draws the "
                    "mask after a KV cache)",
            "sim": f"attnc sim --decode --nk {args.nk}" + (f" --n {args.n}" if args.n is not None else "")
                   + " bounds decoding after a KV cache; without --decode, --n alone is the prefill"}[command]
    raise SpecError(f"'{pat.name}' is a self-attention: its keys are its tokens, so --nk would be queries after "
                    f"a KV cache, which attnc {command} does not model" + (" without --decode" if command == "sim"
                                                                           else ""),
                    where="argument --nk", hint=hint)


def refuse_bucketed(pat, command: str) -> None:
    """A bucketed pattern (route buckets) chooses its buckets from q and k at every call and attends them in
    torch: there is no fixed mask to show, no kernel to emit, tune or check, no simulator model."""
    from ..core import ir

    if isinstance(pat, ir.BucketedIR):
        from ..runtime.bucketed import not_served

        raise not_served(pat, f"'attnc {command}' does not apply to it in this version", "argument FILE",
                         hint="compile it and call it: attnc.compile_attention(...)")


def refuse_combined(pat, where: str) -> None:
    """emit, tune and check-gpu --block take one kernel's pattern: a combined pattern is refused, naming it."""
    from ..core import ir

    if isinstance(pat, ir.CombinedIR):
        names = ", ".join(b.name for b in pat.branches)
        raise SpecError(f"'{pat.name}' combines several attentions (branches {names}): this command takes one "
                        "softmax pattern", where=where,
                        hint="each branch is an ordinary pattern: write it as its own declaration to emit, tune or "
                             "check it")
