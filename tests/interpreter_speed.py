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
- Building the same block types again for every operation (``share_block_types``) and the table of numpy dtypes
  at every load, cast and splat (``numpy_dtypes_once``): 28% of what is left (a grouped dK/dV backward,
  ``test_grouped_dkdv_split_over_programs[forgetting]``: 34 s to 24 s). Both leave every value as it was (the
  same types, equal by Triton's own rules); the overflow-checked Triton 3.6 job runs with them too.

A benchmark script a test runs in a process of its own gets them too (``child_env``).

Each replacement is made only where Triton's function reads exactly the names it read when this was written
(Triton 3.6 to 3.9); a Triton that changed one keeps its own.
"""

from __future__ import annotations

import dataclasses
import os


def child_env(env: dict, folder) -> dict:
    """``env`` for a Python process a test starts (a benchmark script's toy run): these settings applied in it at
    start-up, as in the workers (a ``sitecustomize`` module in ``folder``, put first on its ``PYTHONPATH``), and
    torch on one thread per process, as the workers run it (two processes on two cores)."""
    here = os.path.dirname(os.path.abspath(__file__))
    site = os.path.join(os.fspath(folder), "sitecustomize.py")
    with open(site, "w", encoding="utf-8") as f:
        f.write(f"import sys\nsys.path.insert(0, {here!r})\nimport interpreter_speed\n"
                "interpreter_speed.follow_the_environment()\n")
    path = os.pathsep.join(p for p in (os.fspath(folder), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def follow_the_environment() -> None:
    """Device calls without re-patching; the integer overflow checks off unless ``ATTNC_TEST_OVERFLOW_CHECKS=1``."""
    call_device_functions_without_repatching()
    share_block_types()
    numpy_dtypes_once()
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


#: what each replaced Triton function reads (``__code__.co_names``), on Triton 3.6 to 3.9
_TENSOR_INIT_NAMES = ("super", "__init__", "handle", "is_block", "shape", "constexpr", "math", "prod", "numel",
                      "type", "scalar", "dtype", "tuple")
_BLOCK_TYPE_INIT_NAMES = ("element_ty", "isinstance", "list", "tuple", "_unwrap_shape", "shape", "TypeError",
                          "validate_block_shape", "numel", "name")


def share_block_types() -> bool:
    """Each operation the interpreter runs builds its result's ``tl.block_type`` (its shape unwrapped, checked
    and printed into its name) and a ``tl.tensor`` whose shape is that shape again as ``constexpr`` objects:
    the same few types, thousands of times per program. Here a block type of a scalar dtype is built once per
    (dtype, shape) and shared (types are never changed once built; equality is by dtype and shape, as before),
    and a tensor takes its ``constexpr`` shape and size from its type, computed once per type. Returns whether
    the types are shared (False: no Triton, or one whose functions read other names, which keeps its own)."""
    try:
        from triton.language import core
    except ModuleNotFoundError:
        return False
    block_type, tensor = core.block_type, core.tensor
    if getattr(block_type, "attnc_tests", False):
        return True
    if (block_type.__init__.__code__.co_names != _BLOCK_TYPE_INIT_NAMES
            or tensor.__init__.__code__.co_names != _TENSOR_INIT_NAMES):
        return False
    import math

    build = block_type.__init__
    constexpr, scalar_dtype = core.constexpr, core.dtype
    shared: dict = {}

    def new(cls, *args, **kwargs):
        if cls is not block_type or len(args) != 2 or kwargs or type(args[0]) is not scalar_dtype:
            return object.__new__(cls)  # a pointer's block, a subclass, a copy: its own object, as before
        element_ty, shape = args
        key = (element_ty.name, tuple(s.value if isinstance(s, constexpr) else s for s in shape))
        ty = shared.get(key)
        if ty is None:
            ty = object.__new__(cls)
            build(ty, element_ty, shape)
            shared[key] = ty
        return ty

    def init(self, element_ty, shape):
        if "name" not in self.__dict__:  # a shared type is built once (Python calls __init__ after __new__)
            build(self, element_ty, shape)

    def tensor_init(self, handle, type):  # noqa: A002 (Triton's own parameter name)
        core.base_value.__init__(self)
        self.handle = handle
        sizes = getattr(type, "_attnc_constexpr_shape", None)
        if sizes is None:
            shape = type.shape if type.is_block() else ()
            sizes = (tuple([constexpr(s) for s in shape]), constexpr(math.prod(shape)))
            try:
                type._attnc_constexpr_shape = sizes
            except AttributeError:  # a type without a __dict__ computes them each time, as Triton does
                pass
        self.shape, self.numel = sizes
        self.type = type  # tensor type (can be a block type)
        self.dtype = type.scalar

    block_type.__new__ = new
    block_type.__init__ = init
    tensor.__init__ = tensor_init
    block_type.attnc_tests = True
    return True


def numpy_dtypes_once() -> None:
    """The interpreter's ``_get_np_dtype`` builds its table of a dozen dtypes (hashing each) at every call, that
    is at every load, cast and splat; here each dtype's answer is kept by its name (a dtype is its name)."""
    try:
        from triton.runtime import interpreter
    except ModuleNotFoundError:
        return
    own = getattr(interpreter, "_get_np_dtype", None)
    if own is None or getattr(own, "attnc_tests", False):
        return
    by_name: dict = {}

    def get_np_dtype(tt_dtype):  # a pointer's name says it is one: Triton's answer for every pointer, uint64
        found = by_name.get(tt_dtype.name)
        if found is None:
            found = by_name[tt_dtype.name] = own(tt_dtype)
        return found

    get_np_dtype.attnc_tests = True
    interpreter._get_np_dtype = get_np_dtype
