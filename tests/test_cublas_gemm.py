"""The 16-bit GEMM of the CUDA backend (``gpurnn/engine/cublas.py``) against a NumPy model of
``cublasGemmEx``: this checks what runs without a GPU, the arguments (operands swapped for
row-major, transpose flags, leading dimensions, data types), on every operand layout the
drivers pass.  The call into cuBLAS itself is checked by the suite on a real GPU."""
import ctypes
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from numpy.lib.array_utils import byte_bounds

from gpurnn.engine.cublas import CUBLAS_COMPUTE_32F, CUDA_TYPES, gemm_ex, takes

_DTYPES = {code: np.dtype(name if name != "bfloat16" else ml_dtypes.bfloat16)
           for name, code in CUDA_TYPES.items()}


_ALLOCATED = []  # (first, last + 1) byte addresses of every array handed to gemm_ex


def _device_like(a):
    """What gemm_ex reads of a CuPy array, over a NumPy array (``data.ptr`` its address)."""
    base = a if a.base is None else a.base
    _ALLOCATED.append(byte_bounds(base))
    return SimpleNamespace(shape=a.shape, strides=a.strides, itemsize=a.itemsize, dtype=a.dtype,
                           data=SimpleNamespace(ptr=a.__array_interface__["data"][0]))


def _column_major(ptr, dtype, rows, cols, ld, trans):
    """op(X) [rows, cols] of the column-major X at ``ptr`` with leading dimension ``ld``
    (X stored [rows, cols], or [cols, rows] when ``trans``)."""
    stored_rows, stored_cols = (cols, rows) if trans else (rows, cols)
    count = ld * (stored_cols - 1) + stored_rows
    raw = _memory(ptr, count * dtype.itemsize)
    flat = raw.view(dtype)
    x = np.lib.stride_tricks.as_strided(flat, (stored_rows, stored_cols),
                                        (dtype.itemsize, ld * dtype.itemsize), writeable=False)
    return (x.T if trans else x).astype(np.float32)


def _memory(ptr, nbytes):
    """The bytes [ptr, ptr + nbytes), which must lie within one array given to gemm_ex (as
    cuBLAS would read or write them: a wrong leading dimension fails here, not in memory)."""
    assert any(lo <= ptr and ptr + nbytes <= hi for lo, hi in _ALLOCATED), "out of bounds"
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


def fake_gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
                 Ctype, ldc, compute, algo):
    """cublasGemmEx's contract, column-major: C [m, n] = alpha op(A) [m, k] op(B) [k, n] +
    beta C, in float32 (alpha and beta host float32 pointers)."""
    assert compute == CUBLAS_COMPUTE_32F and transa in (0, 1) and transb in (0, 1)
    alpha_ = ctypes.c_float.from_address(alpha).value
    beta_ = ctypes.c_float.from_address(beta).value
    assert (alpha_, beta_) == (1.0, 0.0)
    a = _column_major(A, _DTYPES[Atype], m, k, lda, transa)
    b = _column_major(B, _DTYPES[Btype], k, n, ldb, transb)
    c_dtype = _DTYPES[Ctype]
    assert ldc >= m
    raw = _memory(C, (ldc * (n - 1) + m) * c_dtype.itemsize)
    c = np.lib.stride_tricks.as_strided(raw.view(c_dtype), (m, n),
                                        (c_dtype.itemsize, ldc * c_dtype.itemsize))
    c[...] = (a @ b).astype(c_dtype)


def _cases(rng):
    """(name, a, b) in the layouts the drivers use."""
    bf16 = ml_dtypes.bfloat16
    x = rng.standard_normal((12, 5)).astype(bf16)          # x.reshape(T*B, I)
    w = rng.standard_normal((8, 5)).astype(bf16)           # W_ih [G*H, I]
    gates = rng.standard_normal((12, 16)).astype(bf16)     # a gate slot [B, S*H]
    yield "x @ w.T", x, w.T
    yield "D.T @ x", rng.standard_normal((12, 8)).astype(bf16).T, x
    yield "strided rows @ rows", gates[:, 12:], rng.standard_normal((4, 8)).astype(bf16)
    yield "row slice of w", rng.standard_normal((3, 8)).astype(np.float16), \
        rng.standard_normal((12, 7)).astype(np.float16)[4:]
    yield "one row", x[:1], w.T


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16_or_float16"])
def test_gemm_ex_computes_a_at_b_for_every_layout(out_dtype, rng):
    for name, a, b in _cases(rng):
        want = a.astype(np.float32) @ b.astype(np.float32)
        dtype = np.float32 if out_dtype == "float32" else a.dtype
        out = np.full(want.shape, 7, dtype)
        gemm_ex(_device_like(a), _device_like(b), _device_like(out), fake_gemm_ex, handle=0)
        np.testing.assert_array_equal(out, want.astype(dtype), err_msg=name)


def test_gemm_ex_refuses_what_cublas_cannot_read(rng):
    a = np.ones((4, 6), np.float16)
    b = np.ones((6, 3), np.float16)
    with pytest.raises(ValueError, match="shapes must be"):
        gemm_ex(_device_like(a), _device_like(a), _device_like(np.ones((4, 3), np.float32)),
                fake_gemm_ex, 0)
    with pytest.raises(ValueError, match="unit stride along neither axis"):
        gemm_ex(_device_like(a[:, ::2]), _device_like(b[::2]),
                _device_like(np.ones((4, 3), np.float32)), fake_gemm_ex, 0)
    with pytest.raises(ValueError, match="out must have contiguous rows"):
        gemm_ex(_device_like(a), _device_like(b), _device_like(np.ones((3, 4), np.float32).T),
                fake_gemm_ex, 0)
    with pytest.raises(TypeError, match="a and b must have one dtype .* got float64, float16"):
        gemm_ex(_device_like(a.astype(np.float64)), _device_like(b),
                _device_like(np.ones((4, 3), np.float32)), fake_gemm_ex, 0)


def test_takes_only_what_cublas_lists():
    f16, bf16, f32 = (np.ones((2, 2), d) for d in (np.float16, ml_dtypes.bfloat16, np.float32))
    assert takes(bf16, bf16, f32) and takes(bf16, bf16, bf16) and takes(f16, f16, f16)
    assert takes(f32, f32, f32)
    assert not takes(f32, bf16, f32)   # an embedding's one-hot (float32) and a 16-bit dx
    assert not takes(bf16, f16, f32)
    assert not takes(f16, f16, bf16)
    assert not takes(f32, f32, f16)
