"""Arrays of any library: NumPy (CPU, the CUDA simulator), CuPy (a GPU), and any other array
that speaks DLPack (a torch tensor, a JAX array), taken without a copy where its memory already
is on the backend's device."""
import math

import numpy as np

#: DLPack device types (``__dlpack_device__()[0]``) whose memory the host can read, and those
#: of CUDA device memory.
DLPACK_HOST = (1,)  # kDLCPU
DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


#: Byte boundary of the start of the CPU backend's kept arrays (``aligned_empty``,
#: ``CPUBackend.buffer``).
HOST_ALIGNMENT = 64


def aligned_empty(shape, dtype, alignment=HOST_ALIGNMENT):
    """An uninitialised C-contiguous NumPy array whose first element sits on an ``alignment``-
    byte boundary (a cache line).  NumPy's own allocations are aligned to 16 bytes only
    (glibc's malloc); in an array that starts 16 or 48 bytes into a line, every 64-byte
    (AVX-512) load straddles two lines and so does every other 32-byte one, in the step
    kernels' rows and in OpenBLAS's unpacked operands.  The array is a view of a byte buffer
    it keeps alive (``.base``); the allocation costs about 2 us against ``numpy.empty``'s 0.2."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    raw = np.empty(math.prod(shape) * dtype.itemsize + alignment, np.uint8)
    return np.ndarray(shape, dtype, raw, -raw.ctypes.data % alignment)


def array_module(a):
    """The module of array ``a``: ``cupy`` for a CuPy array, else ``numpy``."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(a):
    """A NumPy copy of ``a`` (a NumPy or CuPy array, or a scalar)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.array(a)


def describe(a):
    """``module.Type(shape=..., dtype=...)`` of ``a``, for error messages."""
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    return f"{type(a).__module__}.{type(a).__name__}(shape={shape}, dtype={dtype})"


def dlpack_device_type(a):
    """The DLPack device type of ``a`` (1 host, 2 CUDA, ...), or None when ``a`` does not
    speak DLPack."""
    probe = getattr(a, "__dlpack_device__", None)
    if probe is None or not hasattr(a, "__dlpack__"):
        return None
    try:
        return int(probe()[0])
    except Exception as exc:  # an object that claims the protocol but breaks it
        raise TypeError(f"{describe(a)} has a __dlpack_device__ that failed: {exc!r}") from exc


def _view(xp, a, what):
    try:
        return xp.from_dlpack(a)
    except Exception as exc:  # torch refuses tensors that require grad; unsupported dtypes
        raise TypeError(f"{what}: {describe(a)} cannot be taken through DLPack: {exc}") from exc


def adopt(backend, a, what, from_host=False):
    """``a`` as an array of ``backend``, without a copy wherever its memory already lives on the
    backend's device.

    An array of the backend is returned as it is; any other DLPack-capable array (a torch
    tensor, a JAX array, a NumPy array for a GPU backend, a CuPy array for a host backend) on
    the backend's device becomes a view of its memory (``numpy.from_dlpack`` /
    ``cupy.from_dlpack``).  Host memory given to a GPU backend is copied to the device when
    ``from_host`` (the data of ``Model.fit``/``predict``); otherwise, and for device memory
    given to a host backend, a TypeError names what came and what to do.  Anything that is
    not an array (a list, None) is returned unchanged, for the caller's own checks.
    """
    if backend.is_array(a):
        return a
    device = dlpack_device_type(a)
    if device is None:
        return a
    expected = f"{what} must be a {backend.xp.__name__}.ndarray on device '{backend.name}'"
    if backend.host_arrays:
        if device not in DLPACK_HOST:
            raise TypeError(f"{expected}, got {describe(a)} in device memory (DLPack device "
                            f"type {device}): move it to the host first (tensor.cpu(), "
                            f"cupy.asnumpy(...)), or use device='cuda'")
        return _view(np, a, what)
    if device in DLPACK_CUDA:
        return _view(backend.xp, a, what)
    if device in DLPACK_HOST and from_host:
        return backend.asarray(a if isinstance(a, np.ndarray) else _view(np, a, what))
    raise TypeError(f"{expected}, got {describe(a)} in host memory (DLPack device type "
                    f"{device}): copy it to the GPU first (cupy.asarray(...), tensor.cuda())")


def host_view(a, what):
    """``a`` as a NumPy array on the host: itself, a view of a DLPack host array (a torch CPU
    tensor), a copy of a CuPy array or of a DLPack CUDA array (through CuPy); anything else
    (a list) unchanged.  For data checked or kept on the host: lengths, targets."""
    if isinstance(a, np.ndarray):
        return a
    if array_module(a) is not np:
        return to_numpy(a)
    device = dlpack_device_type(a)
    if device is None:
        return a
    if device in DLPACK_HOST:
        return _view(np, a, what)
    try:
        import cupy
    except ImportError:
        raise TypeError(f"{what} must be in host memory (a NumPy array or a list), got "
                        f"{describe(a)} in device memory (DLPack device type {device}), and "
                        f"CuPy, which could copy it, is not installed") from None
    return to_numpy(_view(cupy, a, what))
