"""Whether a call fits in what the device has free, checked before anything is allocated, so a
request that cannot fit fails with sizes and remedies instead of an allocator crash (or the
kernel's OOM killer) halfway through."""
import os


class OutOfMemory(MemoryError):
    """The workspace of a call does not fit in the device's free memory."""


def free_bytes(backend):
    """Free memory of ``backend``'s device in bytes, or None when it cannot be told."""
    if backend.name == "cuda" and not backend.host_arrays:
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        return int(free) + int(cupy.get_default_memory_pool().free_bytes())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class FitCheck:
    """Refuses calls on ``backend``'s device that cannot fit.

    The device is asked (a read of /proc/meminfo, or a CUDA call) only when a call needs more
    than the largest call that already fitted: calls of a size that ran before, as every step
    of a training loop, skip it."""

    def __init__(self, backend):
        self.backend = backend
        self.largest_fitted = 0  # bytes

    def require(self, need, held, describe):
        """Raise ``OutOfMemory`` when ``need`` bytes do not fit in the free memory plus the
        ``held()`` bytes the call reuses or replaces.  ``describe()`` gives (what the call is,
        how to make it smaller) for the message.  Both are called only when the device is
        asked, off the path of calls of a size that fitted before."""
        if need <= self.largest_fitted:
            return
        free = free_bytes(self.backend)
        held_bytes = held()
        if free is None or need <= free + held_bytes:
            self.largest_fitted = need
            return
        what, remedy = describe()
        gib = 2.0 ** 30
        raise OutOfMemory(f"{what} needs about {need / gib:.2f} GiB but device "
                          f"'{self.backend.name}' has {(free + held_bytes) / gib:.2f} GiB free. "
                          f"{remedy}")
