"""How many bytes a call will hold, checked against what the device has free before anything
is allocated, so a request that cannot fit fails with sizes and remedies instead of an
allocator crash (or the kernel's OOM killer) halfway through."""
import os


class OutOfMemory(MemoryError):
    """The workspace of a call does not fit in the device's free memory."""


def call_bytes(layer, T, B, training):
    """Bytes one forward (and, when training, its backward) holds at its peak."""
    H, G, D, L = layer.hidden_size, layer.cell.gates, layer.num_directions, layer.num_layers
    item = layer.dtype.itemsize
    per_direction = T * B * G * H + T * B * H          # xg, y
    if training:
        per_direction += layer.activation_bytes(T, B) // (item * L * D)   # the tape
        per_direction += T * B * G * H * (2 if layer.cell.reset_after else 1)  # dg (and dgh)
    else:
        per_direction += 2 * B * H * (2 if layer.cell.has_cell_state else 1) + B * 4 * H
    total = L * D * per_direction + L * T * B * D * H * (2 if layer.dropout and training else 1)
    return item * total


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


def check_fits(layer, T, B, training):
    """Raise ``OutOfMemory`` naming the sizes and the remedies when the call cannot fit.

    The device is asked (a read of /proc/meminfo, or a CUDA call) only when the call needs
    more than the largest call that already fitted: calls of a size that ran before, as every
    step of a training loop, skip it."""
    need = call_bytes(layer, T, B, training)
    if need <= layer._fitted_bytes:
        return
    held = sum(ws.nbytes() for ws in layer._workspaces.values())  # reused or replaced
    free = free_bytes(layer.backend)
    if free is None or need <= free + held:
        layer._fitted_bytes = need
        return
    gib = 2.0 ** 30
    mode = "a training step" if training else "an inference forward"
    raise OutOfMemory(
        f"{mode} of {layer!r} at T={T}, B={B} needs about {need / gib:.2f} GiB but device "
        f"'{layer.device}' has {(free + held) / gib:.2f} GiB free. Lower the batch size, "
        f"split the sequence (truncated BPTT for training; layer.stream() for inference), or "
        f"run inference (eval() or gpurnn.no_grad()), which keeps no activations.")
