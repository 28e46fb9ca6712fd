"""CPU step kernels: a compiled loop over every ``(b, j)`` element of one time step.

The math is in ``cell_math``; here is only the loop.  Single-threaded on purpose: the
per-step pointwise work is small, and a Numba thread pool spinning against OpenBLAS's threads
cost 60x on these machines (DESIGN.md).  The cores belong to BLAS.
"""
import numba

from .cell_math import STEP_KERNELS, make_cell_math


def _cpu_step_kernel(elem):
    @numba.njit(cache=True)
    def step_kernel(B, H, *args):
        for b in range(B):
            for j in range(H):
                elem(b, j, H, *args)

    return step_kernel


def make_cpu_kernels(dtype):
    """``{kernel_name: fn(B, H, *args)}`` for one dtype; args as the element functions take."""
    math_ = make_cell_math(dtype)
    return {name: _cpu_step_kernel(math_[elem]) for name, elem in STEP_KERNELS.items()}
