"""CUDA step kernels: one thread per ``(b, j)`` element of one time step.

The math is in ``cell_math``; here is only the thread indexing.  Numba CUDA kernels cannot
take ``*args``, so each kernel is generated with the explicit parameter list of its element
function.  Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) arrays inside a kernel
are Python objects that compiled functions cannot take, so the kernel calls the element
function's pure-Python source instead: the same code, interpreted.

Launch: a 2-D grid, x over hidden units (``THREADS`` per block, coalesced along a row),
y over batch rows.
"""
import numba
from numba import cuda

from .cell_math import STEP_KERNELS, kernel_params, make_cell_math, param_type

THREADS = 128

_TEMPLATE = """
def {name}(B, H, {params}):
    j, b = cuda.grid(2)
    if j < H and b < B:
        elem(b, j, H, {params})
"""


def _cuda_step_kernel(name, elem):
    params = ", ".join(kernel_params(elem))
    device_elem = elem.py_func if cuda.config.ENABLE_CUDASIM else elem
    namespace = {"cuda": cuda, "elem": device_elem}
    exec(_TEMPLATE.format(name=name, params=params), namespace)
    return namespace[name]


def kernel_signature(name, dtype):
    """Fixed signature of a step kernel, for eager compilation and PTX."""
    elem = make_cell_math(dtype)[STEP_KERNELS[name]]
    return (numba.int64, numba.int64) + tuple(param_type(p, dtype) for p in kernel_params(elem))


def make_cuda_python_kernels(dtype):
    """``{kernel_name: python function}``, not yet jitted (``compile_ptx`` takes these)."""
    math_ = make_cell_math(dtype)
    return {name: _cuda_step_kernel(name, math_[elem]) for name, elem in STEP_KERNELS.items()}


def make_cuda_kernels(dtype):
    """``{kernel_name: launch(B, H, *args, stream=None)}`` for one dtype."""
    launchers = {}
    for name, fn in make_cuda_python_kernels(dtype).items():
        launchers[name] = _launcher(cuda.jit(fn))
    return launchers


def _launcher(kernel):
    def launch(B, H, *args, stream=0):
        # Whole warps, no more than needed for a small H (fewer idle threads, and far fewer
        # Python threads under the simulator).
        threads = min(THREADS, (H + 31) // 32 * 32)
        grid = ((H + threads - 1) // threads, B)
        kernel[grid, (threads, 1), stream](B, H, *args)

    return launch
