"""Numba kernels of gpurnn (installed as ``gpurnn.kernels``).

``cell_math``: the gate math of each cell, written once; ``cpu``: compiled CPU loops over it;
``cuda``: CUDA kernels over it.  Each backend's kernels are built per dtype, on first use.
"""
import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def cpu_kernels(dtype):
    from .cpu import make_cpu_kernels

    return make_cpu_kernels(np.dtype(dtype))


@functools.lru_cache(maxsize=None)
def cuda_kernels(dtype, launch="eager"):
    from .cuda import make_cuda_kernels

    return make_cuda_kernels(np.dtype(dtype), launch)
