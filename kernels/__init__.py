"""Numba kernels of gpurnn (installed as ``gpurnn.kernels``); they import nothing from the rest
of gpurnn.

``cell_math``: the gate math of each cell, as scalar functions written once; ``signatures``:
the parameters of every step kernel; ``cpu``: the CPU step kernels (vectorised row loops) and
the compiled time loops; ``cuda``: the CUDA step kernels (one thread per element);
``persistent``: CUDA kernels that run a whole sequence in one launch; ``loops``: the time loops
over the step kernels; ``ptx``: every CUDA kernel compiled to PTX.  Each backend's kernels are
built per dtype, on first use.
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
