"""Backends: the array module, the GEMMs, the step kernels, allocation and synchronisation.

The time-loop drivers (``drivers.py``) are written once against this interface:

* ``cpu``: NumPy arrays, NumPy (OpenBLAS) GEMMs, Numba CPU step kernels.
* ``cuda``: CuPy arrays, one cuBLAS call per GEMM (``cublas.py``), Numba CUDA step kernels
  launched on CuPy's current stream, each direction's time loop replayed as a CUDA graph.
  Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported) the
  same CUDA kernels run on the CPU with NumPy arrays: that is how the CUDA path is tested on
  machines without a GPU.
"""
import collections
import functools
import logging
import os
import threading

import numpy as np

from ..kernels.storage import HALF_DTYPES, dtype_name
from . import dispatch
from .arrays import aligned_empty

_log = logging.getLogger("gpurnn")

#: Shapes of one scratch buffer name kept per thread (``Backend.scratch``): a training shape and
#: an evaluation shape in turn, or the two lengths of truncated BPTT's chunks, find theirs.
SCRATCH_SHAPES = 2


class Backend:
    """What the drivers need from a device. Subclasses set ``name`` and ``xp``."""

    name = None
    xp = np
    #: True when arrays of this backend are NumPy arrays (cpu, and the CUDA simulator).
    host_arrays = True

    def kernels(self, dtype):
        """``{name: launch(B, H, *args)}`` step kernels for ``dtype``."""
        raise NotImplementedError

    def update_kernels(self, dtype):
        """``{name: run(rows, cols, *args)}``: the optimisers' elementwise updates of
        ``kernels/updates.py`` for parameters of ``dtype`` (float32 or float64)."""
        from ..kernels.updates import cpu_update_kernels

        return cpu_update_kernels()

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def buffer(self, shape, dtype):
        """An uninitialised array kept across calls, which the time loops read at every step:
        a workspace, a scratch buffer, a recurrent layer's parameter.  Allocated once, so it
        may cost more than ``empty`` to place where the kernels read it fastest."""
        return self.empty(shape, dtype)

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

    def sum_rows(self, a, out):
        """``out[...] = a.sum(axis=0)`` for a 2-D ``a`` (its rows may be a strided view), summed
        in ``out``'s dtype: the bias gradients."""
        a.sum(axis=0, dtype=out.dtype, out=out)

    def scratch(self, name, shape, dtype):
        """A buffer for work that lives within one forward or one backward of one layer's
        direction (the input projection, then the pre-activation gradients: ``drivers.py``),
        shared by every layer and direction this thread runs on this backend, so a stack holds
        one, not one per layer and direction.  The same ``(name, shape, dtype)`` gives the same
        buffer again (its address too, which replayed CUDA graphs rely on); the
        ``SCRATCH_SHAPES`` shapes of a name used last are kept."""
        buffers = self._scratch_buffers()
        key = self._scratch_key(name, shape, dtype)
        buf = buffers.pop(key, None)  # put back below as the most recently used
        if buf is None:
            kept = [k for k in buffers if k[0] == key[0]]
            for old in kept[: max(0, len(kept) - SCRATCH_SHAPES + 1)]:
                del buffers[old]
            buf = self.buffer(tuple(map(int, key[1])), key[2])
        buffers[key] = buf
        return buf

    def scratch_nbytes(self, name, shape, dtype):
        """Bytes of this thread's ``scratch(name, shape, dtype)`` buffer where it exists, else 0:
        what a call of that shape reuses."""
        buf = self._scratch_buffers().get(self._scratch_key(name, shape, dtype))
        return 0 if buf is None else int(buf.nbytes)

    def _scratch_key(self, name, shape, dtype):
        return self._scratch_name(name), tuple(shape), np.dtype(dtype)

    def _scratch_name(self, name):
        return name

    def _scratch_buffers(self):
        """This thread's scratch buffers, ``(name, shape, dtype) -> array``, least recently
        used first."""
        local = self.__dict__.get("_scratch_local")
        if local is None:
            local = self.__dict__.setdefault("_scratch_local", threading.local())
        if not hasattr(local, "buffers"):
            local.buffers = {}
        return local.buffers

    def asarray(self, a, dtype=None):
        """Copy host data onto this backend (no copy when it already is there)."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def synchronize(self):
        pass

    def is_array(self, a):
        return isinstance(a, self.xp.ndarray)

    def copies_transposed_weights(self, rows):
        """Whether a forward of ``rows`` = T*B rows hands its time loop ``W_hh^T`` as a
        C-contiguous copy (made on every forward) rather than as the transposed view of
        ``W_hh``."""
        return True

    def transpose_into(self, src, dst):
        """``dst[...] = src.T``, ``dst`` C-contiguous."""
        dst[...] = src.T

    def forward_sequence(self, cell, w, w_hh_t, xg, y, hs, cs, gates, hg, lengths, reverse,
                         training):
        """Run a whole direction's forward loop its own way, if this backend can for this cell
        and shape; return whether it did (else the driver runs its per-step loop).  Arguments
        as the driver's loop uses them (``w_hh_t`` [H, G*H] = W_hh^T), ``hs[first]`` (and
        ``cs``) already holding ``h0``."""
        return False

    def backward_sequence(self, cell, w, tape, hs, dg, dgh, dh_carry, dc, dy, dh_rec):
        """Run a whole direction's backward loop in one go, if this backend can; return whether
        it did.  Arguments as the driver's loop uses them (``hs`` the tape's states, or the
        LSTM's buffer for rebuilding them, its first slot holding ``h0``; ``dgh`` is ``dg``
        unless the reset-after GRU, ``dc`` None unless LSTM; ``dh_rec`` zero): on return
        ``dg``/``dgh`` hold every step's gradients and ``dh_carry``, ``dc``, ``dh_rec`` (and
        the LSTM's ``hs``) what the loop leaves."""
        return False

    def graphs_active(self):
        """Whether ``run_graph`` may replay captured work: the drivers then run their time loops
        over buffers that keep their addresses from call to call (``drivers.py``)."""
        return False

    def run_graph(self, name, enqueue, args):
        """Run ``enqueue()``, a function that only puts work on the current stream and whose
        work is decided by ``name`` and ``args`` (its arrays' addresses, shapes, strides and
        dtypes, and its other values).  A backend with graphs on captures it once per such
        key and replays the capture afterwards."""
        enqueue()

    def __repr__(self):
        return f"<gpurnn backend {self.name}>"


class CPUBackend(Backend):
    name = "cpu"

    def __init__(self):
        self._loops = {}

    def buffer(self, shape, dtype):
        """On a cache line (``arrays.aligned_empty``).  Zen 4 (family 25, model 17), float32,
        one thread, us per call, every array 64-byte aligned / 16 bytes past: LSTM forward step
        at B=32, H=256 24.4 / 26.4, backward 11.9 / 13.1; ``[1, 128] @ W^T`` (``W^T`` [128,
        512]: the product of a step at batch 1) 2.40 / 2.64 with ``W^T`` 16 bytes past, 3.28
        with every operand (32 bytes past ran as aligned ones)."""
        return aligned_empty(shape, dtype)

    def copies_transposed_weights(self, rows):
        """From ``TRANSPOSED_COPY_MIN_ROWS`` rows on.  OpenBLAS multiplies by a C-contiguous
        ``W_hh^T`` faster than by the transposed view over enough steps (it packs the operand
        on every call, a transposed one slower), but the copy, made on every forward, costs
        more than a short call gains (a streamed step, T = 1, most of all).  The
        measurements: ``TRANSPOSED_COPY_MIN_ROWS``."""
        return rows >= TRANSPOSED_COPY_MIN_ROWS

    def transpose_into(self, src, dst):
        """By ``kernels.cpu.transpose_into``'s tiles from ``TILED_TRANSPOSE_MIN_BYTES`` on, where
        NumPy's strided copy falls out of the caches; below, NumPy's copy (as fast, with fewer
        instructions).  float32, Intel Xeon (family 6, model 167), NumPy / tiles: 64 KiB 12.1 /
        9.3 us, 144 KiB 13.1 / 20.5, 256 KiB 72.1 / 38.0, 576 KiB 164.9 / 84.5, 1 MiB 335.6 /
        188.9."""
        if src.nbytes >= TILED_TRANSPOSE_MIN_BYTES and src.itemsize in (4, 8):  # Numba: no 16-bit
            from ..kernels.cpu import transpose_into

            transpose_into(src, dst)
        else:
            super().transpose_into(src, dst)

    def sum_rows(self, a, out):
        """As one GEMV, ``ones @ a``, where BLAS takes the dtype (float32, float64): NumPy sums
        along the rows one row at a time, at half of OpenBLAS's GEMV speed on a contiguous
        array and a sixth of it on the column blocks of a wider one.  Zen 4 (family 25, model
        17), one thread, ms per sum, ``a.sum(axis=0)`` / GEMV: [12800, 384] 0.70 / 0.50, its
        last 128 columns 0.89 / 0.15; [3200, 768] 0.20 / 0.12, its last 256 columns 0.16 /
        0.06; [6400, 1536] 1.83 / 1.28, 0.82 / 0.31.  Deterministic at a given BLAS thread
        count, as the GEMMs are."""
        if a.dtype == out.dtype and a.dtype.itemsize in (4, 8):
            np.matmul(np.ones(a.shape[0], a.dtype), a, out=out)
        else:
            super().sum_rows(a, out)

    def kernels(self, dtype):
        from .. import kernels

        return kernels.cpu_kernels(dtype)

    def compiled_loops(self, dtype):
        """The drivers' time loops compiled with Numba around NumPy's BLAS (``kernels/cpu.py``),
        or None where that BLAS cannot be called from Numba or has no GEMM of ``dtype`` (the
        16-bit dtypes): the drivers then loop in Python."""
        if dtype_name(dtype) in HALF_DTYPES:
            return None
        dtype = np.dtype(dtype)
        if dtype not in self._loops:
            from ..kernels import cpu

            self._loops[dtype] = cpu.make_cpu_loops(dtype, self.kernels(dtype))
        return self._loops[dtype]


class CUDABackend(Backend):
    """CuPy arrays, cuBLAS GEMMs, Numba CUDA kernels on CuPy's current stream.

    Options (see docs/gpu.md: what each does, what is tested where).  Each defaults to its
    environment variable, so ``device="cuda"`` picks them up; they may also be set on the
    backend object (``gpurnn.get_backend("cuda").persistent = True``):

    * ``launch`` (``GPURNN_CUDA_LAUNCH``): how the step kernels are launched, one of
      ``kernels.cuda.LAUNCH_MODES``; by default ``"fast"`` where this numba-cuda has it
      (``dispatch.default_launch``).
    * ``persistent`` (``GPURNN_PERSISTENT`` = ``auto``, ``0`` or ``1``; ``"auto"``, False or
      True here): ``forward_sequence``/``backward_sequence`` run a whole direction as one
      persistent kernel where ``W_hh`` fits on chip: always (True), never (False), or where
      ``dispatch.persistent_by_default`` says it pays (``"auto"``, the default: at small batch
      where graphs are off).
    * ``persistent_blocks`` (``GPURNN_PERSISTENT_BLOCKS``; None, the default, or a positive
      int): the most blocks a persistent kernel spreads a direction over; None takes
      ``dispatch.persistent_blocks``.
    * ``fused`` (``GPURNN_FUSED_STEPS`` = ``0``, the default, or ``1``; False or True here):
      where the persistent path does not run, ``forward_sequence``/``backward_sequence`` run a
      direction as one fused step kernel per step, which makes the step's recurrent product
      itself (``kernels/fused.py``): half the launches (or graph nodes) of the per-step loop.
      Off by default: not yet timed on a GPU (``dispatch.py``).
    * ``graphs`` (``GPURNN_CUDA_GRAPHS`` = ``auto``, ``0`` or ``1``; ``"auto"``, False or True
      here): ``run_graph`` captures a direction's time loop (its GEMMs and step kernels) as a
      CUDA graph, once per key, and replays it: always (True), never (False), or where
      ``dispatch.graphs_by_default`` says (``"auto"``, the default).  Capture needs the ``fast``
      launch mode and nvmath-python's cuBLAS binding (``cublas.Blas``); True without them
      raises.
    * ``tf32`` (``GPURNN_TF32`` = ``1``, the default, or ``0``): float32 GEMMs on TF32 tensor
      cores: inputs rounded to a 10-bit mantissa (unit roundoff 2^-11, about 4.9e-4, against
      float32's 2^-24, about 6e-8), products accumulated in float32.  On by default as in
      PyTorch, whose cuDNN RNNs run TF32 unless ``torch.backends.cudnn.allow_tf32`` is
      switched off; ``0`` (or ``tf32=False``) gives strict float32.  float64 and the 16-bit
      dtypes are untouched, and so is the CPU.
    """

    name = "cuda"

    def __init__(self, launch=None, persistent=None, graphs=None, tf32=None,
                 persistent_blocks=None, fused=None):
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
        if persistent_blocks is None:
            blocks = os.environ.get("GPURNN_PERSISTENT_BLOCKS")
            if blocks is not None and not (blocks.isdigit() and int(blocks) > 0):
                raise ValueError(
                    f"GPURNN_PERSISTENT_BLOCKS must be a positive integer, got {blocks!r}")
            persistent_blocks = None if blocks is None else int(blocks)
        elif not (isinstance(persistent_blocks, int) and persistent_blocks > 0):
            raise ValueError(f"persistent_blocks must be a positive int or None, got "
                             f"{persistent_blocks!r}")
        self.persistent_blocks = persistent_blocks
        if fused is None:
            fused = _env_choice("GPURNN_FUSED_STEPS", {"0": False, "1": True})
        if fused not in (False, True):
            raise ValueError(f"fused must be False or True, got {fused!r}")
        self.fused = fused
        if graphs is None:
            graphs = _env_choice("GPURNN_CUDA_GRAPHS", {"auto": "auto", "0": False, "1": True})
        if graphs not in ("auto", False, True):
            raise ValueError(f"graphs must be 'auto', False or True, got {graphs!r}")
        self.graphs = graphs
        self.tf32 = _env_choice("GPURNN_TF32", {"1": True, "0": False}) if tf32 is None \
            else bool(tf32)
        self._graph_cache = collections.OrderedDict()  # key -> graph, _SEEN or _CAPTURE_FAILED
        self._blas_ = None
        self._capture_stream = None
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

        return self._on_current_stream(kernels.cuda_kernels(dtype, self.launch))

    def update_kernels(self, dtype):
        """The updates as CUDA kernels (launched as the step kernels, on CuPy's current
        stream)."""
        from ..kernels.updates import cuda_update_kernels

        return self._on_current_stream(cuda_update_kernels(np.dtype(dtype).name, self.launch))

    def _on_current_stream(self, launchers):
        """``launchers`` (``{name: launch(..., stream)}``) bound to CuPy's current stream as it
        is now; as they are under the simulator."""
        if self.simulator:
            return launchers
        stream = self._launch_stream()
        return {name: functools.partial(fn, stream=stream) for name, fn in launchers.items()}

    def _scratch_name(self, name):
        """Per CuPy stream too: two streams of one thread never share a buffer."""
        return name if self.simulator else (name, self.xp.cuda.get_current_stream().ptr)

    def _launch_stream(self):
        """CuPy's current stream, as this launch mode's launchers take it (0 under the
        simulator)."""
        if self.simulator:
            return 0
        stream = self._numba_stream()
        if self.launch == "fast":
            from numba.cuda.cudadrv.driver import _to_core_stream

            stream = _to_core_stream(stream)
        return stream

    def _numba_stream(self):
        import cupy
        from numba import cuda

        return cuda.external_stream(cupy.cuda.get_current_stream().ptr)

    @property
    def _blas(self):
        if self._blas_ is None:
            from .cublas import Blas

            self._blas_ = Blas.create(self.xp)
        return self._blas_

    def matmul(self, a, b, out):
        """One ``cublasGemmEx`` on the GPU (``cublas.py``) where it takes the dtypes: float32
        in TF32 where ``tf32`` is on, 16-bit operands accumulated in float32; the base class's
        products under the simulator and for a float32 operand beside a 16-bit one (a token
        model's embedding gradient)."""
        from .cublas import takes

        if self.simulator or not takes(a, b, out):
            super().matmul(a, b, out)
        else:
            self._blas.gemm(a, b, out, self.tf32)

    def forward_sequence(self, cell, w, w_hh_t, xg, y, hs, cs, gates, hg, lengths, reverse,
                         training):
        """The persistent kernel where ``_persistent_launch`` allows it, else the fused step
        kernels where ``fused`` is on (a replayed graph where graphs are), else False."""
        from ..kernels import persistent

        T, B, H = y.shape
        launch = self._persistent_launch(cell, B, H, y.dtype, backward=False)
        if launch is not None:
            kernel, shape, stream, arrivals = launch
            persistent.launch_persistent(kernel, shape, T, B, H, y, hs, cs, gates, xg, hg,
                                         w.w_hh, w.b_ih, w.b_hh, lengths, arrivals, reverse,
                                         training, cell.relu, stream)
            return True
        fused = self._fused_kernel(cell, y.dtype, backward=False)
        if fused is None:
            return False
        # An empty view stands in for an array the cell has not (as for the persistent kernels)
        args = (y, hs, y[:0] if cs is None else cs, y[:0] if gates is None else gates, xg, hg,
                w_hh_t, w.b_ih, w.b_hh, lengths, int(reverse), int(training), int(cell.relu))
        self._run_fused_steps(f"fused_{cell.mode}_forward", fused, T, B, H, args)
        return True

    def backward_sequence(self, cell, w, tape, hs, dg, dgh, dh_carry, dc, dy, dh_rec):
        """The persistent kernel, else the fused step kernels, else False (as
        ``forward_sequence``); after the fused ones, one GEMM leaves ``dh_rec`` the first
        step's product, as the per-step loop does."""
        from ..kernels import persistent
        from ..kernels.loops import time_slots

        T, B, H = dy.shape
        launch = self._persistent_launch(cell, B, H, dy.dtype, backward=True)
        if launch is not None:
            kernel, shape, stream, arrivals = launch
            persistent.launch_persistent_backward(
                kernel, shape, T, B, H, dg, dgh, dh_carry, dc, dy, dh_rec, hs, tape.cs,
                tape.gates, w.w_hh, tape.lengths, arrivals, tape.reverse, cell.relu, stream)
            return True
        fused = self._fused_kernel(cell, dy.dtype, backward=True)
        if fused is None:
            return False
        args = (dg, dg[:0] if dgh is dg else dgh, dh_carry, dh_carry[:0] if dc is None else dc,
                dy, dh_rec, hs, hs[:0] if tape.cs is None else tape.cs,
                dg[:0] if tape.gates is None else tape.gates, w.w_hh, tape.lengths,
                int(tape.reverse), int(cell.relu))
        done_last = dgh[time_slots(T, 0, tape.reverse, True)[0]]  # [B, G*H] the step done last
        self._run_fused_steps(f"fused_{cell.mode}_backward", fused, T, B, H, args,
                              then=lambda: self.matmul(done_last, w.w_hh, dh_rec))
        return True

    def _run_fused_steps(self, name, kernel, T, B, H, args, then=None):
        """Launch ``kernel`` for every loop step on CuPy's current stream, then ``then()``,
        through ``run_graph`` (a replayed graph where graphs are on)."""
        def enqueue():
            stream = self._launch_stream()
            for step in range(T):
                kernel(B, H, T, step, *args, stream=stream)
            if then is not None:
                then()

        self.run_graph(name, enqueue, (T,) + args)

    def _fused_kernel(self, cell, dtype, backward):
        """The fused step kernel's launcher, or None when ``fused`` is off or the cell or dtype
        has none."""
        from ..kernels import fused

        if (not self.fused or not _sequence_cell(cell, fused.FUSED_MODES)
                or dtype_name(dtype) in HALF_DTYPES):
            return None  # written for float32 and float64, as the persistent kernels
        return fused.fused_kernels(dtype, self.launch)[cell.mode][int(backward)]

    def _persistent_launch(self, cell, B, H, dtype, backward):
        """(kernel, launch shape, stream, barrier counter) of the persistent path, or None when
        it is off, the cell or dtype has none, or the shape does not fit.  The counter, an int32
        array of one element, is the launch's own: the kernel zeroes it."""
        wanted = self.persistent
        if wanted == "auto":
            wanted = dispatch.persistent_by_default(B, self.graphs_active())
        if not wanted or not self._persistent_cell(cell) or dtype_name(dtype) in HALF_DTYPES:
            return None  # the persistent kernels are written for float32 and float64
        from ..kernels import persistent

        kernel = persistent.persistent_kernels(dtype)[cell.mode][int(backward)]
        shape = self._persistent_shape(kernel, cell.gates, B, H, dtype, backward)
        if shape is None:
            return None
        stream = 0 if self.simulator else self._numba_stream()
        return kernel, shape, stream, self.xp.empty(1, np.int32)

    @staticmethod
    def _persistent_cell(cell):
        from ..kernels import persistent

        return _sequence_cell(cell, persistent.PERSISTENT_MODES)

    def _persistent_shape(self, kernel, G, B, H, dtype, backward):
        from ..kernels import persistent

        itemsize = np.dtype(dtype).itemsize
        if self.simulator:
            # One block (the simulator's cooperative grids have one) of few Python threads.
            return persistent.plan(G, B, H, itemsize, 1, _DEFAULT_SHARED_BYTES, lanes=4,
                                   max_groups=2, backward=backward)
        from numba import cuda

        blocks = self.persistent_blocks or dispatch.persistent_blocks(
            cuda.get_current_device().MULTIPROCESSOR_COUNT)
        shape = persistent.plan(G, B, H, itemsize, blocks, _DEFAULT_SHARED_BYTES,
                                backward=backward)
        if shape is None:
            return None
        n_blocks, _, _, _, threads, nbytes = shape
        overload = next(iter(kernel.overloads.values()))
        if n_blocks > overload.max_cooperative_grid_blocks(threads, nbytes):
            return None
        return shape

    def graphs_unavailable_reason(self):
        """None when this backend can capture its time loops as CUDA graphs, else why not (what
        ``graphs=True`` raises, and what ``graphs="auto"`` quietly falls back on)."""
        if self.simulator:
            return "Numba's CUDA simulator captures nothing"
        if self.launch != "fast":
            return (f"launch={self.launch!r}: Numba's dispatcher synchronises with the stream, "
                    f"which a capture forbids; launch='fast' does not")
        if not self._blas.capturable:
            return ("nvmath-python is not installed or cannot run here: CuPy refuses cuBLAS "
                    "calls while a stream captures (pip install nvmath-python)")
        return None

    def graphs_active(self):
        if self.graphs == "auto":
            return dispatch.graphs_by_default(self.simulator, self.launch,
                                              self.simulator or self._blas.capturable)
        if self.graphs and not self.simulator:
            reason = self.graphs_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"graphs=True (GPURNN_CUDA_GRAPHS=1) cannot run: {reason}")
        return bool(self.graphs)

    def run_graph(self, name, enqueue, args):
        """The first call of a key runs ``enqueue()`` as it is (it loads kernels and sizes
        buffers, which a capture cannot do, and a key seen once may not come back); the second
        captures it and launches the graph; later ones launch the graph.  A failed capture is
        logged and the key runs uncaptured from then on: never wrong, at worst slower."""
        if self.simulator or not self.graphs_active():
            enqueue()
            return
        key = (name, self.launch, self.tf32) + tuple(_graph_key(a) for a in args)
        cache = self._graph_cache
        graph = cache.get(key)
        if graph is None:
            cache[key] = _SEEN
            while len(cache) > _MAX_GRAPHS:
                cache.popitem(last=False)
            enqueue()
            return
        cache.move_to_end(key)
        if graph is _SEEN:
            try:
                graph = self._capture(enqueue)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back, loudly
                _log.warning("CUDA graph capture failed (%s: %s); running %s without graphs for "
                             "this shape", type(exc).__name__, exc, name)
                graph = _CAPTURE_FAILED
            cache[key] = graph
        if graph is _CAPTURE_FAILED:
            enqueue()
        else:
            graph.launch(self.xp.cuda.get_current_stream())

    def graph_count(self):
        """How many time loops this backend holds as captured CUDA graphs."""
        return sum(1 for g in self._graph_cache.values() if g not in (_SEEN, _CAPTURE_FAILED))

    def clear_graphs(self):
        """Forget every captured graph (the next calls run as they are, then capture again)."""
        self._graph_cache.clear()

    def _capture(self, enqueue):
        """A CUDA graph of everything ``enqueue()`` puts on the current stream (not run yet)."""
        cupy = self.xp
        origin = cupy.cuda.get_current_stream()
        if self._capture_stream is None:
            # One stream for every capture: cuBLAS's workspace on it (cublas.Blas), whose
            # address the graphs keep, is allocated once.  The legacy stream cannot capture.
            self._capture_stream = cupy.cuda.Stream(non_blocking=True)
        capture = self._capture_stream
        capture.wait_event(origin.record())
        with capture:  # the current stream while capturing: the kernels and GEMMs go there
            self._blas.bind(capture.ptr)  # before capturing: cuBLAS's stream and workspace
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


#: T*B from which the CPU's time loops get a C-contiguous copy of W_hh^T
#: (``CPUBackend.copies_transposed_weights``).  Measured on an Intel Xeon (family 6, model 167,
#: AVX-512), one OpenBLAS thread, an LSTM inference forward, view time / copy time (the copy by
#: ``kernels.cpu.transpose_into``); below 1 the view is faster:
#:
#:    H   B     T=1   T=4   T=16  T=64
#:    64  1    0.60  0.72  0.89  0.89
#:    64  4    0.71  0.79  0.90  1.14
#:    64  32   0.81  1.05  1.20  1.32
#:   256  1    0.30  0.53  0.65  0.77
#:   256  4    0.63  0.97  1.47  1.81
#:   256  32   0.76  0.97  1.08  1.18
#:   512  1    0.46  0.86  1.25  1.49
#:   512  4    0.56  0.89  1.24  1.37
#:   512  32   0.64  0.93  0.98  1.01
#:
#: Copying from 64 rows on loses at most 30 % against the better choice in this grid (H=256,
#: B=1, T=64); copying always lost up to 3.3x (H=256, B=1, T=1: a streamed step).
TRANSPOSED_COPY_MIN_ROWS = 64
#: Bytes of W_hh from which the CPU transposes it by tiles (``CPUBackend.transpose_into``)
TILED_TRANSPOSE_MIN_BYTES = 256 * 1024
#: Shared memory a block gets without raising its dynamic limit (cudaFuncSetAttribute).
_DEFAULT_SHARED_BYTES = 48 * 1024
_CAPTURE_FAILED = object()
_SEEN = object()
#: Graphs kept per backend, the least recently used dropped first (a graph holds no buffers,
#: only the addresses it was captured with).
_MAX_GRAPHS = 256


def _graph_key(arg):
    """What of one argument decides the work a captured loop does: an array's address, shape,
    strides and dtype; any other value itself."""
    data = getattr(arg, "data", None)
    ptr = getattr(data, "ptr", None)
    if ptr is not None:
        return (ptr, arg.shape, arg.strides, arg.dtype.str)
    return arg


def _sequence_cell(cell, modes):
    """Whether the kernels of ``modes`` (a mode's steps in one kernel each) take ``cell``: the
    GRU only with the reset after the product (the reset-before GRU's second product needs
    ``r * h_prev`` of every unit first)."""
    return cell.mode in modes and (cell.mode != "gru" or cell.reset_after)


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
