"""The CUDA backend's GEMMs: one ``cublasGemmEx`` call each, on CuPy's current stream.

Every product of the drivers (``drivers.py``) whose operands share a type goes here: float64
(``CUBLAS_COMPUTE_64F``), float32 (``CUBLAS_COMPUTE_32F``, or ``CUBLAS_COMPUTE_32F_FAST_TF32``
when TF32 is on), and float16/bfloat16 operands accumulated in float32 (``CUBLAS_COMPUTE_32F``,
tensor cores), the result written as float32 or rounded to 16 bits.  CuPy's ``matmul`` cannot
write a float32 result of 16-bit operands, which the gate pre-activations, the recurrent
products and the weight gradients of a 16-bit layer are (``drivers.py``, Precision), and it
costs tens of microseconds of host time a call, where a bare cuBLAS call costs a few.

Bindings (``Blas``).  With nvmath-python installed, gpurnn owns a cuBLAS handle through
``nvmath.bindings.cublas``, with a workspace of its own per stream: such calls can be captured
into a CUDA graph (``CUDABackend.run_graph``).  Without it, CuPy's handle and binding run the
same call; CuPy refuses cuBLAS while a stream captures (its ``setStream``), so then there are no
graphs.

Layout.  cuBLAS is column-major; a row-major ``[M, N]`` array is the column-major ``[N, M]``
array of the same memory.  So ``out = a @ b`` in row-major is ``out^T = b^T a^T`` in
column-major: cuBLAS is called with the operands swapped, ``m = N``, ``n = M``, and each
operand not transposed where its rows are contiguous, transposed where its columns are (a
``w.T`` view): ``operand_layout``, the rule the CPU loops' CBLAS calls use.
"""
import logging

import numpy as np

from ..kernels.loops import operand_layout

_log = logging.getLogger("gpurnn")

#: cudaDataType_t of each operand dtype
CUDA_TYPES = {"float64": 1, "float32": 0, "float16": 2, "bfloat16": 14}
CUBLAS_COMPUTE_32F = 68
CUBLAS_COMPUTE_64F = 70
CUBLAS_COMPUTE_32F_FAST_TF32 = 77
CUBLAS_GEMM_DEFAULT = -1
#: alpha = 1, beta = 0 as host scalars of each scale type (double for COMPUTE_64F, else
#: float), alive as long as the module, and their addresses by compute type
_ALPHA_BETA = {np.float32: (np.ones(1, np.float32), np.zeros(1, np.float32)),
               np.float64: (np.ones(1, np.float64), np.zeros(1, np.float64))}
_SCALAR_PTRS = {compute: tuple(a.ctypes.data for a in _ALPHA_BETA[scale])
                for compute, scale in ((CUBLAS_COMPUTE_32F, np.float32),
                                       (CUBLAS_COMPUTE_32F_FAST_TF32, np.float32),
                                       (CUBLAS_COMPUTE_64F, np.float64))}
#: dtype -> cudaDataType_t (-1: none), filled on first sight: ``dtype.name`` costs over a
#: microsecond a call, a dict lookup by dtype a tenth of that, and every GEMM asks three times
_CODES = {}
#: cuBLAS workspace per stream: NVIDIA's recommendation for Hopper (cuBLAS docs,
#: cublasSetWorkspace), and PyTorch's default there
WORKSPACE_BYTES = 32 * 1024 * 1024


def _code(dtype):
    code = _CODES.get(dtype)
    if code is None:
        code = _CODES[dtype] = CUDA_TYPES.get(dtype.name, -1)
    return code


def takes(a, b, out):
    """Whether one ``cublasGemmEx`` takes these dtypes: both operands of one type (float64,
    float32, float16 or bfloat16), the result of that type, or float32 for 16-bit operands
    (cuBLAS's table of supported combinations; a float32 operand beside a 16-bit one is not
    there)."""
    return (a.dtype == b.dtype and _code(a.dtype) >= 0
            and (out.dtype == a.dtype
                 or (a.itemsize == 2 and out.dtype == np.dtype(np.float32))))


def compute_type(dtype, tf32):
    """``cublasComputeType_t`` for operands of ``dtype``: float64 in float64, the rest
    accumulated in float32, float32 operands on TF32 tensor cores where ``tf32``."""
    if dtype.itemsize == 8:
        return CUBLAS_COMPUTE_64F
    if dtype.itemsize == 4 and tf32:
        return CUBLAS_COMPUTE_32F_FAST_TF32
    return CUBLAS_COMPUTE_32F


def _layout(x, what):
    transposed, ld = operand_layout(x.shape[0], x.shape[1], x.strides[0], x.strides[1],
                                    x.itemsize)
    if transposed < 0:
        raise ValueError(f"gemm_ex: {what} of shape {x.shape} and strides {x.strides} has unit "
                         f"stride along neither axis")
    return transposed, ld  # CUBLAS_OP_N = 0, CUBLAS_OP_T = 1


def gemm_ex(a, b, out, gemm, handle, tf32=False):
    """``out = a @ b``: a [M, K], b [K, N], out [M, N] with contiguous rows, in dtypes
    ``takes`` accepts.  ``gemm``: a binding of ``cublasGemmEx`` (nvmath's ``gemm_ex`` or
    CuPy's ``gemmEx``, the same arguments); ``handle``: a cuBLAS handle on the stream the
    product belongs to; ``tf32``: float32 operands on TF32 tensor cores."""
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"gemm_ex: shapes must be a [M, K], b [K, N], out [M, N], got "
                         f"{a.shape}, {b.shape}, {out.shape}")
    if not takes(a, b, out):
        raise TypeError(f"gemm_ex: a and b must have one dtype of {tuple(CUDA_TYPES)} and out "
                        f"theirs (or float32 for 16-bit a and b), got {a.dtype}, {b.dtype}, "
                        f"{out.dtype}")
    ta, lda = _layout(a, "a")
    tb, ldb = _layout(b, "b")
    to, ldo = _layout(out, "out")
    if to:
        raise ValueError("gemm_ex: out must have contiguous rows")
    if M == 0 or N == 0:
        return
    if K == 0:
        out[...] = 0
        return
    compute = compute_type(a.dtype, tf32)
    one, zero = _SCALAR_PTRS[compute]
    gemm(handle, tb, ta, N, M, K, one, b.data.ptr, _code(b.dtype), ldb, a.data.ptr,
         _code(a.dtype), lda, zero, out.data.ptr, _code(out.dtype), ldo, compute,
         CUBLAS_GEMM_DEFAULT)


class Blas:
    """``gemm(a, b, out, tf32)`` on CuPy's current stream, through nvmath-python's cuBLAS
    binding and a handle of gpurnn's own where nvmath-python is installed (``capturable``), else
    through CuPy's handle and binding.

    ``bind(stream_ptr)`` points the own handle at a stream with that stream's workspace
    (``cublasSetStream`` resets the workspace, so both are set together, and only when the
    stream changes).  A workspace per stream: two streams never share one.  The handle belongs
    to the device current when it is made: one GPU per process, as for the ``fast`` launch
    (docs/gpu.md).
    """

    def __init__(self, cupy, nvmath_cublas=None):
        self._cupy = cupy
        self._nv = nvmath_cublas
        self.capturable = nvmath_cublas is not None
        self._handle = nvmath_cublas.create() if self.capturable else None
        self._stream = None
        self._workspaces = {}  # stream pointer -> uint8 device buffer

    @classmethod
    def create(cls, cupy):
        """Through nvmath-python where it is installed and works here, else through CuPy (the
        reason logged: a broken install must cost graphs, not the GPU)."""
        try:
            from nvmath.bindings import cublas as nvmath_cublas
        except ImportError:
            return cls(cupy, None)
        try:
            return cls(cupy, nvmath_cublas)
        except Exception as exc:  # noqa: BLE001 - e.g. no libcublas that nvmath can load
            _log.warning("nvmath-python's cuBLAS binding failed (%s: %s): GEMMs run through "
                         "CuPy, without CUDA graphs", type(exc).__name__, exc)
            return cls(cupy, None)

    def bind(self, stream_ptr):
        """Make the own handle run on stream ``stream_ptr`` (a no-op without nvmath-python)."""
        if not self.capturable or stream_ptr == self._stream:
            return
        workspace = self._workspaces.get(stream_ptr)
        if workspace is None:
            workspace = self._cupy.empty(WORKSPACE_BYTES, dtype=np.uint8)
            self._workspaces[stream_ptr] = workspace
        self._nv.set_stream(self._handle, stream_ptr)
        self._nv.set_workspace(self._handle, workspace.data.ptr, WORKSPACE_BYTES)
        self._stream = stream_ptr

    def gemm(self, a, b, out, tf32):
        if self.capturable:
            self.bind(self._cupy.cuda.get_current_stream().ptr)
            gemm_ex(a, b, out, self._nv.gemm_ex, self._handle, tf32)
        else:
            from cupy_backends.cuda.libs import cublas as cupy_cublas

            gemm_ex(a, b, out, cupy_cublas.gemmEx, self._cupy.cuda.device.get_cublas_handle(),
                    tf32)
