"""The optimisers' elementwise updates, written once as scalar functions and run over a
parameter's elements in one pass: by a CPU loop (Numba) or a CUDA kernel (one thread an element,
one launch a parameter), where the same update as array expressions makes a pass, and on a GPU
a launch, per operation (Adam: 13).

A parameter is updated as a ``[rows, cols]`` array (a 1-D one as one row), with its gradient
and its optimiser buffers of the same shape, all C-contiguous and of the parameter's dtype
(float32 or float64); then the step's scalars, in that dtype too:

* ``sgd_update(rows, cols, p, g, lr)``: ``p -= lr * g``
* ``momentum_update(rows, cols, p, g, v, mu, lr)``: ``v = v*mu + g``; ``p -= lr * v``
* ``adam_update(rows, cols, p, g, m, v, b1, c1, b2, c2, step_size, bias2, eps)``:
  ``m = m*b1 + c1*g``; ``v = v*b2 + c2*(g*g)``; ``p -= step_size * (m / (sqrt(v / bias2) +
  eps))``, with ``c1 = 1 - b1``, ``c2 = 1 - b2``, ``step_size = lr / (1 - b1^t)`` and
  ``bias2 = 1 - b2^t`` at step ``t`` (``gpurnn/nn/optim.py``).

Rounding: every operation in the parameter's dtype, in the order written.  The CPU loops are
compiled without fast-math, so they round as the array expressions of the same formulas do, to
the bit (``tests/test_optim.py``); the CUDA kernels let NVVM fuse a multiply and an add, as it
does by default, so they may differ from the CPU in the last bit.
"""
import functools
import math

import numba
import numpy as np
from numba import cuda

from .signatures import FLOAT, INT, REAL, Param

# ---------------------------------------------------------------------- the math, per element


@numba.njit(inline="always")
def sgd(p, g, lr):
    """The new ``p``."""
    return p - lr * g


@numba.njit(inline="always")
def momentum(p, g, v, mu, lr):
    """The new ``(p, v)``."""
    v = v * mu + g
    return p - lr * v, v


@numba.njit(inline="always")
def adam(p, g, m, v, b1, c1, b2, c2, step_size, bias2, eps):
    """The new ``(p, m, v)``."""
    m = m * b1 + c1 * g
    v = v * b2 + c2 * (g * g)
    return p - step_size * (m / (math.sqrt(v / bias2) + eps)), m, v


# ----------------------------------------------------------------------------- the parameters
def _array(name):
    return Param(name, FLOAT, 2)


def _real(name):
    return Param(name, REAL)


_SHAPE = (Param("rows", INT), Param("cols", INT))

#: Parameters of each update kernel, as ``kernels/signatures.py`` declares the step kernels'.
UPDATE_KERNELS = {
    "sgd_update": _SHAPE + (_array("p"), _array("g"), _real("lr")),
    "momentum_update": _SHAPE + (_array("p"), _array("g"), _array("v"), _real("mu"),
                                 _real("lr")),
    "adam_update": _SHAPE + (_array("p"), _array("g"), _array("m"), _array("v"), _real("b1"),
                             _real("c1"), _real("b2"), _real("c2"), _real("step_size"),
                             _real("bias2"), _real("eps")),
}
#: The parameter dtypes the updates are compiled for.
UPDATE_DTYPES = ("float32", "float64")


# --------------------------------------------------------------------------------- CPU loops
def sgd_update_cpu(rows, cols, p, g, lr):
    for r in range(rows):
        for j in range(cols):
            p[r, j] = sgd(p[r, j], g[r, j], lr)


def momentum_update_cpu(rows, cols, p, g, v, mu, lr):
    for r in range(rows):
        for j in range(cols):
            p[r, j], v[r, j] = momentum(p[r, j], g[r, j], v[r, j], mu, lr)


def adam_update_cpu(rows, cols, p, g, m, v, b1, c1, b2, c2, step_size, bias2, eps):
    for r in range(rows):
        for j in range(cols):
            p[r, j], m[r, j], v[r, j] = adam(p[r, j], g[r, j], m[r, j], v[r, j], b1, c1, b2, c2,
                                             step_size, bias2, eps)


#: Numba options of the CPU loops: no fast-math (the array expressions' rounding), no zero
#: check before the division (``error_model="numpy"``: it would keep the loop scalar).
CPU_OPTIONS = {"_nrt": False, "error_model": "numpy"}


@functools.lru_cache(maxsize=None)
def cpu_update_kernels():
    """``{name: jitted loop}``, each compiled on first call for the dtype it is given."""
    return {"sgd_update": numba.njit(cache=True, **CPU_OPTIONS)(sgd_update_cpu),
            "momentum_update": numba.njit(cache=True, **CPU_OPTIONS)(momentum_update_cpu),
            "adam_update": numba.njit(cache=True, **CPU_OPTIONS)(adam_update_cpu)}


# ------------------------------------------------------------------------------ CUDA kernels
def sgd_update_kernel(rows, cols, p, g, lr):
    j, r = cuda.grid(2)
    if j < cols and r < rows:
        p[r, j] = sgd(p[r, j], g[r, j], lr)


def momentum_update_kernel(rows, cols, p, g, v, mu, lr):
    j, r = cuda.grid(2)
    if j < cols and r < rows:
        p[r, j], v[r, j] = momentum(p[r, j], g[r, j], v[r, j], mu, lr)


def adam_update_kernel(rows, cols, p, g, m, v, b1, c1, b2, c2, step_size, bias2, eps):
    j, r = cuda.grid(2)
    if j < cols and r < rows:
        p[r, j], m[r, j], v[r, j] = adam(p[r, j], g[r, j], m[r, j], v[r, j], b1, c1, b2, c2,
                                         step_size, bias2, eps)


#: The CUDA kernels as Python functions (``ptx.all_kernels`` and the launchers compile these).
CUDA_UPDATE_FUNCTIONS = {"sgd_update": sgd_update_kernel,
                         "momentum_update": momentum_update_kernel,
                         "adam_update": adam_update_kernel}


@functools.lru_cache(maxsize=None)
def cuda_update_kernels(dtype, launch):
    """``{name: launch(rows, cols, *args, stream)}`` for parameters of ``dtype`` in launch mode
    ``launch`` (``kernels.cuda.LAUNCH_MODES``; lazy under the simulator), on the step kernels'
    grid: x over ``cols``, y over ``rows``."""
    from .cuda import make_launcher

    dtype = np.dtype(dtype)
    return {name: make_launcher(fn, UPDATE_KERNELS[name], dtype, launch)
            for name, fn in CUDA_UPDATE_FUNCTIONS.items()}
