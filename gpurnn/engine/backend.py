"""Backends: the array module, the GEMMs, the step kernels, allocation and synchronisation.

The time-loop drivers (``drivers.py``) are written once against this interface:

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

from ..kernels.storage import HALF_DTYPES
from . import dispatch

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
        """``out = a @ b`` (``out`` has contiguous rows), with no temporary; where an operand or
        ``out`` is 16-bit, ``matmul_half``.  (The check is by item size, the cheapest there is:
        on a GPU every step's products pay it, and the drivers' only 2-byte arrays are the
        16-bit floats.)"""
        if a.itemsize == 2 or b.itemsize == 2 or out.itemsize == 2:
            self.matmul_half(a, b, out)
        else:
            self.xp.matmul(a, b, out=out)

    def matmul_half(self, a, b, out):
        """``out = a @ b`` with 16-bit operands or ``out`` (and the others float32): products
        accumulated in float32, the result rounded once if ``out`` is 16-bit.  Here the operands
        are converted to float32 first (exactly: every 16-bit float is a float32)."""
        f32 = np.dtype(np.float32)
        a, b = a.astype(f32, copy=False), b.astype(f32, copy=False)
        if out.dtype == f32:
            self.xp.matmul(a, b, out=out)
        else:
            out[...] = self.xp.matmul(a, b)

    def asarray(self, a, dtype=None):
        """Copy host data onto this backend (no copy when it already is there)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def synchronize(self):
        pass

    def is_array(self, a):
        return isinstance(a, self.xp.ndarray)

    def forward_sequence(self, cell, w, xg, y, hs, cs, gates, hg, lengths, reverse, training):
        """Run a whole direction's forward loop in one go, if this backend can for this cell
        and shape; return whether it did (else the driver runs its per-step loop).  Arguments
        as the driver's loop uses them, ``hs[first]`` (and ``cs``) already holding ``h0``."""
        return False

    def backward_sequence(self, cell, w, tape, dg, dgh, dh_carry, dc, dy, dh_rec):
        """Run a whole direction's backward loop in one go, if this backend can; return whether
        it did.  Arguments as the driver's loop uses them (``dgh`` is ``dg`` unless the
        reset-after GRU, ``dc`` None unless LSTM; ``dh_rec`` zero): on return ``dg``/``dgh``
        hold every step's gradients and ``dh_carry``, ``dc``, ``dh_rec`` what the loop leaves."""
        return False

    def run_graph(self, key, enqueue):
        """Run ``enqueue()``, a function that only puts work on the current stream.  A backend
        with graphs on captures it once per ``key`` and replays the capture afterwards, so
        every buffer ``enqueue`` touches must keep its address for a given ``key``."""
        enqueue()

    def __repr__(self):
        return f"<gpurnn backend {self.name}>"


class CPUBackend(Backend):
    name = "cpu"

    def __init__(self):
        self._loops = {}

    def kernels(self, dtype):
        from .. import kernels

        return kernels.cpu_kernels(dtype)

    def compiled_loops(self, dtype):
        """The drivers' time loops compiled with Numba around NumPy's BLAS (``kernels/cpu.py``),
        or None where that BLAS cannot be called from Numba or has no GEMM of ``dtype`` (the
        16-bit dtypes): the drivers then loop in Python."""
        dtype = np.dtype(dtype)
        if dtype.name in HALF_DTYPES:
            return None
        if dtype not in self._loops:
            from ..kernels import cpu

            self._loops[dtype] = cpu.make_cpu_loops(dtype, self.kernels(dtype))
        return self._loops[dtype]


class CUDABackend(Backend):
    """CuPy arrays, cuBLAS GEMMs through CuPy, Numba CUDA kernels on CuPy's current stream.

    Options (see docs/gpu.md: what each does, what is tested where).  Each defaults to its
    environment variable, so ``device="cuda"`` picks them up; they may also be set on the
    backend object (``gpurnn.get_backend("cuda").persistent = True``):

    * ``launch`` (``GPURNN_CUDA_LAUNCH``): how the step kernels are launched, one of
      ``kernels.cuda.LAUNCH_MODES``; by default ``"fast"`` where this numba-cuda has it
      (``dispatch.default_launch``).
    * ``persistent`` (``GPURNN_PERSISTENT`` = ``auto``, ``0`` or ``1``; ``"auto"``, False or
      True here): ``forward_sequence``/``backward_sequence`` run a whole direction as one
      persistent kernel where ``W_hh`` fits on chip: always (True), never (False), or where
      ``dispatch.persistent_by_default`` says it pays (``"auto"``, the default).
    * ``graphs`` (``GPURNN_CUDA_GRAPHS=1``, default off): ``run_graph`` captures a sequence's
      launches once per key as a CUDA graph and replays it.
    * ``tf32`` (``GPURNN_TF32`` = ``1``, the default, or ``0``): float32 GEMMs on TF32 tensor
      cores: inputs rounded to a 10-bit mantissa (unit roundoff 2^-11, about 4.9e-4, against
      float32's 2^-24, about 6e-8), products accumulated in float32.  On by default as in
      PyTorch, whose cuDNN RNNs run TF32 unless ``torch.backends.cudnn.allow_tf32`` is
      switched off; ``0`` (or ``tf32=False``) gives strict float32.  float64 and the 16-bit
      dtypes are untouched, and so is the CPU.
    """

    name = "cuda"

    def __init__(self, launch=None, persistent=None, graphs=None, tf32=None):
        from numba import cuda

        from ..kernels.cuda import LAUNCH_MODES

        simulator = bool(cuda.config.ENABLE_CUDASIM)
        if launch is None:
            launch = os.environ.get("GPURNN_CUDA_LAUNCH") or dispatch.default_launch(simulator)
        self.launch = launch
        if self.launch not in LAUNCH_MODES:
            raise ValueError(f"launch (GPURNN_CUDA_LAUNCH) must be one of {LAUNCH_MODES}, "
                             f"got {self.launch!r}")
        if self.launch == "fast" and not cuda.config.ENABLE_CUDASIM:
            from ..kernels.cuda import fast_launch_unavailable

            reason = fast_launch_unavailable()
            if reason is not None:
                raise RuntimeError(f"launch='fast' is not available: {reason}")
        if persistent is None:
            persistent = _env_choice("GPURNN_PERSISTENT", {"auto": "auto", "0": False, "1": True})
        if persistent not in ("auto", False, True):
            raise ValueError(f"persistent must be 'auto', False or True, got {persistent!r}")
        self.persistent = persistent
        self.graphs = _env_flag("GPURNN_CUDA_GRAPHS") if graphs is None else bool(graphs)
        self.tf32 = _env_choice("GPURNN_TF32", {"1": True, "0": False}) if tf32 is None \
            else bool(tf32)
        self._graph_cache = {}
        self.simulator = simulator
        if self.simulator:
            self.xp = np
            self.host_arrays = True
        else:
            import cupy

            self.xp = cupy
            self.host_arrays = False

    def kernels(self, dtype):
        from .. import kernels

        launchers = kernels.cuda_kernels(dtype, self.launch)
        if self.simulator:
            return launchers
        stream = self._numba_stream()
        if self.launch == "fast":
            from numba.cuda.cudadrv.driver import _to_core_stream

            stream = _to_core_stream(stream)
        return {name: functools.partial(fn, stream=stream) for name, fn in launchers.items()}

    def _numba_stream(self):
        import cupy
        from numba import cuda

        return cuda.external_stream(cupy.cuda.get_current_stream().ptr)

    def matmul_half(self, a, b, out):
        """One ``cublasGemmEx`` on the GPU (``cublas.py``: float32 accumulation on tensor
        cores) where it takes the dtypes; the base class's float32 products under the simulator
        and for a float32 operand beside a 16-bit one (a token model's embedding gradient)."""
        from .cublas import gemm_ex, takes

        if self.simulator or not takes(a, b, out):
            super().matmul_half(a, b, out)
            return
        from cupy_backends.cuda.libs import cublas as cupy_cublas

        gemm_ex(a, b, out, cupy_cublas.gemmEx, self.xp.cuda.device.get_cublas_handle())

    def matmul(self, a, b, out):
        if not (self.tf32 and a.dtype == b.dtype == out.dtype == np.float32
                and not self.simulator):
            super().matmul(a, b, out)
            return
        # CuPy's compute type is process-wide state: set it for this product only.
        from cupy._core import _routines_linalg as linalg

        previous = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
        try:
            self.xp.matmul(a, b, out=out)
        finally:
            linalg.set_compute_type(np.float32, previous)

    def forward_sequence(self, cell, w, xg, y, hs, cs, gates, hg, lengths, reverse, training):
        from ..kernels import persistent

        T, B, H = y.shape
        launch = self._persistent_launch(cell, B, H, y.dtype, backward=False)
        if launch is None:
            return False
        kernel, shape, stream = launch
        persistent.launch_persistent(kernel, shape, T, B, H, y, hs, cs, gates, xg, hg, w.w_hh,
                                     w.b_ih, w.b_hh, lengths, reverse, training, cell.relu,
                                     stream)
        return True

    def backward_sequence(self, cell, w, tape, dg, dgh, dh_carry, dc, dy, dh_rec):
        from ..kernels import persistent

        T, B, H = dy.shape
        launch = self._persistent_launch(cell, B, H, dy.dtype, backward=True)
        if launch is None:
            return False
        kernel, shape, stream = launch
        persistent.launch_persistent_backward(
            kernel, shape, T, B, H, dg, dgh, dh_carry, dc, dy, dh_rec, tape.hs, tape.cs,
            tape.gates, w.w_hh, tape.lengths, tape.reverse, cell.relu, stream)
        return True

    def _persistent_launch(self, cell, B, H, dtype, backward):
        """(kernel, launch shape, stream) of the persistent path, or None when it is off, the
        cell or dtype has none, or the shape does not fit."""
        wanted = dispatch.persistent_by_default(B) if self.persistent == "auto" else self.persistent
        if not wanted or not self._persistent_cell(cell) or np.dtype(dtype).name in HALF_DTYPES:
            return None  # the persistent kernels are written for float32 and float64
        from ..kernels import persistent

        kernel = persistent.persistent_kernels(dtype)[cell.mode][int(backward)]
        shape = self._persistent_shape(kernel, cell.gates, B, H, dtype, backward)
        if shape is None:
            return None
        return kernel, shape, 0 if self.simulator else self._numba_stream()

    @staticmethod
    def _persistent_cell(cell):
        from ..kernels import persistent

        return cell.mode in persistent.PERSISTENT_MODES and (cell.mode != "gru"
                                                             or cell.reset_after)

    def _persistent_shape(self, kernel, G, B, H, dtype, backward):
        from ..kernels import persistent

        itemsize = np.dtype(dtype).itemsize
        if self.simulator:
            # One block (the simulator's cooperative grids have one) of few Python threads.
            return persistent.plan(G, B, H, itemsize, 1, _DEFAULT_SHARED_BYTES, lanes=4,
                                   max_groups=2, backward=backward)
        from numba import cuda

        sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
        shape = persistent.plan(G, B, H, itemsize, sms, _DEFAULT_SHARED_BYTES,
                                backward=backward)
        if shape is None:
            return None
        n_blocks, _, _, _, threads, nbytes = shape
        overload = next(iter(kernel.overloads.values()))
        if n_blocks > overload.max_cooperative_grid_blocks(threads, nbytes):
            return None
        return shape

    def run_graph(self, key, enqueue):
        if not self.graphs or self.simulator:
            enqueue()
            return
        graph = self._graph_cache.get(key)
        if graph is None:
            try:
                graph = self._capture(enqueue)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back, loudly
                _log.warning("CUDA graph capture failed (%s: %s); running without graphs for "
                             "%r", type(exc).__name__, exc, key)
                graph = _CAPTURE_FAILED
            self._graph_cache[key] = graph
        if graph is _CAPTURE_FAILED:
            enqueue()
        else:
            graph.launch(self.xp.cuda.get_current_stream())

    def _capture(self, enqueue):
        """A CUDA graph of everything ``enqueue()`` puts on the current stream (not run yet)."""
        cupy = self.xp
        origin = cupy.cuda.get_current_stream()
        capture = cupy.cuda.Stream(non_blocking=True)  # the legacy stream cannot capture
        capture.wait_event(origin.record())
        with capture:  # the current stream while capturing: the kernels and GEMMs go there
            capture.begin_capture()
            try:
                enqueue()
            finally:
                graph = capture.end_capture()
        return graph

    def to_numpy(self, a):
        if self.simulator:
            return np.asarray(a)
        return self.xp.asnumpy(a)

    def synchronize(self):
        if not self.simulator:
            self.xp.cuda.get_current_stream().synchronize()

    def __repr__(self):
        return "<gpurnn backend cuda (simulator)>" if self.simulator else "<gpurnn backend cuda>"


#: Shared memory a block gets without raising its dynamic limit (cudaFuncSetAttribute).
_DEFAULT_SHARED_BYTES = 48 * 1024
_CAPTURE_FAILED = object()


def _env_flag(name):
    return _env_choice(name, {"0": False, "1": True})


def _env_choice(name, choices):
    """``choices[value]`` of environment variable ``name``; the first choice when it is unset."""
    value = os.environ.get(name, next(iter(choices)))
    if value not in choices:
        raise ValueError(f"{name} must be {' or '.join(choices)}, got {value!r}")
    return choices[value]


def _simulator_on():
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason():
    """``None`` when a real GPU can run the CUDA backend here, else a short reason why not.

    Beyond CuPy, a GPU and a driver, Numba must compile and run a kernel: a test kernel is
    compiled and launched the first time this is asked in a process, and the answer cached.
    """
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
    try:
        from ..kernels.cuda import kernels_run_here

        kernels_run_here()
    except Exception as exc:
        return (f"numba-cuda cannot compile or run a kernel here ({type(exc).__name__}: {exc}); "
                f"check that numba-cuda, NumPy and the CUDA driver are versions that work "
                f"together")
    return None


_BACKENDS = {}
#: the values of ``device=``: a backend, or "auto" (CUDA when a real GPU is usable, else CPU)
DEVICES = ("cpu", "cuda", "auto")


def get_backend(device):
    """The backend for ``device`` in ``DEVICES``."""
    if not isinstance(device, str):
        raise TypeError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    if device == "auto":
        # A real GPU only: the simulator is a test tool, far slower than the CPU backend.
        reason = cuda_unavailable_reason()
        device = "cuda" if reason is None else "cpu"
        _log.info("device='auto' chose %s%s", device, f" ({reason})" if reason else "")
    if device not in _BACKENDS:
        if device == "cuda":
            reason = None if _simulator_on() else cuda_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"device='cuda' is not available: {reason}")
            _BACKENDS[device] = CUDABackend()
        else:
            _BACKENDS[device] = CPUBackend()
    return _BACKENDS[device]
