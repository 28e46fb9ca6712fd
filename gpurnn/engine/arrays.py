"""Helpers for arrays that may be NumPy (CPU, the CUDA simulator) or CuPy (a GPU)."""
import numpy as np


def array_module(a):
    """The module of array ``a``: ``cupy`` for a CuPy array, else ``numpy``."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(a):
    """A NumPy copy of ``a`` (a NumPy or CuPy array, or a scalar)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.array(a)
