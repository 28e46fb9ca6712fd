"""The GEMMs of the CUDA backend (``gpurnn/engine/cublas.py``) against a NumPy model of
``cublasGemmEx``: this checks what runs without a GPU, the arguments (operands swapped for
row-major, transpose flags, leading dimensions, data and compute types, the scalars' type), on
every operand layout the drivers pass, and ``Blas``'s handling of streams and workspaces.  The
call into cuBLAS itself is checked by the suite on a real GPU."""
import ctypes
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from numpy.lib.array_utils import byte_bounds

from gpurnn.engine.cublas import (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32,
                                  CUBLAS_COMPUTE_64F, CUDA_TYPES, WORKSPACE_BYTES, Blas,
                                  gemm_ex, takes)

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
    return x.T if trans else x


def _memory(ptr, nbytes):
    """The bytes [ptr, ptr + nbytes), which must lie within one array given to gemm_ex (as
    cuBLAS would read or write them: a wrong leading dimension fails here, not in memory)."""
    assert any(lo <= ptr and ptr + nbytes <= hi for lo, hi in _ALLOCATED), "out of bounds"
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


_CALLS = []  # compute type of each fake call


def fake_gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
                 Ctype, ldc, compute, algo):
    """cublasGemmEx's contract, column-major: C [m, n] = alpha op(A) [m, k] op(B) [k, n] +
    beta C; alpha and beta host pointers of the compute type's scale type (double for
    COMPUTE_64F, else float).  Computed in float64 for COMPUTE_64F, else float32."""
    assert compute in (CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_64F)
    assert transa in (0, 1) and transb in (0, 1)
    _CALLS.append(compute)
    scalar = ctypes.c_double if compute == CUBLAS_COMPUTE_64F else ctypes.c_float
    alpha_ = scalar.from_address(alpha).value
    beta_ = scalar.from_address(beta).value
    assert (alpha_, beta_) == (1.0, 0.0)
    acc = np.float64 if compute == CUBLAS_COMPUTE_64F else np.float32
    a = _column_major(A, _DTYPES[Atype], m, k, lda, transa).astype(acc)
    b = _column_major(B, _DTYPES[Btype], k, n, ldb, transb).astype(acc)
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


@pytest.mark.parametrize("dtype, tf32, compute", [
    (np.float64, False, CUBLAS_COMPUTE_64F), (np.float64, True, CUBLAS_COMPUTE_64F),
    (np.float32, False, CUBLAS_COMPUTE_32F), (np.float32, True, CUBLAS_COMPUTE_32F_FAST_TF32),
    (np.float16, True, CUBLAS_COMPUTE_32F)])
def test_gemm_ex_compute_type_follows_the_dtype_and_tf32(dtype, tf32, compute, rng):
    """float64 in float64 (double scalars), float32 in TF32 only where asked, 16-bit operands
    accumulated in float32 whatever ``tf32`` says."""
    for name, a, b in _cases(rng):
        a, b = a.astype(dtype), b.astype(dtype)
        want = a @ b
        out = np.full(want.shape, 7, dtype)
        _CALLS.clear()
        gemm_ex(_device_like(a), _device_like(b), _device_like(out), fake_gemm_ex, 0, tf32)
        assert _CALLS == [compute], name
        np.testing.assert_allclose(out, want, rtol=1e-3 if dtype == np.float16 else 1e-6,
                                   err_msg=name)


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
    f16, bf16, f32, f64 = (np.ones((2, 2), d)
                           for d in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
    assert takes(bf16, bf16, f32) and takes(bf16, bf16, bf16) and takes(f16, f16, f16)
    assert takes(f32, f32, f32) and takes(f64, f64, f64)
    assert not takes(f32, bf16, f32)   # an embedding's one-hot (float32) and a 16-bit dx
    assert not takes(bf16, f16, f32)
    assert not takes(f16, f16, bf16)
    assert not takes(f32, f32, f16)
    assert not takes(f32, f32, f64) and not takes(f64, f64, f32)


class _FakeNvmath:
    """nvmath.bindings.cublas as ``Blas`` uses it: records the calls."""

    def __init__(self):
        self.calls = []

    def create(self):
        return 41

    def set_stream(self, handle, stream):
        self.calls.append(("set_stream", handle, stream))

    def set_workspace(self, handle, ptr, nbytes):
        self.calls.append(("set_workspace", handle, ptr, nbytes))

    def gemm_ex(self, handle, *args):
        self.calls.append(("gemm_ex", handle))
        fake_gemm_ex(handle, *args)


class _FakeCupy:
    """CuPy's current stream (settable) and ``empty`` over NumPy."""

    def __init__(self):
        self.stream = SimpleNamespace(ptr=100)
        self.cuda = SimpleNamespace(get_current_stream=lambda: self.stream)
        self.buffers = []

    def empty(self, n, dtype):
        buf = _device_like(np.empty(1, dtype))
        self.buffers.append((n, buf))
        return buf


def test_blas_binds_its_handle_to_the_current_stream_with_a_workspace_per_stream(rng):
    nv, cupy = _FakeNvmath(), _FakeCupy()
    blas = Blas(cupy, nv)
    assert blas.capturable
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    out = np.empty((3, 2))
    for stream in (100, 100, 200, 100):
        cupy.stream.ptr = stream
        blas.gemm(_device_like(a), _device_like(b), _device_like(out), tf32=True)
        np.testing.assert_allclose(out, a @ b)
    ws = [buf.data.ptr for _, buf in cupy.buffers]
    assert [n for n, _ in cupy.buffers] == [WORKSPACE_BYTES] * 2  # one per stream, kept
    assert nv.calls == [
        ("set_stream", 41, 100), ("set_workspace", 41, ws[0], WORKSPACE_BYTES),
        ("gemm_ex", 41), ("gemm_ex", 41),
        # cublasSetStream resets the workspace: both are set on every change of stream
        ("set_stream", 41, 200), ("set_workspace", 41, ws[1], WORKSPACE_BYTES), ("gemm_ex", 41),
        ("set_stream", 41, 100), ("set_workspace", 41, ws[0], WORKSPACE_BYTES), ("gemm_ex", 41)]


def test_blas_without_nvmath_cannot_be_captured():
    blas = Blas(_FakeCupy(), None)
    assert not blas.capturable
    blas.bind(100)  # nothing to bind: CuPy's binding sets its handle's stream on each call


def test_a_broken_nvmath_costs_graphs_not_the_gpu(monkeypatch, caplog):
    """nvmath-python installed but unable to make a handle here (no libcublas it can load, say):
    the GEMMs go through CuPy, said once in the log."""
    import logging
    import sys
    import types

    def create():
        raise RuntimeError("libcublas.so.13: cannot open shared object file")

    bindings = types.ModuleType("nvmath.bindings")
    bindings.cublas = SimpleNamespace(create=create)
    monkeypatch.setitem(sys.modules, "nvmath", types.ModuleType("nvmath"))
    monkeypatch.setitem(sys.modules, "nvmath.bindings", bindings)
    with caplog.at_level(logging.WARNING, logger="gpurnn"):
        blas = Blas.create(_FakeCupy())
    assert not blas.capturable
    assert "nvmath-python's cuBLAS binding failed (RuntimeError: libcublas.so.13" in caplog.text
