"""Two costs of Triton's interpreter that the suite does without, set in every test process (the xdist workers
and the spawned ranks) by ``follow_the_environment``:

- Integer overflow checks: every 32-bit integer add, subtract and multiply is computed again in int64, compared
  with the int32 bounds and device-asserted. On the grid tests that is half of the interpreter's time (a 3-D
  neighbourhood's forward and backward: 73 s with the checks, 39 s without). The GPU runs without them (Triton
  turns them on only in debug mode), and at the suite's sizes no index comes near 2**31 unless a kernel computes
  it wrongly, which the tests' comparisons with the reference catch anyway
  (``test_int64_arithmetic_where_int32_overflows`` is such a case). CI's Triton 3.6 job, which runs every
  generated kernel variant once (the tests marked ``versions``), keeps them: ``ATTNC_TEST_OVERFLOW_CHECKS=1``.
- Patching ``triton.language`` again at each device-function call inside a launch, which changes nothing
  (``call_device_functions_without_repatching``): a sixth of what is left (39 s to 31 s on the same test).
"""

from __future__ import annotations

import dataclasses
import os


def follow_the_environment() -> None:
    """Device calls without re-patching; the integer overflow checks off unless ``ATTNC_TEST_OVERFLOW_CHECKS=1``."""
    call_device_functions_without_repatching()
    if os.environ.get("ATTNC_TEST_OVERFLOW_CHECKS") == "1":
        return
    try:
        from triton.runtime import interpreter
    except ModuleNotFoundError:  # the CPU path runs without Triton
        return
    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)


def call_device_functions_without_repatching() -> None:
    """The interpreter replaces ``triton.language``'s builtins at each kernel launch and again at every call of
    a ``@triton.jit`` device function inside it: each time it walks every member of the modules
    (``inspect.getmembers``), and inside a launch it finds them all replaced already and changes nothing. On
    a grid test that walk is a sixth of the interpreter's time (a generated kernel calls its mask and tile
    helpers per tile). Here a device call whose modules are already replaced skips the walk; any other call
    (and every launch) goes through the interpreter's own path."""
    try:
        from triton.runtime import interpreter
    except ModuleNotFoundError:
        return
    import triton.language as tl
    from triton.language.core import is_builtin

    def patched(lang) -> bool:  # its builtins replaced by the interpreter's (a launch does that until it returns)
        return not is_builtin(lang.program_id) and not is_builtin(lang.tensor.__add__)

    own = interpreter.InterpretedFunction.__call__
    if getattr(own, "attnc_tests", False):
        return
    langs: dict = {}

    def call(self, *args, **kwargs):
        mods = langs.get(self.fn)
        if mods is None:
            mods = langs[self.fn] = [v for v in self.fn.__globals__.values() if v is tl or v is tl.core]
        if not mods or not all(patched(lang) for lang in mods):
            return own(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # as the interpreter's own device call reports it
            raise interpreter.InterpreterError(repr(e)) from e

    call.attnc_tests = True
    interpreter.InterpretedFunction.__call__ = call
