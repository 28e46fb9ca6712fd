"""CPU kernels: compiled loops over every ``(b, j)`` element of one time step, and whole-sequence
time loops compiled around NumPy's own BLAS.

The gate math is in ``cell_math`` and the time loops in ``gpurnn/drivers.make_loops``; here is
only how they are compiled for the CPU:

* step kernels: a loop over ``(b, j)`` calling the element function.  Single-threaded on
  purpose: the per-step pointwise work is small, and a Numba thread pool spinning against
  OpenBLAS's threads cost 60x on these machines (DESIGN.md).  The cores belong to BLAS.
* sequence loops: ``drivers.make_loops`` compiled with Numba, the per-step recurrent GEMM a
  direct call of ``cblas_?gemm`` in the very OpenBLAS NumPy uses (so one BLAS thread pool, the
  one threadpoolctl limits for NumPy).  No Python runs between steps: at T=1000, B=1 that
  overhead (two dispatches, slicing, a NumPy matmul per step) was most of the time.

Numba's on-disk cache (``cache=True``) keys a closure by the pickled contents of its cells.  A
Numba dispatcher pickles with a random per-process UUID, so every closure over a dispatcher
(all of these) missed the cache in every new process and recompiled.  ``_stable_cache_keys``
gives each dispatcher a UUID derived from what it is, so a warm cache is hit; the pickle still
holds the functions' code and constants, so a change of the math still misses.
"""
import ctypes
import os

import numba
import numpy as np
from numba import types
from numba.core.datamodel import models

from .cell_math import STEP_KERNELS, kernel_params, make_cell_math

# CBLAS enums (plain C ints in every CBLAS).
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


# Each step kernel is generated with its element function's explicit parameter list, so that
# the element function can be inlined (Numba cannot inline a call with ``*args``).  Not inlined,
# each (b, j) element paid a real call passing a dozen arrays: about 2/3 of an LSTM step's
# pointwise time (172 ns an element at B=32, H=256, measured).  The factory keeps the element
# function a closure cell, which Numba's cache key includes (a change of the math recompiles);
# compiled with this file's name, so Numba can cache it.
_STEP_TEMPLATE = """
def factory(elem):
    def {name}(B, H, {params}):
        for b in range(B):
            for j in range(H):
                elem(b, j, H, {params})

    return {name}
"""


def _cpu_step_kernel(name, elem):
    namespace = {"__name__": __name__}  # the module Numba records for cached code
    source = _STEP_TEMPLATE.format(name=name, params=", ".join(kernel_params(elem)))
    exec(compile(source, __file__, "exec"), namespace)
    inlined = numba.njit(inline="always")(elem.py_func)
    # No NRT: a step kernel allocates nothing, and with NRT each inlined element call
    # increfs/decrefs its dozen arrays (atomic operations) for every (b, j): 806 against 483 us
    # for an LSTM step at B=32, H=256, measured.
    return numba.njit(cache=True, _nrt=False)(namespace["factory"](inlined))


def make_cpu_kernels(dtype):
    """``{kernel_name: fn(B, H, *args)}`` for one dtype; args as the element functions take."""
    math_ = make_cell_math(dtype)
    kernels = {name: _cpu_step_kernel(name, math_[elem]) for name, elem in STEP_KERNELS.items()}
    for name, kernel in kernels.items():
        _stable_cache_keys(kernel, f"{np.dtype(dtype).name}.{name}")
    return kernels


def numpy_blas():
    """``(path, (sgemm symbol, dgemm symbol), int type)`` of the OpenBLAS NumPy uses, or None.

    NumPy's wheels bundle ``scipy_openblas`` with ILP64 symbols (``scipy_cblas_sgemm64_``,
    64-bit ints); other builds export plain ``cblas_sgemm``.  Anything else (MKL, Accelerate, no
    threadpoolctl): None, and the drivers run their per-step Python loop with NumPy's matmul.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    candidates = [d for d in threadpool_info()
                  if d.get("user_api") == "blas" and d.get("internal_api") == "openblas"]
    # NumPy's own library first (a SciPy in the process may bring a second OpenBLAS).
    candidates.sort(key=lambda d: not d["filepath"].startswith(numpy_dir))
    for d in candidates:
        lib = ctypes.CDLL(d["filepath"])
        for prefix, suffix, int_t in (("scipy_cblas_", "64_", types.int64),
                                      ("cblas_", "64_", types.int64),
                                      ("scipy_cblas_", "", types.int32),
                                      ("cblas_", "", types.int32)):
            symbols = (f"{prefix}sgemm{suffix}", f"{prefix}dgemm{suffix}")
            if all(hasattr(lib, symbol) for symbol in symbols):
                return d["filepath"], symbols, int_t
    return None


def _external_gemm(path, symbols, int_t):
    """``(sgemm, dgemm)`` as Numba external functions, resolved by name at link time (also for
    code loaded from Numba's cache); a ctypes pointer instead would make the loops uncachable."""
    import llvmlite.binding as llvm

    llvm.load_library_permanently(path)
    e, i, p = types.int32, int_t, types.intp  # CBLAS enum, blasint, pointer (as an address)
    return tuple(_BlasFunction(symbol, types.void(e, e, e, i, i, i, s, p, i, p, i, s, p, i))
                 for symbol, s in zip(symbols, (types.float32, types.float64)))


class _BlasFunction(types.ExternalFunction):
    """An external function that pickles as its symbol and signature.  Numba's cache key
    pickles the functions a cached function calls; the base class pickles with a per-process
    class id, so every new process would miss the cache."""

    def __reduce__(self):
        return _BlasFunction, (self.symbol, self.sig)


models.register_default(_BlasFunction)(models.OpaqueModel)  # as the base class's


_BLAS = numpy_blas()
_sgemm, _dgemm = _external_gemm(*_BLAS) if _BLAS is not None else (None, None)


@numba.njit(inline="always")
def _operand(x):
    """(CBLAS transpose flag, leading dimension) of a 2-D operand with unit stride on one axis,
    or (-1, 0)."""
    rows, cols = x.shape
    item = x.itemsize
    if x.strides[1] == item and (rows == 1 or x.strides[0] >= cols * item):
        return _NO_TRANS, max(x.strides[0] // item, cols)
    if x.strides[0] == item and (cols == 1 or x.strides[1] >= rows * item):
        return _TRANS, max(x.strides[1] // item, rows)
    return -1, 0


def _make_matmul(dtype):
    """A jitted ``matmul(a, b, out)``: ``out = a @ b`` by one ``cblas_?gemm`` call.

    a [M, K], b [K, N], out [M, N] (unit stride along rows); ``a`` and ``b`` may be transposed
    views (unit stride along the first axis), as ``w.T`` is.
    """
    dtype = np.dtype(dtype)
    single = dtype == np.float32
    one, zero = dtype.type(1), dtype.type(0)
    # The symbol in the message also puts it in the cache key: another BLAS build recompiles.
    error = f"matmul by {_BLAS[1][0 if single else 1]}: shapes must " \
            "be a [M, K], b [K, N], out [M, N], each with unit stride along one axis"

    @numba.njit(cache=True)
    def matmul(a, b, out):
        M, K = a.shape
        N = b.shape[1]
        ta, lda = _operand(a)
        tb, ldb = _operand(b)
        to, ldo = _operand(out)
        if b.shape[0] != K or out.shape[0] != M or out.shape[1] != N or ta < 0 or tb < 0 \
                or to != _NO_TRANS:
            raise ValueError(error)
        if M == 0 or N == 0:
            return
        if K == 0:
            out[...] = zero
            return
        if single:
            _sgemm(_ROW_MAJOR, ta, tb, M, N, K, one, a.ctypes.data, lda, b.ctypes.data, ldb,
                   zero, out.ctypes.data, ldo)
        else:
            _dgemm(_ROW_MAJOR, ta, tb, M, N, K, one, a.ctypes.data, lda, b.ctypes.data, ldb,
                   zero, out.ctypes.data, ldo)

    return matmul


def make_cpu_loops(dtype, kernels):
    """``drivers.make_loops`` compiled for the CPU: ``{loop_name: jitted loop}``, or None where
    NumPy's BLAS was not found (the drivers then loop in Python)."""
    from gpurnn import drivers

    if _BLAS is None:
        return None
    name = np.dtype(dtype).name
    matmul = _make_matmul(dtype)
    _stable_cache_keys(matmul, f"{name}.matmul")
    slots = numba.njit(cache=True)(drivers._slots)
    _stable_cache_keys(slots, "slots")
    loops = {}
    for loop_name, fn in drivers.make_loops(matmul, kernels, slots).items():
        loops[loop_name] = numba.njit(cache=True)(fn)
        _stable_cache_keys(loops[loop_name], f"{name}.{loop_name}")
    return loops


def _stable_cache_keys(dispatcher, tag):
    """Give ``dispatcher`` and every dispatcher in its closures a UUID derived from ``tag``.

    The pickled closure (Numba's cache key) then no longer changes from process to process.
    Uses Numba's private ``_set_uuid``; where it is missing the cache only misses, as before.
    """
    set_uuid = getattr(dispatcher, "_set_uuid", None)
    if set_uuid is None:
        return
    try:
        set_uuid(f"gpurnn.{tag}")
    except AssertionError:  # already has one (it was pickled before): nothing to change
        return
    for cell in dispatcher.py_func.__closure__ or ():
        inner = cell.cell_contents
        if isinstance(inner, numba.core.dispatcher.Dispatcher):
            _stable_cache_keys(inner, f"{tag}.{inner.py_func.__name__}")


_stable_cache_keys(_operand, "operand")  # named by the matmul closures' code
