"""Persistent forward kernel: one launch runs all ``T`` steps of one direction of one layer.

After Diamos et al. 2016 ("Persistent RNNs"): the recurrent weights ``W_hh`` are read from
device memory once, kept in shared memory for the whole sequence, and each step costs no
launch and no cuBLAS call.  For small batches the per-step work is tiny, so launches and the
re-reading of ``W_hh`` are most of the time of the per-step path.

Work split.  The ``H`` hidden units are cut into ``n_slices`` slices of ``U`` units; a slice
holds the ``G`` rows of ``W_hh`` of each of its units (``G*U`` rows of ``H``).  Block ``k`` of
the grid owns slices ``k, k + gridDim, ...``.  Per step, every block:

1. copies ``h_prev`` [B, H] into shared memory;
2. computes its units' recurrent products ``hg[b, g*H + j] = W_hh[g*H + j, :] . h_prev[b, :]``,
   ``lanes`` threads per dot product (strided partial sums, then summed from shared memory);
3. after a block barrier, runs the cell's element function (``cell_math``, the same code as
   the step kernels) for its units: it reads only its own columns of ``hg``;
4. waits at a grid-wide barrier (``cuda.cg.this_grid().sync()``, so the kernel is launched
   cooperatively and every block must be resident), since the next step needs every unit of
   ``h``.

The states, saved gates and outputs land in exactly the slots the per-step driver uses
(``step_slots`` is ``gpurnn.drivers._slots`` for the device; a test holds them equal), so a
training forward run here is followed by the ordinary per-step backward.

Cells: RNN (tanh/ReLU), LSTM, and GRU with the reset after the product.  The seed-form GRU
needs ``r * h_prev`` of every unit before its second product: one more grid barrier per step,
not done.  Under Numba's CUDA simulator a cooperative grid has one block; the kernel still
takes any ``n_slices``, so the simulator tests the slicing too.
"""
import functools

import numba
import numpy as np
from numba import cuda

from .cell_math import make_cell_math

#: Cells with a persistent forward; GRU only with ``reset_after``.
PERSISTENT_MODES = ("rnn", "lstm", "gru")


def step_slots(T, step, reverse, training):
    """(time t, slot of the state before t, slot after t, slot of the saved gates);
    the device twin of ``gpurnn.drivers._slots``."""
    t = T - 1 - step if reverse else step
    if not training:
        return t, step % 2, (step + 1) % 2, 0
    if reverse:
        return t, t + 1, t, t
    return t, t, t + 1, t


def slice_row(r, block, n_blocks, G, U, H, n_slices):
    """Row of ``W_hh`` held at local row ``r`` of ``block``'s shared memory, or -1 (padding).

    Local rows run over the block's slices, then gates, then units of the slice."""
    per_slice = G * U
    local_slice = r // per_slice
    rem = r - local_slice * per_slice
    gate = rem // U
    j = (block + local_slice * n_blocks) * U + rem - gate * U
    if block + local_slice * n_blocks < n_slices and j < H:
        return gate * H + j
    return -1


def _cell_steps(math_, simulator):
    """``{mode: step(b, j, H, t, p, n, s, y, hs, cs, gates, xg, hg, b_hh, lengths, relu)}``:
    each cell's element function called on the slots of one step (one signature for all)."""
    def elem(name):
        return math_[name].py_func if simulator else math_[name]

    rnn, lstm, gru = elem("rnn_forward_elem"), elem("lstm_forward_elem"), elem("gru_forward_elem")

    # y [T, B, H]; hs, cs [S, B, H]; gates [T or 1, B, 4H]; xg [T, B, G*H]; hg [B, G*H]
    def rnn_step(b, j, H, t, p, n, s, y, hs, cs, gates, xg, hg, b_hh, lengths, relu):
        rnn(b, j, H, y[t], hs[n], xg[t], hg, b_hh, hs[p], lengths, t, relu)

    def lstm_step(b, j, H, t, p, n, s, y, hs, cs, gates, xg, hg, b_hh, lengths, relu):
        lstm(b, j, H, y[t], hs[n], cs[n], gates[s], xg[t], hg, b_hh, hs[p], cs[p], lengths, t)

    def gru_step(b, j, H, t, p, n, s, y, hs, cs, gates, xg, hg, b_hh, lengths, relu):
        gru(b, j, H, y[t], hs[n], gates[s], xg[t], hg, b_hh, hs[p], lengths, t)

    steps = {"rnn": rnn_step, "lstm": lstm_step, "gru": gru_step}
    if simulator:
        return steps
    return {mode: numba.njit(inline="always")(fn) for mode, fn in steps.items()}


def make_persistent_python_kernels(dtype):
    """``{mode: python kernel function}``, not yet jitted (``compile_ptx`` takes these)."""
    dtype = np.dtype(dtype)
    simulator = bool(cuda.config.ENABLE_CUDASIM)
    zero = dtype.type(0)
    shared_type = numba.from_dtype(dtype)
    row_of = slice_row if simulator else numba.njit(inline="always")(slice_row)
    slots_of = step_slots if simulator else numba.njit(inline="always")(step_slots)
    return {mode: _persistent_kernel(step, zero, shared_type, row_of, slots_of)
            for mode, step in _cell_steps(make_cell_math(dtype), simulator).items()}


def _persistent_kernel(cell_step, zero, shared_type, row_of, slots_of):
    def persistent_forward(T, B, H, n_slices, U, lanes, y, hs, cs, gates, xg, hg, w_hh, b_hh,
                           lengths, reverse, training, relu):
        # y [T, B, H]; hs, cs [T+1 or 2, B, H] (cs: any such array unless LSTM);
        # gates [T or 1, B, 4H] (any 3-D array for RNN); xg [T, B, G*H]; hg [B, G*H] scratch;
        # w_hh [G*H, H]; b_hh [G*H]; lengths [B]
        G = w_hh.shape[0] // H
        tid = cuda.threadIdx.x
        n_threads = cuda.blockDim.x
        block = cuda.blockIdx.x
        n_blocks = cuda.gridDim.x
        rows = (n_slices + n_blocks - 1) // n_blocks * G * U  # W_hh rows held by this block
        # Dynamic shared memory: [rows, H] W_hh rows | [B, H] h_prev | [n_threads] partials.
        smem = cuda.shared.array(0, dtype=shared_type)
        h_at = rows * H
        part_at = h_at + B * H
        for idx in range(tid, rows * H, n_threads):
            r = idx // H
            w_row = row_of(r, block, n_blocks, G, U, H, n_slices)
            smem[idx] = w_hh[w_row, idx - r * H] if w_row >= 0 else zero
        cuda.syncthreads()

        group = tid // lanes  # the dot product this thread helps with, per pass
        lane = tid - group * lanes
        n_groups = n_threads // lanes
        n_dots = rows * B
        grid = cuda.cg.this_grid()
        for step in range(T):
            t, p, n, s = slots_of(T, step, reverse, training)
            for idx in range(tid, B * H, n_threads):
                b = idx // H
                smem[h_at + idx] = hs[p, b, idx - b * H]
            cuda.syncthreads()
            # Every thread runs the same number of passes: the barriers inside are uniform.
            for first in range(0, n_dots, n_groups):
                dot = first + group
                r = dot // B
                b = dot - r * B
                acc = zero
                if dot < n_dots:
                    for i in range(lane, H, lanes):
                        acc += smem[r * H + i] * smem[h_at + b * H + i]
                smem[part_at + tid] = acc
                cuda.syncthreads()
                if lane == 0 and dot < n_dots:
                    w_row = row_of(r, block, n_blocks, G, U, H, n_slices)
                    if w_row >= 0:
                        total = zero
                        for k in range(lanes):
                            total += smem[part_at + tid + k]
                        hg[b, w_row] = total
                cuda.syncthreads()
            # The gate math of this block's units: reads only hg columns this block wrote.
            per_slice = U * B
            for idx in range(tid, rows // G * B, n_threads):
                local_slice = idx // per_slice
                rem = idx - local_slice * per_slice
                u = rem // B
                b = rem - u * B
                sl = block + local_slice * n_blocks
                j = sl * U + u
                if sl < n_slices and j < H:
                    cell_step(b, j, H, t, p, n, s, y, hs, cs, gates, xg, hg, b_hh, lengths, relu)
            grid.sync()

    return persistent_forward


def persistent_signature(dtype):
    """Fixed signature of the persistent kernels, for eager compilation and PTX."""
    scalar = numba.from_dtype(np.dtype(dtype))
    i64 = numba.int64
    a3, a2, a1 = scalar[:, :, ::1], scalar[:, ::1], scalar[::1]
    return (i64,) * 6 + (a3, a3, a3, a3, a3, a2, a2, a1, numba.int32[::1], i64, i64, i64)


def shared_bytes(G, U, n_slices, n_blocks, B, H, threads, itemsize):
    """Dynamic shared memory of one block: its ``W_hh`` rows, ``h_prev`` and the partials."""
    rows = -(-n_slices // n_blocks) * G * U
    return (rows * H + B * H + threads) * itemsize


@functools.lru_cache(maxsize=None)
def plan(G, B, H, itemsize, max_blocks, smem_limit, lanes=32, max_groups=8):
    """Launch shape ``(n_blocks, n_slices, U, lanes, threads, shared_bytes)`` of the persistent
    kernel, or ``None`` when ``W_hh`` does not fit in ``max_blocks`` blocks of ``smem_limit``
    bytes of shared memory each.  One slice per block, as many blocks as useful (up to one per
    unit), ``lanes`` threads per dot product and up to ``max_groups`` dot products at a time."""
    n_blocks = max(1, min(max_blocks, H))
    U = -(-H // n_blocks)
    n_slices = -(-H // U)
    n_blocks = min(n_blocks, n_slices)
    threads = lanes * max(1, min(max_groups, G * U * B))
    nbytes = shared_bytes(G, U, n_slices, n_blocks, B, H, threads, itemsize)
    if nbytes > smem_limit:
        return None
    return n_blocks, n_slices, U, lanes, threads, nbytes


@functools.lru_cache(maxsize=None)
def persistent_kernels(dtype):
    """``{mode: kernel}`` compiled for ``dtype`` (eagerly on a GPU, lazily in the simulator)."""
    dtype = np.dtype(dtype)
    fns = make_persistent_python_kernels(dtype)
    if cuda.config.ENABLE_CUDASIM:
        return {mode: cuda.jit(fn) for mode, fn in fns.items()}
    sig = persistent_signature(dtype)
    return {mode: cuda.jit(sig)(fn) for mode, fn in fns.items()}


def launch_persistent(kernel, shape, T, B, H, y, hs, cs, gates, xg, hg, w_hh, b_hh, lengths,
                      reverse, training, relu, stream=0):
    """Run all ``T`` steps in one cooperative launch of ``kernel`` with ``shape`` from ``plan``
    (array shapes as ``persistent_forward``'s; ``cs`` and ``gates`` None where the cell has
    none)."""
    n_blocks, n_slices, U, lanes, threads, nbytes = shape
    # An empty view stands in for a missing array: the kernel never touches it, and no alias
    # of a real argument is passed (the simulator copies each argument back after the launch).
    cs = y[:0] if cs is None else cs
    gates = y[:0] if gates is None else gates
    kernel[n_blocks, threads, stream, nbytes](
        T, B, H, n_slices, U, lanes, y, hs, cs, gates, xg, hg, w_hh, b_hh, lengths,
        int(reverse), int(training), int(relu))
