"""GEMMs of 16-bit operands on the GPU: one ``cublasGemmEx`` call, products accumulated in
float32 (``CUBLAS_COMPUTE_32F``, on tensor cores), the result written as float32 or rounded to
16 bits.  CuPy's ``matmul`` cannot write a float32 result of 16-bit operands, which the
gate pre-activations, the recurrent products and the weight gradients of a 16-bit layer are
(``drivers.py``, Precision).

Layout.  cuBLAS is column-major; a row-major ``[M, N]`` array is the column-major ``[N, M]``
array of the same memory.  So ``out = a @ b`` in row-major is ``out^T = b^T a^T`` in
column-major: cuBLAS is called with the operands swapped, ``m = N``, ``n = M``, and each
operand not transposed where its rows are contiguous, transposed where its columns are (a
``w.T`` view): ``operand_layout``, the rule the CPU loops' CBLAS calls use.
"""
import numpy as np

from ..kernels.loops import operand_layout

#: cudaDataType_t of each operand dtype
CUDA_TYPES = {"float32": 0, "float16": 2, "bfloat16": 14}  # CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)  # alpha, beta (host pointers)


def takes(a, b, out):
    """Whether one ``cublasGemmEx`` with float32 accumulation takes these dtypes: both operands
    of one type (float16, bfloat16 or float32), the result of that type or float32 (cuBLAS's
    table of supported combinations; a float32 operand beside a 16-bit one is not there)."""
    return (a.dtype == b.dtype and a.dtype.name in CUDA_TYPES
            and out.dtype in (a.dtype, np.dtype(np.float32)))


def _layout(x, what):
    transposed, ld = operand_layout(x.shape[0], x.shape[1], x.strides[0], x.strides[1],
                                    x.itemsize)
    if transposed < 0:
        raise ValueError(f"gemm_ex: {what} of shape {x.shape} and strides {x.strides} has unit "
                         f"stride along neither axis")
    return transposed, ld  # CUBLAS_OP_N = 0, CUBLAS_OP_T = 1


def gemm_ex(a, b, out, gemm, handle):
    """``out = a @ b``: a [M, K], b [K, N], out [M, N] with contiguous rows, in dtypes
    ``takes`` accepts.  ``gemm``: CuPy's ``cublas.gemmEx``; ``handle``: the cuBLAS handle (on
    CuPy's current stream)."""
    M, K = a.shape
    N = b.shape[1]
    if b.shape[0] != K or tuple(out.shape) != (M, N):
        raise ValueError(f"gemm_ex: shapes must be a [M, K], b [K, N], out [M, N], got "
                         f"{a.shape}, {b.shape}, {out.shape}")
    if not takes(a, b, out):
        raise TypeError(f"gemm_ex: a and b must have one dtype of {tuple(CUDA_TYPES)} and out "
                        f"theirs or float32, got {a.dtype}, {b.dtype}, {out.dtype}")
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
    gemm(handle, tb, ta, N, M, K, _ONE.ctypes.data, b.data.ptr, CUDA_TYPES[b.dtype.name], ldb,
         a.data.ptr, CUDA_TYPES[a.dtype.name], lda, _ZERO.ctypes.data, out.data.ptr,
         CUDA_TYPES[out.dtype.name], ldo, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
