"""Whether the Triton backend can run here, with one clear message when it cannot.

Triton is a dependency of attnc, and so is numpy (Triton's interpreter, which runs
the kernels on CPU tensors, imports it). An ImportError of a package that *is*
installed is a real error and propagates; only a package that is absent becomes
a message naming it and the command that installs it.
"""

import importlib

from ..spec.errors import SpecError

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
