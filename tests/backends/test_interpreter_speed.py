"""The suite's interpreter settings (``tests/interpreter_speed.py``) change no value: shared block types are the
types Triton would build, a pointer's block keeps its own, and a tensor's shape is the same ``constexpr`` tuple."""

from __future__ import annotations

import interpreter_speed
import pytest

tl = pytest.importorskip("triton.language")

# what it replaces differs between Triton versions: CI runs it on the GPU machines' Triton too
pytestmark = pytest.mark.versions


def test_block_types_of_a_scalar_dtype_are_built_once_and_equal_as_before():
    shared = interpreter_speed.share_block_types()
    import triton

    # shared on the Triton versions it was written for (CI's 3.6 and 3.9); a later one may keep its own types
    assert shared or tuple(int(x) for x in triton.__version__.split(".")[:2]) > (3, 9)
    a = tl.block_type(tl.float32, [16, 8])
    again = tl.block_type(tl.float32, [tl.constexpr(16), 8])  # constexpr sizes unwrap to the same shape
    assert again == a and (again is a) == shared
    assert a.shape == (16, 8) and a.numel == 128 and a.element_ty == tl.float32
    other = tl.block_type(tl.float16, [16, 8])
    assert other is not a and other != a and tl.block_type(tl.float32, [8, 16]) != a
    ptr = tl.pointer_type(tl.float32)
    p1, p2 = tl.block_type(ptr, [4]), tl.block_type(ptr, [4])
    assert p1 is not p2 and p1 == p2  # a pointer's block: its own object, equal by Triton's rule
    with pytest.raises(ValueError, match="power of 2"):
        tl.block_type(tl.float32, [6])  # Triton's own checks still run


def test_a_tensors_shape_and_size_are_constexprs_of_its_type():
    interpreter_speed.share_block_types()
    ty = tl.block_type(tl.int32, [4, 2])
    t = tl.tensor(None, ty)
    assert t.shape == (tl.constexpr(4), tl.constexpr(2)) and all(isinstance(s, tl.constexpr) for s in t.shape)
    assert t.numel == tl.constexpr(8) and t.type is ty and t.dtype == tl.int32
    scalar = tl.tensor(None, tl.float32)
    assert scalar.shape == () and scalar.numel == tl.constexpr(1) and scalar.dtype == tl.float32


def test_numpy_dtypes_are_triton_s_answers():
    interpreter_speed.numpy_dtypes_once()
    import numpy as np
    from triton.runtime import interpreter

    get = interpreter._get_np_dtype
    assert getattr(get, "attnc_tests", False)
    assert get(tl.float32) == np.float32 and get(tl.bfloat16) == np.uint16 and get(tl.int1) == np.bool_
    assert get(tl.pointer_type(tl.float16)) == np.uint64
    assert get(tl.block_type(tl.int64, [4])) == np.int64
