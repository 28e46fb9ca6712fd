"""CUDA step kernels: one thread per ``(b, j)`` element of one time step.

The math is in ``cell_math``; here is only the thread indexing.  Numba CUDA kernels cannot
take ``*args``, so each kernel is generated with the explicit parameter list of its element
function.  Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) arrays inside a kernel
are Python objects that compiled functions cannot take, so the kernel calls the element
function's pure-Python source instead: the same code, interpreted.

Launch: a 2-D grid, x over hidden units (``THREADS`` per block, coalesced along a row),
y over batch rows.

Three ways to launch (``LAUNCH_MODES``; see docs/gpu.md for what each costs and what is
tested where):

* ``"lazy"``: ``cuda.jit(fn)``; every launch types its arguments and looks the compiled
  kernel up by type (Numba's dispatch).  The only mode under the simulator.
* ``"eager"`` (default on a GPU): compiled once at build time with the fixed signature of
  ``kernel_signature``; the dispatcher is specialised, so a launch skips type dispatch.
  Numba still converts every CuPy argument through ``__cuda_array_interface__``, and because
  CuPy exports its current stream there, Numba synchronises the host with that stream once
  per array argument when ``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=1`` (its default).  That sync is
  redundant here (the kernels run on the very stream CuPy uses), but it is Numba's process-wide
  setting, so it is left to the user; ``"fast"`` avoids it.
* ``"fast"``: the eagerly compiled kernel launched by ``cuda.core.launch`` with arguments
  packed here (``pack_args``) straight from the CuPy arrays: no dispatch, no
  ``__cuda_array_interface__`` conversion, so no stream sync.  Untested on hardware so far.
"""
import ctypes

import numba
import numpy as np
from numba import cuda

from .cell_math import STEP_KERNELS, kernel_params, make_cell_math, param_type

THREADS = 128
LAUNCH_MODES = ("lazy", "eager", "fast")

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


def make_cuda_kernels(dtype, launch="eager"):
    """``{kernel_name: launch(B, H, *args, stream=0)}`` for one dtype.

    ``launch`` is one of ``LAUNCH_MODES``; under the simulator every mode launches lazily
    (there is nothing to compile).  With ``"fast"``, ``stream`` must be a ``cuda.core`` stream
    (``numba.cuda.cudadrv.driver._to_core_stream`` of a Numba stream); otherwise a Numba stream.
    """
    if launch not in LAUNCH_MODES:
        raise ValueError(f"launch must be one of {LAUNCH_MODES}, got {launch!r}")
    if cuda.config.ENABLE_CUDASIM:
        launch = "lazy"
    launchers = {}
    for name, fn in make_cuda_python_kernels(dtype).items():
        if launch == "lazy":
            launchers[name] = _launcher(cuda.jit(fn))
        else:
            sig = kernel_signature(name, dtype)
            kernel = cuda.jit(sig)(fn)  # compiles now, for the current device
            launchers[name] = _launcher(kernel) if launch == "eager" else _FastLauncher(kernel, sig)
    return launchers


def _launch_shape(B, H):
    # Whole warps, no more than needed for a small H (fewer idle threads, and far fewer
    # Python threads under the simulator).
    threads = min(THREADS, (H + 31) // 32 * 32)
    return ((H + threads - 1) // threads, B), (threads, 1)


def _launcher(kernel):
    def launch(B, H, *args, stream=0):
        grid, block = _launch_shape(B, H)
        kernel[grid, block, stream](B, H, *args)

    return launch


def fast_launch_unavailable():
    """``None`` when this numba-cuda has what the ``"fast"`` mode uses (``cuda.core.launch``
    and ``driver._to_core_stream``, numba-cuda 0.2x), else why not."""
    try:
        from cuda.core import LaunchConfig, launch  # noqa: F401
        from numba.cuda.cudadrv.driver import _to_core_stream  # noqa: F401
    except ImportError as exc:
        import numba_cuda

        return f"numba-cuda {numba_cuda.__version__} lacks the cuda.core launch path ({exc})"
    return None


def pack_args(sig, args):
    """The flat kernel parameters Numba's ABI expects for ``args`` typed by ``sig``.

    An array of ``ndim`` dims becomes ``meminfo, parent, nitems, itemsize, data, *shape,
    *strides`` (Numba's array model, as ``numba.cuda.dispatcher._Kernel._prepare_args`` packs
    it); an int64 a ``ctypes.c_int64``.  Arrays are CuPy arrays (``.data.ptr``); each one is
    checked against the signature, since a mismatched array would be read wrongly, not refused.
    """
    if len(args) != len(sig):
        raise TypeError(f"kernel takes {len(sig)} arguments, got {len(args)}")
    out = []
    for i, (ty, a) in enumerate(zip(sig, args)):
        if isinstance(ty, numba.types.Array):
            want = np.dtype(str(ty.dtype))
            if a.dtype != want or a.ndim != ty.ndim or not a.flags.c_contiguous:
                raise TypeError(
                    f"kernel argument {i}: expected a C-contiguous {ty.ndim}-D {want} array, "
                    f"got {a.ndim}-D {a.dtype} (C-contiguous: {a.flags.c_contiguous})")
            out += [0, 0, a.size, a.itemsize, a.data.ptr, *a.shape, *a.strides]
        elif ty == numba.int64:
            out.append(ctypes.c_int64(a))
        else:
            raise TypeError(f"kernel argument {i}: unsupported parameter type {ty}")
    return out


class _FastLauncher:
    """Launch one eagerly compiled kernel through ``cuda.core.launch`` (mode ``"fast"``)."""

    def __init__(self, dispatcher, sig):
        self._kernel = next(iter(dispatcher.overloads.values()))
        self._sig = sig
        self._cufunc = None  # loaded on first launch, on the device current then
        self._configs = {}

    def __call__(self, B, H, *args, stream):
        from cuda.core import LaunchConfig, launch

        if self._cufunc is None:
            self._cufunc = self._kernel._codelibrary.get_cufunc()
        grid, block = _launch_shape(B, H)
        config = self._configs.get(grid)
        if config is None:
            config = self._configs[grid] = LaunchConfig(grid=grid, block=block)
        launch(stream, config, self._cufunc.kernel, *pack_args(self._sig, (B, H) + args))
