"""The ``@triton.jit`` helper functions the generated kernel modules define, as source text.

``HELPERS``: those the expression printer (``compiler.codegen.triton.exprs``) and the score terms call,
emitted only when used (``helper_sources``); ``DOT_HELPERS``: those every module has (row sums
and maxima for ``tl.reduce``: aliases of the standard library's combine functions, and ``_dot`` with its
precision modes).

Only Triton builtins are called (``tl.full``, ``tl.reduce``, ...) and no ``@triton.jit`` function
of ``triton.language`` (``tl.zeros``, ``tl.sum``, ``tl.max`` are such functions): those are
interpreted only when ``TRITON_INTERPRET`` was set before Triton was imported, while these
kernels must run in the interpreter in a process that imported Triton natively.
"""

from __future__ import annotations

#: name -> source of each @triton.jit helper the printer may call (emitted in this order when used).
HELPERS: dict[str, str] = {
    "_as_bool": '''
@triton.jit
def _as_bool(x):
    """x (a test of the head or of parameters alone: a scalar) as a bool. Triton's interpreter tags a
    comparison of scalars with its operands' dtype, which broadcasting it beside a tile then keeps; compiled,
    the select folds away."""
    return tl.where(x, True, False)
''',
    "_floordiv": '''
@triton.jit
def _floordiv(a, b):
    """Floored integer division (Python's //); a // 0 == 0."""
    safe = tl.where(b == 0, 1, b)
    t = a // safe
    t = t - ((a % safe != 0) & ((a < 0) != (safe < 0))).to(t.dtype)
    return tl.where(b == 0, 0, t)
''',
    "_floordiv_c": '''
@triton.jit
def _floordiv_c(a, B: tl.constexpr):
    """Floored integer division by a positive constant."""
    t = a // B
    return t - ((a % B != 0) & (a < 0)).to(t.dtype)
''',
    "_mod": '''
@triton.jit
def _mod(a, b):
    """Floored integer modulo (Python's %, the sign of b); a % 0 == a."""
    safe = tl.where(b == 0, 1, b)
    r = a % safe
    r = tl.where((r != 0) & ((r < 0) != (safe < 0)), r + safe, r)
    return tl.where(b == 0, a, r)
''',
    "_mod_c": '''
@triton.jit
def _mod_c(a, B: tl.constexpr):
    """Floored integer modulo by a positive constant."""
    r = a % B
    return tl.where(r < 0, r + B, r)
''',
    "_fmod": '''
@triton.jit
def _fmod(a, b):
    """Floored float modulo: a - b * floor(a / b)."""
    return a - b * tl.floor(a / b)
''',
    "_ipow": '''
@triton.jit
def _ipow(base, e):
    """Integer power base ** e for 0 <= e < 64 (binary exponentiation)."""
    out = base * 0 + 1
    b = base
    for _bit in tl.static_range(6):
        out = tl.where((e & 1) != 0, out * b, out)
        b = b * b
        e = e >> 1
    return out
''',
    "_fpow": '''
@triton.jit
def _fpow(x, y):
    """Float power x ** y (negative bases only for integral y)."""
    ax = tl.abs(x)
    r = tl.exp2(y * tl.log2(ax))
    odd = (y - 2.0 * tl.floor(y * 0.5)) == 1.0
    integral = tl.floor(y) == y
    r = tl.where(x < 0, tl.where(integral, tl.where(odd, -r, r), float("nan")), r)
    return tl.where((x == 0) & (y == 0), 1.0, r)
''',
    "_tanh": '''
@triton.jit
def _tanh(x):
    """tanh, overflow-free: sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|)."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
''',
    "_softcap_tanh": '''
@triton.jit
def _softcap_tanh(x):
    """tanh(x) in float32 with one exp2 and one approximate reciprocal (div.full.f32 on the GPU, a
    plain division in the interpreter): 2 / (1 + 2^(-2 log2(e) x)) - 1, exactly -1 or 1 where the
    power overflows or underflows; for |x| < 0.25, where 1 + 2^(...) cancels, the odd Taylor
    polynomial to x^9 (relative error below 1e-8 there)."""
    wide = tl.fdiv(2.0, 1.0 + tl.exp2(-2.8853900817779268 * x), ieee_rounding=False) - 1.0
    x2 = x * x
    near0 = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                 + x2 * 0.021869488536155203)))
    return tl.where(tl.abs(x) < 0.25, near0, wide)
''',
    "_minimum": '''
# Combine function of minima (tl.reduce): the standard library's, which the interpreter reduces with numpy
_minimum = tl.standard._elementwise_min
''',
    "_int_bound": '''
@triton.jit
def _int_bound(x, BIG: tl.constexpr, CEIL: tl.constexpr, NAN_HIGH: tl.constexpr):
    """An int32 c such that, for every int n with |n| < BIG, n <= x == n <= c and n > x == n > c
    (floor: CEIL false), or n < x == n < c and n >= x == n >= c (ceil: CEIL true); a NaN x gives
    -BIG (NAN_HIGH false: for <=, <) or BIG (for >=, >), where every such comparison is False."""
    y = tl.ceil(x) if CEIL else tl.floor(x)
    y = tl.minimum(tl.maximum(y, -BIG), BIG)
    y = tl.where(x == x, y, BIG if NAN_HIGH else -BIG)
    return y.to(tl.int32)
''',
    "_bit_length": '''
@triton.jit
def _bit_length(x):
    """Python's int.bit_length of |x|."""
    y = tl.abs(x)
    out = y * 0
    for i in tl.static_range(6):
        s = 32 >> i
        big = (y >> s) != 0
        out = out + tl.where(big, s, 0)
        y = tl.where(big, y >> s, y)
    return out + (y > 0).to(out.dtype)
''',
    "_window": '''
@triton.jit
def _window(qa, ka, L, SIZE: tl.constexpr, DIL: tl.constexpr, STRIDE: tl.constexpr, CAUSAL: tl.constexpr):
    """NATTEN neighborhood along one axis of length L: may query coordinate qa attend key coordinate ka? (L a
    literal where the length is bound, and specialised as one; a paged row's key count where it is its own)"""
    g = qa % DIL
    same = g == ka % DIL
    lg = (L - g + DIL - 1) // DIL
    iq = qa // DIL
    ik = ka // DIL
    if CAUSAL:
        leader = tl.minimum((iq // STRIDE) * STRIDE + STRIDE - 1, lg - 1)
        lo = tl.maximum(leader - SIZE + 1, 0)
        hi = iq
    else:
        leader = tl.minimum((iq // STRIDE) * STRIDE + STRIDE // 2, lg - 1)
        centre = tl.minimum(tl.maximum(leader, SIZE // 2), lg - 1 - (SIZE // 2 + SIZE % 2 - 1))
        lo = centre - SIZE // 2
        hi = centre + (SIZE // 2 + SIZE % 2 - 1)
    return same & (ik >= lo) & (ik <= hi)
''',
}


def helper_sources(names: set[str]) -> str:
    """The sources of the named helpers, in ``HELPERS``'s order."""
    return "\n\n".join(HELPERS[n].strip("\n") for n in HELPERS if n in names)


#: The helpers every kernel module defines (after ``HELPERS``'s).
DOT_HELPERS = '''

# Combine functions of row sums and maxima for tl.reduce (tl.sum and tl.max are jit functions, which the
# interpreter runs only where TRITON_INTERPRET was set before Triton was imported). They are the standard library's
# own, which the interpreter reduces with numpy; it would apply a combine function defined here element by element
# in Python (about a second per reduction of a 64x64 tile).
_add = tl.standard._sum_combine
_maximum = tl.standard._elementwise_max


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b with fp32 accumulation. DOT 0: native (fp16/bf16 tensor cores); 1: fp32 inputs,
    exact products (no tf32); 2: operands widened to fp32 first (bf16 under the interpreter)."""
    if DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)
'''
