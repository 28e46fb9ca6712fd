"""Backends: the array module, the GEMMs, the step kernels, allocation and synchronisation.

The time-loop drivers (``gpurnn/drivers.py``) are written once against this interface:

* ``cpu``: NumPy arrays, NumPy (OpenBLAS) GEMMs, Numba CPU step kernels.
* ``cuda``: CuPy arrays, cuBLAS GEMMs through CuPy, Numba CUDA step kernels launched on CuPy's
  current stream.  Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Numba is
  imported) the same CUDA kernels run on the CPU with NumPy arrays: that is how the CUDA path is
  tested on machines without a GPU.
"""
import functools
import logging
import os

import numpy as np

_log = logging.getLogger("gpurnn")


class Backend:
    """What the drivers need from a device. Subclasses set ``name`` and ``xp``."""

    name = None
    xp = np
    #: True when arrays of this backend are NumPy arrays (cpu, and the CUDA simulator).
    host_arrays = True

    def kernels(self, dtype):
        """``{name: launch(B, H, *args)}`` step kernels for ``dtype``."""
        raise NotImplementedError

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def matmul(self, a, b, out):
        """``out = a @ b`` with no temporary (``out`` is C-contiguous)."""
        self.xp.matmul(a, b, out=out)

    def asarray(self, a, dtype=None):
        """Copy host data onto this backend (no copy when it already is there)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def synchronize(self):
        pass

    def is_array(self, a):
        return isinstance(a, self.xp.ndarray)

    def __repr__(self):
        return f"<gpurnn backend {self.name}>"


class CPUBackend(Backend):
    name = "cpu"

    def kernels(self, dtype):
        from . import kernels

        return kernels.cpu_kernels(np.dtype(dtype))


class CUDABackend(Backend):
    name = "cuda"

    def __init__(self):
        from numba import cuda

        self.simulator = bool(cuda.config.ENABLE_CUDASIM)
        if self.simulator:
            self.xp = np
            self.host_arrays = True
        else:
            import cupy

            self.xp = cupy
            self.host_arrays = False

    def kernels(self, dtype):
        from . import kernels

        launchers = kernels.cuda_kernels(np.dtype(dtype))
        if self.simulator:
            return launchers
        stream = self._numba_stream()
        return {name: functools.partial(fn, stream=stream) for name, fn in launchers.items()}

    def _numba_stream(self):
        import cupy
        from numba import cuda

        return cuda.external_stream(cupy.cuda.get_current_stream().ptr)

    def to_numpy(self, a):
        if self.simulator:
            return np.asarray(a)
        return self.xp.asnumpy(a)

    def synchronize(self):
        if not self.simulator:
            self.xp.cuda.get_current_stream().synchronize()

    def __repr__(self):
        return "<gpurnn backend cuda (simulator)>" if self.simulator else "<gpurnn backend cuda>"


def _simulator_on():
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def cuda_unavailable_reason():
    """``None`` when a real GPU can run the CUDA backend here, else a short reason why not."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install gpurnn[cuda12] or gpurnn[cuda13])"
    except Exception as exc:  # a broken CuPy install must not break importing gpurnn
        return f"CuPy failed to import: {exc}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no usable CUDA driver or GPU: {exc}"
    if count < 1:
        return "no CUDA GPU found"
    if _simulator_on():
        return "NUMBA_ENABLE_CUDASIM=1: Numba simulates CUDA on the CPU"
    try:
        from numba import cuda

        if not cuda.is_available():
            return "Numba cannot use the GPU (numba-cuda missing or CUDA driver too old)"
    except Exception as exc:
        return f"numba-cuda failed: {exc}"
    return None


_BACKENDS = {}


def get_backend(device):
    """The backend for ``device`` in ``"cpu" | "cuda" | "auto"``."""
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "auto":
        # A real GPU only: the simulator is a test tool, far slower than the CPU backend.
        reason = cuda_unavailable_reason()
        device = "cuda" if reason is None else "cpu"
        _log.info("device='auto' chose %s%s", device, f" ({reason})" if reason else "")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device not in _BACKENDS:
        if device == "cuda":
            reason = None if _simulator_on() else cuda_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device='cuda' is not available: {reason}")
            _BACKENDS[device] = CUDABackend()
        else:
            _BACKENDS[device] = CPUBackend()
    return _BACKENDS[device]
