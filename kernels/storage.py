"""How the step kernels store each dtype: 16-bit floats as bits, computed in float32.

A layer of dtype float32 or float64 stores and computes in that dtype.  A layer of dtype
float16 or bfloat16 stores its activations in 16 bits and computes in float32
(``compute_dtype``): the kernels read a 16-bit value into float32 (``load``), do the gate math
in float32 and round the result back (``store``, round to nearest, ties to even, as every
float conversion of NumPy, ml_dtypes and CUDA does).  Which kernel parameter is stored and
which is computed: the roles of ``kernels/signatures.py``.

Numba's CPU target has no float16 and neither target has bfloat16, so the kernels see both as
``uint16`` arrays of their bit patterns (``bits`` makes that view) and convert with integer
and float32 arithmetic that is branch-free (selects), so a row of it vectorises on the CPU:

* bfloat16 is the upper half of a float32: ``load`` shifts it up; ``store`` rounds the lower
  half away (adding ``0x7FFF`` plus the lowest kept bit, the usual ties-to-even trick) and
  keeps a NaN a quiet NaN.
* float16 after F. Giesen's ``half_to_float`` and ``float_to_half_fast3_rtne`` (public domain,
  https://gist.github.com/rygorous/2156668): the exponent rebiased by integer adds, subnormal
  halves through one float32 subtraction of ``2^-14``, subnormal results through one float32
  addition of ``0.5``, whose rounding is the one wanted; no operand of either is subnormal.

``tests/test_storage.py`` checks both against NumPy and ml_dtypes: every one of the 65536 bit
patterns loaded, and stores of float32 values over the whole range, specials included.
"""
import functools
from types import SimpleNamespace

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

#: dtypes stored in 16 bits and computed in float32
HALF_DTYPES = ("float16", "bfloat16")


@functools.lru_cache(maxsize=None)
def dtype_name(dtype):
    """The name of a dtype given as a name, a NumPy dtype or a scalar type.  Cached: NumPy
    builds ``dtype.name`` anew on each access (microseconds), and every layer call asks."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def compute_dtype(dtype):
    """The dtype the kernels compute ``dtype`` in: float32 for the 16-bit dtypes."""
    name = dtype_name(dtype)
    return np.dtype(np.float32) if name in HALF_DTYPES else np.dtype(name)


def kernel_dtype(dtype):
    """The dtype of ``dtype``'s stored arrays as the kernels see them: uint16 bit patterns for
    the 16-bit dtypes, else ``dtype`` itself."""
    name = dtype_name(dtype)
    return np.dtype(np.uint16) if name in HALF_DTYPES else np.dtype(name)


def bits(a):
    """``a`` as the kernels take it: a ``uint16`` view of a float16 or bfloat16 array (NumPy or
    CuPy), anything else unchanged.  Every launch of a 16-bit layer's kernels asks this of
    each argument, so it looks at the item size and kind (bfloat16's is 'V'), not at
    ``dtype.name``, which NumPy builds anew on each access (microseconds)."""
    dtype = getattr(a, "dtype", None)
    if dtype is not None and dtype.itemsize == 2 and dtype.kind in "fV":
        return a.view(np.uint16)
    return a


@intrinsic
def _float_from_bits(typingctx, u):
    """The float32 whose bit pattern is the low 32 bits of the unsigned integer ``u`` (Numba
    widens unsigned arithmetic to 64 bits)."""
    if not isinstance(u, types.Integer) or u.signed or u.bitwidth < 32:
        return None

    def codegen(context, builder, signature, args):
        low = args[0] if u.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(u), codegen


@intrinsic
def _bits_from_float(typingctx, x):
    """The bit pattern of the float32 ``x``, as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


_U = np.uint32
_SIGN, _ABS = _U(0x80000000), _U(0x7FFFFFFF)
_INF_BITS = _U(0x7F800000)

# bfloat16
_BF16_ROUND, _BF16_QUIET = _U(0x7FFF), _U(0x0040)

# float16 -> float32
_H_MAGNITUDE, _H_SIGN = _U(0x7FFF), _U(0x8000)
_H_EXP_SHIFTED = _U(0x7C00 << 13)      # a half's exponent field, moved to float32's place
_H_REBIAS = _U((127 - 15) << 23)      # float32 bias minus half bias, in the exponent field
_H_INF_REBIAS = _U((128 - 16) << 23)  # and again for Inf/NaN: exponent 31 -> 255
_H_ONE_EXP = _U(1 << 23)
_H_SUBNORMAL_MAGIC = np.float32(2.0 ** -14)

# float32 -> float16
_F16_OVERFLOW = _U((127 + 16) << 23)  # 65536.0: this and above round to Inf (or are Inf/NaN)
_F16_NORMAL_MIN = _U(113 << 23)       # 2^-14: below it the half is subnormal or zero
_F16_DENORM_MAGIC = np.float32(0.5)   # bits ((127 - 15) + (23 - 10) + 1) << 23
_F16_DENORM_MAGIC_BITS = _U(126 << 23)
_F16_UNBIAS = _U(((127 - 15) << 23) - 0xFFF)  # subtracted: rebias, minus the rounding half
_F16_INF, _F16_QNAN = _U(0x7C00), _U(0x7E00)
_ONE_U = _U(1)


@numba.njit(inline="always")
def load_bfloat16(u):
    """The float32 value of the bfloat16 bit pattern ``u``."""
    return _float_from_bits(_U(u) << _U(16))


@numba.njit(inline="always")
def store_bfloat16(x):
    """The bfloat16 bit pattern nearest float32 ``x`` (ties to even); a NaN stays NaN."""
    u = _bits_from_float(np.float32(x))  # (a no-op on float32; the simulator passes floats)
    rounded = (u + _BF16_ROUND + ((u >> _U(16)) & _ONE_U)) >> _U(16)
    quiet_nan = (u >> _U(16)) | _BF16_QUIET
    return np.uint16(quiet_nan if (u & _ABS) > _INF_BITS else rounded)


@numba.njit(inline="always")
def load_float16(h):
    """The float32 value of the float16 bit pattern ``h``."""
    u = _U(h)
    o = (u & _H_MAGNITUDE) << _U(13)
    exponent = o & _H_EXP_SHIFTED
    o = o + _H_REBIAS
    special = _float_from_bits(o + _H_INF_REBIAS)                       # Inf, NaN
    subnormal = _float_from_bits(o + _H_ONE_EXP) - _H_SUBNORMAL_MAGIC  # zero, subnormal
    value = special if exponent == _H_EXP_SHIFTED else (
        subnormal if exponent == _U(0) else _float_from_bits(o))
    return _float_from_bits(_bits_from_float(value) | ((u & _H_SIGN) << _U(16)))


@numba.njit(inline="always")
def store_float16(x):
    """The float16 bit pattern nearest float32 ``x`` (ties to even; Inf beyond 65504 and the
    rounding boundary above it); a NaN stays NaN."""
    u = _bits_from_float(np.float32(x))
    sign = u & _SIGN
    u = u ^ sign
    large = _F16_QNAN if u > _INF_BITS else _F16_INF
    small = _bits_from_float(_float_from_bits(u) + _F16_DENORM_MAGIC) - _F16_DENORM_MAGIC_BITS
    normal = (u - _F16_UNBIAS + ((u >> _U(13)) & _ONE_U)) >> _U(13)
    o = large if u >= _F16_OVERFLOW else (small if u < _F16_NORMAL_MIN else normal)
    return np.uint16(o | (sign >> _U(16)))


@functools.lru_cache(maxsize=None)
def make_storage(dtype):
    """``load``/``store`` between the kernels' stored values and the compute dtype, and the
    stored zero, for ``dtype`` (float32, float64, float16 or bfloat16)."""
    name = dtype_name(dtype)
    if name == "float16":
        load, store = load_float16, store_float16
    elif name == "bfloat16":
        load, store = load_bfloat16, store_bfloat16
    else:
        @numba.njit(inline="always")
        def load(x):
            return x

        store = load
    stored = kernel_dtype(name)
    return SimpleNamespace(name=name, kernel_dtype=stored, compute_dtype=compute_dtype(name),
                           load=load, store=store, zero=stored.type(0))
