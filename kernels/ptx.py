"""Every CUDA kernel of gpurnn compiled to PTX, on any machine (no GPU or driver needed).

Used by the PTX tests and by ``benchmarks/kernel_resources.py``.  ``numba.cuda.compile_ptx``
itself needs no GPU, but a kernel that calls ``numba.njit`` functions (all of ours: the gate
math of ``cell_math``) makes numba-cuda compile those as device functions for "the current
device", and asking for it fails without a CUDA driver.  ``compile_ptx`` here answers that
question with the target's compute capability for the duration of the compile.  Device
functions are compiled once per argument types and reused, so within one process they keep
the first target's capability; their LLVM IR does not depend on it for our code, and the
kernel itself is compiled for the target asked.
"""
import contextlib
import types

import numpy as np
from numba import cuda


@contextlib.contextmanager
def _target_device(cc):
    from numba.cuda import dispatcher

    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = real


def compile_ptx(fn, sig, cc):
    """PTX text of kernel ``fn`` (a plain Python function) for signature ``sig`` and ``cc``."""
    with _target_device(tuple(cc)):
        ptx, _ = cuda.compile_ptx(fn, sig, cc=tuple(cc))
    return ptx


def all_kernels(dtype):
    """``{kernel name: (python function, signature)}`` of every CUDA kernel for layers of
    ``dtype`` (a name): the step kernels for every dtype; the persistent kernels, the fused
    step kernels, the optimisers' updates and ``add_one`` for float32 and float64 only (the
    16-bit dtypes have none)."""
    from .cuda import add_one, make_cuda_python_kernels
    from .fused import fused_signature, make_fused_python_kernels
    from .persistent import make_persistent_python_kernels, persistent_signature
    from .signatures import FLOAT, Param, numba_signature
    from .storage import HALF_DTYPES, dtype_name
    from .updates import CUDA_UPDATE_FUNCTIONS, UPDATE_KERNELS

    dtype = dtype_name(dtype)
    out = {name: (fn, numba_signature(fn.params, dtype))
           for name, fn in make_cuda_python_kernels(dtype).items()}
    if dtype in HALF_DTYPES:
        return out
    dtype = np.dtype(dtype)
    fwd_sig, back_sig = persistent_signature(dtype), persistent_signature(dtype, backward=True)
    for mode, (fwd, back) in make_persistent_python_kernels(dtype).items():
        out[f"persistent_{mode}_forward"] = (fwd, fwd_sig)
        out[f"persistent_{mode}_backward"] = (back, back_sig)
    fwd_sig, back_sig = fused_signature(dtype), fused_signature(dtype, backward=True)
    for mode, (fwd, back) in make_fused_python_kernels(dtype).items():
        out[f"fused_{mode}_forward"] = (fwd, fwd_sig)
        out[f"fused_{mode}_backward"] = (back, back_sig)
    for name, fn in CUDA_UPDATE_FUNCTIONS.items():
        out[name] = (fn, numba_signature(UPDATE_KERNELS[name], dtype))
    out["add_one"] = (add_one, numba_signature((Param("a", FLOAT, 1),), dtype))
    return out


def write_all(out_dir, dtypes=("float32", "float64", "float16", "bfloat16"),
              ccs=((8, 0), (9, 0))):
    """Write ``{name}-{dtype}-sm_{cc}.ptx`` for every kernel into ``out_dir``; return the paths.

    Needs Numba's real CUDA target: run it in a process without ``NUMBA_ENABLE_CUDASIM=1``
    (``python -m gpurnn.kernels.ptx OUT_DIR [SM ...]``), as the tests and the resource report
    do."""
    import os

    if cuda.config.ENABLE_CUDASIM:
        raise RuntimeError("compiling to PTX needs NUMBA_ENABLE_CUDASIM unset or 0")
    paths = []
    for dtype in dtypes:
        for name, (fn, sig) in all_kernels(dtype).items():
            for cc in ccs:
                path = os.path.join(out_dir, f"{name}-{dtype}-sm_{cc[0]}{cc[1]}.ptx")
                with open(path, "w") as f:
                    f.write(compile_ptx(fn, sig, cc))
                paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    usage = "usage: python -m gpurnn.kernels.ptx OUT_DIR [SM ...]  (SM: 80, 90, ...; default 80 90)"
    if len(sys.argv) < 2 or not all(sm.isdigit() and len(sm) == 2 for sm in sys.argv[2:]):
        sys.exit(usage)
    targets = tuple((int(sm[0]), int(sm[1])) for sm in sys.argv[2:]) or ((8, 0), (9, 0))
    for path in write_all(sys.argv[1], ccs=targets):
        print(path)
