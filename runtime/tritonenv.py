"""The Triton environment: whether the Triton backend can run here (one clear message when it
cannot), and ``interpreting``, the one switch between Triton's interpreter and native compilation.

Triton is a dependency of attnc, and so is numpy (Triton's interpreter, which runs
the kernels on CPU tensors, imports it). An ImportError of a package that *is*
installed is a real error and propagates; only a package that is absent becomes
a message naming it and the command that installs it.
"""

import importlib
import os
import threading

from ..core.errors import SpecError

#: Held while ``TRITON_INTERPRET`` is switched and kernels are decorated or launched under it.
LOCK = threading.RLock()

#: What to install for each piece; numpy < 2.4 because Triton 3.6's interpreter breaks on 2.4.
_INSTALL = {"triton": "pip install triton", "numpy": "pip install 'numpy<2.4'"}


def _require(package: str, purpose: str) -> None:
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as err:
        if err.name != package:  # the package is there but something it imports is broken
            raise
        raise SpecError(f"{purpose} needs the '{package}' package, which is not installed",
                        where="argument backend",
                        hint=f"{_INSTALL[package]}, or use backend='cpu'") from None


def require_triton(interpret: bool) -> None:
    """Raise a ``SpecError`` naming the missing package if Triton (and, for the
    interpreter, numpy) cannot be imported."""
    _require("triton", "the Triton backend")
    if interpret:
        _require("numpy", "the Triton interpreter (backend='triton' on CPU tensors)")


# ----------------------------------------------------------------- compiling generated source
class interpreting:  # noqa: N801 - used as a function: ``with interpreting(on):``
    """``TRITON_INTERPRET`` set (or cleared) while kernels are decorated and launched. Where it is set so already
    (unset counts as ``"0"``, as Triton reads it) and no Triton knob overrides it, nothing is changed: a warm launch
    pays for the lock only. A class rather than a generator: it is entered at every launch."""

    __slots__ = ("want", "old", "knobs", "saved", "changed")

    def __init__(self, on: bool = True):
        self.want = "1" if on else "0"

    def __enter__(self):
        LOCK.acquire()
        try:
            self.old = old = os.environ.get("TRITON_INTERPRET")
            self.knobs = knobs = _knobs_runtime()
            self.changed = (old if old is not None else "0") != self.want or (
                knobs is not None and "interpret" in knobs.__dict__)
            if self.changed:
                self.saved = knobs.__dict__.pop("interpret", None) if knobs is not None else None
                os.environ["TRITON_INTERPRET"] = self.want
        except BaseException:
            LOCK.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.changed:
                if self.old is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = self.old
                if self.knobs is not None and self.saved is not None:
                    self.knobs.__dict__["interpret"] = self.saved
        finally:
            LOCK.release()


_KNOBS: list = []  # Triton's knobs module, once imported (its runtime knobs are read from it at each call)


def _knobs_runtime():
    if not _KNOBS:
        try:
            import triton.knobs as knobs
        except ImportError:  # older Triton reads the environment directly
            return None
        _KNOBS.append(knobs)
    return getattr(_KNOBS[0], "runtime", None)
