"""The 16-bit conversions of the step kernels (``kernels/storage.py``) against NumPy's float16
and ml_dtypes' bfloat16: every one of the 65536 bit patterns loaded, and stores of float32
values over the whole range (every 97th bit pattern, and the boundaries where rounding changes
exponent, overflows or goes subnormal).  The CPU and the simulated CUDA kernels call these same
compiled functions."""
import ml_dtypes
import numba
import numpy as np
import pytest

from gpurnn.kernels.storage import (bits, compute_dtype, kernel_dtype, load_bfloat16,
                                    load_float16, store_bfloat16, store_float16)

FORMATS = {"float16": (np.dtype(np.float16), load_float16, store_float16),
           "bfloat16": (np.dtype(ml_dtypes.bfloat16), load_bfloat16, store_bfloat16)}


@numba.njit
def _map(fn, a, out):
    for i in range(a.size):
        out[i] = fn(a[i])
    return out


def _same_or_both_nan(a, b):
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize("name", FORMATS)
def test_load_is_exact_for_every_bit_pattern(name):
    dtype, load, _ = FORMATS[name]
    patterns = np.arange(1 << 16, dtype=np.uint16)
    got = _map(load, patterns, np.empty(patterns.size, np.float32))
    want = patterns.view(dtype).astype(np.float32)
    assert _same_or_both_nan(got, want).all()


def _float32_samples():
    stride = np.arange(0, 1 << 32, 97, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.996, 65520.0, -65520.0,
                      2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 3 * 2.0 ** -26,
                      1e-45, np.finfo(np.float32).max, 3.3895314e38, 1.0 + 2.0 ** -8,
                      1.0 + 3 * 2.0 ** -9, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -12],
                     dtype=np.float32)
    ties = (np.arange(1, 1 << 16, 7, dtype=np.uint32) << np.uint32(16)
            | np.uint32(0x8000)).view(np.float32)  # halfway between two bfloat16 values
    return np.concatenate([stride, edges, -edges, ties])


@pytest.mark.parametrize("name", FORMATS)
def test_store_rounds_to_nearest_even_over_the_float32_range(name):
    dtype, _, store = FORMATS[name]
    x = _float32_samples()
    got = _map(store, x, np.empty(x.size, np.uint16))
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dtype).view(np.uint16)
    nan = np.isnan(x)
    assert (got[~nan] == want[~nan]).all(), x[~nan][got[~nan] != want[~nan]][:5]
    assert np.isnan(got[nan].view(dtype).astype(np.float32)).all()  # a NaN stays NaN


def test_dtype_roles_and_bit_views():
    assert compute_dtype("bfloat16") == compute_dtype(np.float16) == np.float32
    assert compute_dtype("float64") == np.float64
    assert kernel_dtype("float16") == kernel_dtype("bfloat16") == np.uint16
    assert kernel_dtype("float32") == np.float32
    a = np.array([1.0, -2.0], dtype=ml_dtypes.bfloat16)
    assert bits(a).dtype == np.uint16 and np.shares_memory(bits(a), a)
    f = np.ones(2, np.float32)
    assert bits(f) is f
