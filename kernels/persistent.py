"""Persistent kernels: one launch runs all ``T`` steps of one direction of one layer, forward
(below) or backward (BPTT: the same structure on ``W_hh``'s columns, see ``_backward_kernel``).

After Diamos et al. 2016 ("Persistent RNNs"): the recurrent weights ``W_hh`` are read from
device memory once, kept in shared memory for the whole sequence, and each step costs no
launch and no cuBLAS call.  For small batches the per-step work is tiny, so launches and the
re-reading of ``W_hh`` are most of the time of the per-step path.

Work split.  The ``H`` hidden units are cut into ``n_slices`` slices of ``U`` units; a slice
holds the ``G`` rows of ``W_hh`` of each of its units (``G*U`` rows of ``H``).  Block ``k`` of
the grid owns slices ``k, k + gridDim, ...``.  Per step, every block:

1. copies ``h_prev`` [B, H] into shared memory;
2. computes its units' recurrent products ``hg[b, g*H + j] = W_hh[g*H + j, :] . h_prev[b, :]``,
   ``lanes`` threads per dot product (strided partial sums, then a tree sum in shared memory);
3. after a block barrier, runs the cell's element function (``kernels/cuda.py``, the body of
   the step kernels) for its units: it reads only its own columns of ``hg``;
4. waits at a grid-wide barrier (``grid_barrier``), since the next step needs every unit of
   ``h``.

The barrier.  ``cuda.cg.this_grid().sync()`` goes through the device runtime library (a call
into ``cudadevrt`` per barrier); with it at every step, a training step at the small-batch
shapes took 7-15 % longer on an H200 than with the counter here (BENCHMARKS.md, "GPU").  The
step barrier here is Baidu's (Diamos et al.): one thread per block counts its block in at one
global counter and spins until every block of the grid has arrived, with a memory fence on
each side.  It is only safe when every block is resident at once, which a cooperative launch
guarantees: the kernels still call ``grid.sync()`` once, at their start, which makes Numba
launch them cooperatively and orders the counter's zeroing before any arrival.

The states, saved gates and outputs land in exactly the slots the time loops use (the kernels
compute them with the loops' own ``time_slots``), so either kernel combines with the per-step
path for the other direction of time.

Cells: RNN (tanh/ReLU), LSTM, and GRU with the reset after the product.  The reset-before GRU
needs ``r * h_prev`` of every unit before its second product: one more grid barrier per step,
which these kernels do not have.  Under Numba's CUDA simulator a cooperative grid has one
block; the kernel still takes any ``n_slices``, so the simulator tests the slicing too.
"""
import functools

import numba
import numpy as np
from numba import cuda

from .cuda import element_functions
from .loops import time_slots
from .signatures import COUNTER, FLOAT, INT, LENGTHS, Param, numba_signature

#: Cells with persistent kernels; GRU only with ``reset_after``.
PERSISTENT_MODES = ("rnn", "lstm", "gru")


def slice_row(r, block, n_blocks, G, U, H, n_slices):
    """Row of ``W_hh`` held at local row ``r`` of ``block``'s shared memory (forward), or -1.

    Local rows run over the block's slices, then gates, then units of the slice."""
    per_slice = G * U
    local_slice = r // per_slice
    rem = r - local_slice * per_slice
    gate = rem // U
    j = (block + local_slice * n_blocks) * U + rem - gate * U
    if block + local_slice * n_blocks < n_slices and j < H:
        return gate * H + j
    return -1


def slice_unit(r, block, n_blocks, U, H, n_slices):
    """Unit (column of ``W_hh``) held at local row ``r`` of ``block`` (backward), or -1.

    Local rows run over the block's slices, then units of the slice."""
    local_slice = r // U
    j = (block + local_slice * n_blocks) * U + r - local_slice * U
    if block + local_slice * n_blocks < n_slices and j < H:
        return j
    return -1


def _device(fn):
    return cuda.jit(device=True, inline="always")(fn)


def grid_barrier(arrivals, target):
    """Wait until every block of the grid has passed ``target / gridDim.x`` barriers, this one
    included: ``arrivals[0]`` (zero at the first barrier) counts the blocks' arrivals.  Every
    thread of every block must call it, with the same ``target``."""
    cuda.syncthreads()  # every thread of the block has issued this step's writes
    if cuda.threadIdx.x == 0:
        cuda.threadfence()  # release: the block's writes are visible GPU-wide before it counts
        cuda.atomic.add(arrivals, 0, 1)
        # An atomic read goes to L2: never a stale copy of the counter in this SM's L1.
        while cuda.atomic.add(arrivals, 0, 0) < target:
            pass
        cuda.threadfence()  # acquire: the other blocks' writes are seen from here on
    cuda.syncthreads()


def cell_steps(dtype):
    """Each cell's element functions called on the slots of one step, one signature per
    direction of time, for the kernels that compute the step's slots themselves (these and the
    fused step kernels, ``kernels/fused.py``): ``{mode: (forward_step, backward_step,
    recurrent_grad)}``.

    ``recurrent_grad(dg, dgh)`` is the gradient whose product with ``W_hh`` flows back to
    ``h_prev``: ``dgh`` for the reset-after GRU (its n block is ``r * dgx_n``), else ``dg``."""
    e = element_functions(dtype)
    rnn, rnn_back = e["rnn_forward_step"], e["rnn_backward_step"]
    lstm, lstm_back = e["lstm_forward_step"], e["lstm_backward_step"]
    gru, gru_back = e["gru_reset_after_forward_step"], e["gru_reset_after_backward_step"]

    # y [T, B, H]; hs, cs [S, B, H]; gates [T or 1, B, S*H]; xg [T, B, G*H]; hg [B, G*H]
    @_device
    def rnn_step(b, j, H, t, before, after, saved, y, hs, cs, gates, xg, hg, b_ih, b_hh,
                 lengths, relu, training):
        rnn(b, j, H, y[t], hs[after], xg[t], hg, b_ih, b_hh, hs[before], lengths, t, relu)

    @_device
    def lstm_step(b, j, H, t, before, after, saved, y, hs, cs, gates, xg, hg, b_ih, b_hh,
                  lengths, relu, training):
        lstm(b, j, H, y[t], hs[after], cs[after], cs[after], gates[saved], xg[t], hg, b_ih,
             b_hh, hs[before], cs[before], lengths, t, training)

    @_device
    def gru_step(b, j, H, t, before, after, saved, y, hs, cs, gates, xg, hg, b_ih, b_hh,
                 lengths, relu, training):
        gru(b, j, H, y[t], hs[after], gates[saved], xg[t], hg, b_ih, b_hh, hs[before], lengths,
            t, training)

    # dg, dgh [T, B, G*H]; dh_carry, dc, dh_rec [B, H]; dy [T, B, H]; hs, cs [T+1, B, H]
    # (the LSTM writes hs: it rebuilds the states there, from h0 in slot ``first``); gates
    # [T, B, S*H]
    @_device
    def rnn_backward(b, j, H, t, before, after, first, dg, dgh, dh_carry, dc, dy, dh_rec,
                     hs, cs, gates, lengths, relu):
        rnn_back(b, j, H, dg[t], dh_carry, dy[t], dh_rec, hs[after], lengths, t, relu)

    @_device
    def lstm_backward(b, j, H, t, before, after, first, dg, dgh, dh_carry, dc, dy, dh_rec,
                      hs, cs, gates, lengths, relu):
        lstm_back(b, j, H, dg[t], dh_carry, dc, dy[t], dh_rec, gates[t], cs[after], cs[before],
                  hs[after], hs[first], lengths, t)

    @_device
    def gru_backward(b, j, H, t, before, after, first, dg, dgh, dh_carry, dc, dy, dh_rec,
                     hs, cs, gates, lengths, relu):
        gru_back(b, j, H, dg[t], dgh[t], dh_carry, dy[t], dh_rec, gates[t], hs[before],
                 lengths, t)

    @_device
    def input_path(dg, dgh):
        return dg

    @_device
    def recurrent_path(dg, dgh):
        return dgh

    return {"rnn": (rnn_step, rnn_backward, input_path),
            "lstm": (lstm_step, lstm_backward, input_path),
            "gru": (gru_step, gru_backward, recurrent_path)}


def _make_block_products(row_of, unit_of):
    """The block-wide product of the persistent kernels, over the given row maps."""
    def block_products(smem, rows, K, B, v, v_at, part_at, out, backward, block, n_blocks, G,
                       U, H, n_slices, lanes, zero):
        """``out[b, c(r)] = M[r, :] . v[b, :]`` for every local row ``r`` and batch row ``b``,
        with ``M`` [rows, K] at the start of ``smem``; ``v`` [B, K] is copied to ``smem`` at
        ``v_at`` first.  ``c(r)`` is the row of ``W_hh`` (forward) or the unit (backward) that
        local row ``r`` holds.  ``lanes`` threads (a power of two) share each product: strided
        partial sums at ``part_at``, summed as a tree.  Every thread of the block must call it:
        it has block barriers inside."""
        tid = cuda.threadIdx.x
        for idx in range(tid, B * K, cuda.blockDim.x):
            b = idx // K
            smem[v_at + idx] = v[b, idx - b * K]
        cuda.syncthreads()
        group = tid // lanes
        lane = tid - group * lanes
        n_groups = cuda.blockDim.x // lanes
        n_dots = rows * B
        # Every thread runs the same number of passes: the barriers inside are uniform.
        for first in range(0, n_dots, n_groups):
            dot = first + group
            r = dot // B
            b = dot - r * B
            acc = zero
            if dot < n_dots:
                for i in range(lane, K, lanes):
                    acc += smem[r * K + i] * smem[v_at + b * K + i]
            smem[part_at + tid] = acc
            cuda.syncthreads()
            # Tree sum of the group's partials: log2(lanes) levels, not lanes serial reads.
            half = lanes // 2
            while half > 0:
                if lane < half:
                    smem[part_at + tid] += smem[part_at + tid + half]
                cuda.syncthreads()
                half //= 2
            if lane == 0 and dot < n_dots:
                if backward:
                    col = unit_of(r, block, n_blocks, U, H, n_slices)
                else:
                    col = row_of(r, block, n_blocks, G, U, H, n_slices)
                if col >= 0:
                    out[b, col] = smem[part_at + tid]
            cuda.syncthreads()

    return block_products


def make_persistent_python_kernels(dtype):
    """``{mode: (forward kernel, backward kernel)}`` as Python functions, not yet jitted
    (``compile_ptx`` takes these)."""
    dtype = np.dtype(dtype)
    zero = dtype.type(0)
    shared_type = numba.from_dtype(dtype)
    helpers = tuple(_device(f) for f in (time_slots, slice_row, slice_unit))
    helpers += (_device(_make_block_products(*helpers[1:])), _device(grid_barrier))
    return {mode: (_forward_kernel(fwd, zero, shared_type, *helpers),
                   _backward_kernel(back, rec, zero, shared_type, *helpers))
            for mode, (fwd, back, rec) in cell_steps(dtype).items()}


def _forward_kernel(cell_step, zero, shared_type, slots_of, row_of, unit_of, products,
                    barrier):
    def persistent_forward(T, B, H, n_slices, U, lanes, y, hs, cs, gates, xg, hg, w_hh, b_ih,
                           b_hh, lengths, arrivals, reverse, training, relu):
        # y [T, B, H]; hs, cs [T+1 or 2, B, H] (cs: any such array unless LSTM);
        # gates [T or 1, B, S*H] (any 3-D array for RNN); xg [T, B, G*H] (no bias); hg [B, G*H]
        # scratch; w_hh [G*H, H]; b_ih, b_hh [G*H]; lengths [B]; arrivals [1] scratch
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
        if block == 0 and tid == 0:
            arrivals[0] = 0
        cuda.cg.this_grid().sync()  # the cooperative launch; the counter zero before any arrival
        for step in range(T):
            t, before, after, saved = slots_of(T, step, reverse, training)
            products(smem, rows, H, B, hs[before], h_at, part_at, hg, 0, block, n_blocks, G, U,
                     H, n_slices, lanes, zero)
            # The gate math of this block's units: reads only hg columns this block wrote.
            per_slice = U * B
            for idx in range(tid, rows // G * B, n_threads):
                local_slice = idx // per_slice
                rem = idx - local_slice * per_slice
                u = rem // B
                b = rem - u * B
                j = unit_of(local_slice * U + u, block, n_blocks, U, H, n_slices)
                if j >= 0:
                    cell_step(b, j, H, t, before, after, saved, y, hs, cs, gates, xg, hg, b_ih,
                              b_hh, lengths, relu, training)
            barrier(arrivals, (step + 1) * n_blocks)

    return persistent_forward


def _backward_kernel(cell_back, recurrent_grad, zero, shared_type, slots_of, row_of, unit_of,
                     products, barrier):
    def persistent_backward(T, B, H, n_slices, U, lanes, dg, dgh, dh_carry, dc, dy, dh_rec, hs,
                            cs, gates, w_hh, lengths, arrivals, reverse, relu):
        # dg, dgh [T, B, G*H] (dgh: GRU's recurrent-path gradient, any such array otherwise);
        # dh_carry, dc, dh_rec [B, H] (in place; dc any such array unless LSTM; dh_rec zero on
        # entry, dg_first @ W_hh on exit); dy [T, B, H]; hs, cs [T+1, B, H] (hs rebuilt by the
        # LSTM, as the time loop's); gates
        # [T, B, S*H]; w_hh [G*H, H]; lengths [B]; arrivals [1] scratch.  The same work, in
        # the same order, as the time loop.
        G = w_hh.shape[0] // H
        K = G * H
        tid = cuda.threadIdx.x
        n_threads = cuda.blockDim.x
        block = cuda.blockIdx.x
        n_blocks = cuda.gridDim.x
        rows = (n_slices + n_blocks - 1) // n_blocks * U  # W_hh columns held by this block
        # Dynamic shared memory: [rows, G*H] W_hh columns | [B, G*H] gradient | partials.
        smem = cuda.shared.array(0, dtype=shared_type)
        v_at = rows * K
        part_at = v_at + B * K
        for idx in range(tid, rows * K, n_threads):
            r = idx // K
            j = unit_of(r, block, n_blocks, U, H, n_slices)
            smem[idx] = w_hh[idx - r * K, j] if j >= 0 else zero
        if block == 0 and tid == 0:
            arrivals[0] = 0
        cuda.cg.this_grid().sync()  # the cooperative launch; the counter zero before any arrival
        rec = recurrent_grad(dg, dgh)
        for it in range(T + 1):
            if it > 0:
                # dh_rec = (gradient of the step done last) @ W_hh, for this block's units.
                t_done = slots_of(T, T - it, reverse, 1)[0]
                products(smem, rows, K, B, rec[t_done], v_at, part_at, dh_rec, 1, block,
                         n_blocks, G, U, H, n_slices, lanes, zero)
            if it < T:
                t, before, after, _ = slots_of(T, T - 1 - it, reverse, 1)
                first = slots_of(T, 0, reverse, 1)[1]  # the slot of h0
                for idx in range(tid, rows * B, n_threads):
                    r = idx // B
                    j = unit_of(r, block, n_blocks, U, H, n_slices)
                    if j >= 0:
                        cell_back(idx - r * B, j, H, t, before, after, first, dg, dgh, dh_carry,
                                  dc, dy, dh_rec, hs, cs, gates, lengths, relu)
            barrier(arrivals, (it + 1) * n_blocks)

    return persistent_backward


def _float(name, rank):
    return Param(name, FLOAT, rank)


_LAUNCH_SHAPE = tuple(Param(name, INT) for name in ("T", "B", "H", "n_slices", "U", "lanes"))

#: Parameters of ``persistent_forward`` (shapes there).
PERSISTENT_FORWARD = _LAUNCH_SHAPE + (
    _float("y", 3), _float("hs", 3), _float("cs", 3), _float("gates", 3), _float("xg", 3),
    _float("hg", 2), _float("w_hh", 2), _float("b_ih", 1), _float("b_hh", 1),
    Param("lengths", LENGTHS, 1), Param("arrivals", COUNTER, 1), Param("reverse", INT),
    Param("training", INT), Param("relu", INT))

#: Parameters of ``persistent_backward`` (shapes there).
PERSISTENT_BACKWARD = _LAUNCH_SHAPE + (
    _float("dg", 3), _float("dgh", 3), _float("dh_carry", 2), _float("dc", 2), _float("dy", 3),
    _float("dh_rec", 2), _float("hs", 3), _float("cs", 3), _float("gates", 3),
    _float("w_hh", 2), Param("lengths", LENGTHS, 1), Param("arrivals", COUNTER, 1),
    Param("reverse", INT), Param("relu", INT))


def persistent_signature(dtype, backward=False):
    """Numba signature of the persistent forward (or backward) kernels, for eager compilation
    and PTX."""
    return numba_signature(PERSISTENT_BACKWARD if backward else PERSISTENT_FORWARD, dtype)


def shared_bytes(G, U, n_slices, n_blocks, B, H, threads, itemsize, backward=False):
    """Dynamic shared memory of one block: its share of ``W_hh`` (``G*U`` rows of ``H``
    forward, ``U`` columns of ``G*H`` backward: the same count), the staged vector
    (``h_prev`` [B, H] forward, the gradient [B, G*H] backward) and the partial sums."""
    held = -(-n_slices // n_blocks) * G * U * H
    staged = B * H * (G if backward else 1)
    return (held + staged + threads) * itemsize


@functools.lru_cache(maxsize=None)
def plan(G, B, H, itemsize, max_blocks, smem_limit, lanes=32, max_groups=8, backward=False):
    """Launch shape ``(n_blocks, n_slices, U, lanes, threads, shared_bytes)`` of the persistent
    forward (or backward) kernel, or ``None`` when it does not fit in ``max_blocks`` blocks of
    ``smem_limit`` bytes of shared memory each.  One slice per block, as many blocks as useful
    (up to one per unit), ``lanes`` threads per dot product and up to ``max_groups`` dot
    products at a time."""
    if lanes < 1 or lanes & (lanes - 1):
        raise ValueError(f"lanes must be a power of two (a tree sum), got {lanes}")
    n_blocks = max(1, min(max_blocks, H))
    U = -(-H // n_blocks)
    n_slices = -(-H // U)
    n_blocks = min(n_blocks, n_slices)
    dots = U * B * (1 if backward else G)
    threads = lanes * max(1, min(max_groups, dots))
    nbytes = shared_bytes(G, U, n_slices, n_blocks, B, H, threads, itemsize, backward)
    if nbytes > smem_limit:
        return None
    return n_blocks, n_slices, U, lanes, threads, nbytes


@functools.lru_cache(maxsize=None)
def persistent_kernels(dtype):
    """``{mode: (forward, backward)}`` kernels for ``dtype`` (compiled eagerly on a GPU, lazily
    in the simulator)."""
    dtype = np.dtype(dtype)
    fns = make_persistent_python_kernels(dtype)
    if cuda.config.ENABLE_CUDASIM:
        return {mode: (cuda.jit(fwd), cuda.jit(back)) for mode, (fwd, back) in fns.items()}
    fwd_sig, back_sig = persistent_signature(dtype), persistent_signature(dtype, backward=True)
    return {mode: (cuda.jit(fwd_sig)(fwd), cuda.jit(back_sig)(back))
            for mode, (fwd, back) in fns.items()}


def launch_persistent(kernel, shape, T, B, H, y, hs, cs, gates, xg, hg, w_hh, b_ih, b_hh,
                      lengths, arrivals, reverse, training, relu, stream=0):
    """Run all ``T`` forward steps in one cooperative launch of ``kernel`` with ``shape`` from
    ``plan`` (array shapes as ``persistent_forward``'s; ``cs`` and ``gates`` None where the cell
    has none; ``arrivals`` an int32 array of one element, used by no other kernel running at
    the same time)."""
    n_blocks, n_slices, U, lanes, threads, nbytes = shape
    # An empty view stands in for a missing array: the kernel never touches it, and no alias
    # of a real argument is passed (the simulator copies each argument back after the launch).
    cs = y[:0] if cs is None else cs
    gates = y[:0] if gates is None else gates
    kernel[n_blocks, threads, stream, nbytes](
        T, B, H, n_slices, U, lanes, y, hs, cs, gates, xg, hg, w_hh, b_ih, b_hh, lengths,
        arrivals, int(reverse), int(training), int(relu))


def launch_persistent_backward(kernel, shape, T, B, H, dg, dgh, dh_carry, dc, dy, dh_rec, hs,
                               cs, gates, w_hh, lengths, arrivals, reverse, relu, stream=0):
    """Run all ``T`` backward steps in one cooperative launch (array shapes as
    ``persistent_backward``'s; ``dgh``, ``dc``, ``cs``, ``gates`` None where the cell has none,
    and ``dgh`` None also when it is ``dg`` itself; ``arrivals`` as ``launch_persistent``'s)."""
    n_blocks, n_slices, U, lanes, threads, nbytes = shape
    dgh = dg[:0] if dgh is None or dgh is dg else dgh
    dc = dh_carry[:0] if dc is None else dc
    cs = hs[:0] if cs is None else cs
    gates = dg[:0] if gates is None else gates
    kernel[n_blocks, threads, stream, nbytes](
        T, B, H, n_slices, U, lanes, dg, dgh, dh_carry, dc, dy, dh_rec, hs, cs, gates, w_hh,
        lengths, arrivals, int(reverse), int(relu))
