"""Numba kernels of gpurnn (installed as ``gpurnn.kernels``); they import nothing from the rest
of gpurnn.

``cell_math``: the gate math of each cell, as scalar functions written once; ``signatures``:
the parameters of every step kernel; ``cpu``: the CPU step kernels (vectorised row loops) and
the compiled time loops; ``cuda``: the CUDA step kernels (one thread per element);
``persistent``: CUDA kernels that run a whole sequence in one launch; ``fused``: CUDA kernels
that run one step and make its recurrent product; ``loops``: the time loops over the step
kernels; ``updates``: the optimisers' elementwise updates, a CPU loop and a CUDA kernel each;
``ptx``: every CUDA kernel compiled to PTX.  Each backend's kernels are built per
dtype, on first use.
"""
import functools

from .storage import HALF_DTYPES, bits, dtype_name


def cpu_kernels(dtype):
    """``{name: step kernel}`` for layers of ``dtype`` (a name or a NumPy dtype)."""
    return _cpu_kernels(dtype_name(dtype))


def cuda_kernels(dtype, launch="eager"):
    """``{name: launch(B, H, *args, stream=...)}`` for layers of ``dtype``."""
    return _cuda_kernels(dtype_name(dtype), launch)


@functools.lru_cache(maxsize=None)
def _cpu_kernels(name):
    from .cpu import make_cpu_kernels

    return _taking_half_arrays(name, make_cpu_kernels(name))


@functools.lru_cache(maxsize=None)
def _cuda_kernels(name, launch):
    from .cuda import make_cuda_kernels

    return _taking_half_arrays(name, make_cuda_kernels(name, launch))


def _taking_half_arrays(name, kernels):
    """``kernels``, each taking float16/bfloat16 arrays as they are (passed on as their bits,
    ``storage.bits``), when ``name`` is a 16-bit dtype."""
    if name not in HALF_DTYPES:
        return kernels

    def taking(kernel):
        def launch(*args, **kwargs):
            return kernel(*[bits(a) for a in args], **kwargs)

        return launch

    return {kernel_name: taking(kernel) for kernel_name, kernel in kernels.items()}
