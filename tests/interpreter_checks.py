"""Triton's interpreter checks every 32-bit integer add, subtract and multiply for overflow: each such op is
computed again in int64, compared with the int32 bounds and device-asserted. On the grid tests that is half
of the interpreter's time (a 3-D neighbourhood's forward and backward: 73 s with the checks, 39 s without).

The GPU runs without these checks (Triton turns them on only in debug mode), and at the suite's sizes no
index comes near 2**31 unless a kernel computes it wrongly, which the tests' comparisons with the reference
catch anyway (``test_int64_arithmetic_where_int32_overflows`` is such a case). So the README's test command
runs without them, and CI's Triton 3.6 job, which runs every generated kernel variant once (the tests marked
``versions``), keeps them: ``ATTNC_TEST_OVERFLOW_CHECKS=1``."""

from __future__ import annotations

import dataclasses
import os


def follow_the_environment() -> None:
    """Turns the interpreter's integer overflow checks off unless ``ATTNC_TEST_OVERFLOW_CHECKS=1``; called in
    every test process (the xdist workers and the spawned ranks)."""
    if os.environ.get("ATTNC_TEST_OVERFLOW_CHECKS") == "1":
        return
    try:
        from triton.runtime import interpreter
    except ModuleNotFoundError:  # the CPU path runs without Triton
        return
    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
