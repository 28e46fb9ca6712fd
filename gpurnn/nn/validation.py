"""Checks of what a recurrent layer is given, made before any kernel runs: each raises a
``ValueError`` or ``TypeError`` naming what was expected and what came.

Arrays of other libraries are taken through DLPack where their memory is on the layer's device
(``engine.arrays.adopt``): the checks return the arrays the layer then uses.
"""
import numpy as np

from ..engine.arrays import adopt, describe, host_view
from ..kernels.storage import HALF_DTYPES

#: the dtypes of the layers (docs/precision.md): float16 and bfloat16 store activations in 16
#: bits and compute in float32
DTYPES = ("float32", "float64", "float16", "bfloat16")
NONLINEARITIES = ("tanh", "relu")


def parse_dtype(dtype):
    """``dtype`` (a name, a NumPy dtype or ``ml_dtypes.bfloat16``) as a NumPy dtype of
    ``DTYPES``."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        dtype = bfloat16()
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    return np.dtype(dtype) if name == "bfloat16" else np.dtype(name)


def bfloat16():
    """NumPy's bfloat16 dtype, from ml_dtypes (a dependency of gpurnn, imported only here)."""
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError("dtype 'bfloat16' needs the ml_dtypes package, which is not installed: "
                         "pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


def is_float(dtype):
    """Whether ``dtype`` is a floating-point dtype, bfloat16 included (NumPy's kind 'V')."""
    return dtype.kind == "f" or dtype.name in HALF_DTYPES


def check_options(input_size, hidden_size, num_layers, dropout, nonlinearity):
    """The constructor's sizes, dropout and nonlinearity."""
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


def check_array(backend, dtype, a, what):
    """``a`` as an array of ``backend`` (``adopt``: a DLPack array on its device, viewed) with
    ``dtype``; returns it."""
    a = adopt(backend, a, what)
    if not backend.is_array(a):
        raise TypeError(f"{what} must be a {backend.xp.__name__}.ndarray on device "
                        f"'{backend.name}', got {describe(a)}")
    if a.dtype != dtype:
        raise TypeError(f"{what} must have dtype {dtype.name} (the layer's dtype), got {a.dtype}")
    return a


def check_input(backend, dtype, x, input_size, batch_first):
    """``x`` (``check_array``) 3-D with ``input_size`` features; returns it."""
    x = check_array(backend, dtype, x, "x")
    if x.ndim != 3:
        layout = "[B, T, I]" if batch_first else "[T, B, I]"
        raise ValueError(f"x must be 3-D {layout}, got shape {tuple(x.shape)}")
    if x.shape[2] != input_size:
        raise ValueError(f"x must have input size {input_size} in its last axis, "
                         f"got shape {tuple(x.shape)}")
    return x


def check_state(backend, dtype, cell, state, expected, what):
    """A state (or state gradient) ``(h, c)`` of an LSTM, ``h`` of the other cells, each of
    shape ``expected`` [L*D, B, H]: returned as a tuple of arrays (h,) or (h, c), or None."""
    if state is None:
        return None
    if cell.has_cell_state:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{what} of an LSTM must be a tuple (h, c), got {describe(state)}")
        parts = tuple(state)
    else:
        if isinstance(state, (tuple, list)):
            raise TypeError(f"{what} of a {cell.mode.upper()} must be one array h, got a "
                            f"{type(state).__name__}")
        parts = (state,)
    checked = []
    for name, part in zip(("h", "c"), parts):
        part = check_array(backend, dtype, part, f"{what} {name}")
        if tuple(part.shape) != expected:
            raise ValueError(f"{what} {name} must have shape {expected} "
                             f"(num_layers*num_directions, batch, hidden), got {tuple(part.shape)}")
        checked.append(part)
    return tuple(checked)


def check_lengths(backend, lengths, T, B):
    """``lengths`` [B] (host or device, integers or integral floats) in [0, T] as a host int32
    array; None gives T for every sequence."""
    if lengths is None:
        return np.full(B, T, dtype=np.int32)
    return integer_lengths(lengths, B, T, "lengths").astype(np.int32)


def integer_lengths(lengths, N, T, what):
    """``lengths`` [N] (host or device, integers or integral floats) in [0, T] as a host int64
    array, or a ValueError/TypeError that names ``what`` and the first bad sequence."""
    host = np.asarray(host_view(lengths, what))
    if host.ndim != 1 or host.shape[0] != N:
        raise ValueError(f"{what} must have one entry per sequence, shape ({N},), got shape "
                         f"{host.shape}")
    if host.dtype.kind not in "iu":
        if host.dtype.kind == "f" and np.all(np.isfinite(host)) and np.all(host == np.round(host)):
            host = host.astype(np.int64)
        else:
            raise TypeError(f"{what} must be integers, got dtype {host.dtype}")
    if host.size and (host.min() < 0 or host.max() > T):
        bad = int(np.flatnonzero((host < 0) | (host > T))[0])
        raise ValueError(f"{what} must lie in [0, T={T}] (T: the steps of x), got min "
                         f"{host.min()} max {host.max()} (sequence {bad}: {host[bad]})")
    return host.astype(np.int64)
