"""Fused step kernels: one launch per time step that makes the step's recurrent product itself and
then runs the cell's element function, for small batches.

The per-step path launches two kernels a step: cuBLAS's product ``h_prev @ W_hh^T`` and the step
kernel (``kernels/cuda.py``).  At batch 1-4 both do little work, and even replayed as a CUDA
graph each node costs its start: an LSTM inference step at (T, B, H) = (1000, 1, 128) took
about 5 us on an H200 against cuDNN's 1.8 (BENCHMARKS.md).  Here one kernel does both.  Block
``(UNITS, SPLITS)`` threads covers ``UNITS`` hidden units of batch row ``blockIdx.y``:

* forward: thread ``(u, s)`` sums ``h_prev[b, i] * W_hh^T[i, k*H + j]`` over ``i = s, s + SPLITS,
  ...`` for each gate block ``k`` (a warp reads ``UNITS`` consecutive columns of ``W_hh^T``: one
  coalesced read), the partial sums meet in shared memory, and thread ``s = 0`` sums them, writes
  ``hg[b, k*H + j]`` and runs the element function, which reads back only its own columns;
* backward: ``dh_rec[b, j] = sum_k rec[t_done, b, k] * W_hh[k, j]`` the same way, ``rec`` the
  gradient whose product with ``W_hh`` flows back (``dg``, the reset-after GRU's ``dgh``) and
  ``t_done`` the step the previous launch did (none at the first, where ``dh_rec`` is zero); then
  the element function.  After the last launch one GEMM leaves ``dh_rec`` as the per-step loop
  does (the first step's product, for ``dh0``): ``CUDABackend.backward_sequence``.

The element functions are the persistent kernels' (``persistent.cell_steps``): states, gates and
gradients land in the slots of the time loops.  The products are summed in this order in the
compute dtype, strict float32 or float64 (never TF32): the results differ from cuBLAS's by
rounding.  Cells: RNN, LSTM, the reset-after GRU (the reset-before GRU's second product needs
``r * h_prev`` of every unit first: a second launch); float32 and float64, as the persistent
kernels.
"""
import functools

import numba
import numpy as np
from numba import cuda

from .loops import time_slots
from .persistent import cell_steps
from .signatures import FLOAT, INT, LENGTHS, Param, numba_signature

#: Gate blocks (``G``) of each cell with fused step kernels; the GRU only with ``reset_after``.
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
FUSED_MODES = tuple(GATES)
#: Hidden units per block: one warp wide, so that a warp's reads of W_hh coalesce.
UNITS = 32
#: Threads sharing each dot product; their partial sums meet in shared memory.
SPLITS = 8


def fused_launch_shape(B, H):
    """(grid, block) of a fused step kernel: x over blocks of ``UNITS`` units, y over batch rows;
    ``UNITS`` x ``SPLITS`` threads a block."""
    return ((H + UNITS - 1) // UNITS, B), (UNITS, SPLITS)


def _float(name, rank):
    return Param(name, FLOAT, rank)


_SHAPE = tuple(Param(name, INT) for name in ("B", "H", "T", "step"))

#: Parameters of ``fused_forward`` (shapes there).
FUSED_FORWARD = _SHAPE + (
    _float("y", 3), _float("hs", 3), _float("cs", 3), _float("gates", 3), _float("xg", 3),
    _float("hg", 2), _float("w_hh_t", 2), _float("b_ih", 1), _float("b_hh", 1),
    Param("lengths", LENGTHS, 1), Param("reverse", INT), Param("training", INT),
    Param("relu", INT))

#: Parameters of ``fused_backward`` (shapes there).
FUSED_BACKWARD = _SHAPE + (
    _float("dg", 3), _float("dgh", 3), _float("dh_carry", 2), _float("dc", 2), _float("dy", 3),
    _float("dh_rec", 2), _float("hs", 3), _float("cs", 3), _float("gates", 3),
    _float("w_hh", 2), Param("lengths", LENGTHS, 1), Param("reverse", INT), Param("relu", INT))


def _device(fn):
    return cuda.jit(device=True, inline="always")(fn)


def _forward_kernel(cell_step, G, zero, shared_type, slots_of):
    """The forward kernel of a cell of ``G`` gate blocks (a constant of the compiled kernel:
    its ``G`` sums stay in registers, and each element of ``h_prev`` is read once)."""
    def fused_forward(B, H, T, step, y, hs, cs, gates, xg, hg, w_hh_t, b_ih, b_hh, lengths,
                      reverse, training, relu):
        # Loop step ``step`` of T.  y [T, B, H]; hs, cs [T+1 or 2, B, H] (cs: any such array
        # unless LSTM); gates [T or 1, B, S*H] (any 3-D array for the RNN); xg [T, B, G*H]
        # (no bias); hg [B, G*H] scratch; w_hh_t [H, G*H] = W_hh^T; b_ih, b_hh [G*H];
        # lengths [B]
        part = cuda.shared.array((G, SPLITS, UNITS), shared_type)  # partial sums
        acc = cuda.local.array(G, shared_type)  # this thread's share of each gate's sum
        u = cuda.threadIdx.x
        s = cuda.threadIdx.y
        j = cuda.blockIdx.x * UNITS + u
        b = cuda.blockIdx.y
        t, before, after, saved = slots_of(T, step, reverse, training)
        for k in range(G):
            acc[k] = zero
        if j < H:
            for i in range(s, H, SPLITS):  # h_prev[b, :] . W_hh[k*H + j, :], every SPLITS-th
                h = hs[before, b, i]
                for k in range(G):
                    acc[k] += h * w_hh_t[i, k * H + j]
        for k in range(G):
            part[k, s, u] = acc[k]
        cuda.syncthreads()
        if s == 0 and j < H:
            for k in range(G):
                total = zero
                for p in range(SPLITS):
                    total += part[k, p, u]
                hg[b, k * H + j] = total
            cell_step(b, j, H, t, before, after, saved, y, hs, cs, gates, xg, hg, b_ih, b_hh,
                      lengths, relu, training)

    return fused_forward


def _backward_kernel(cell_back, recurrent_grad, zero, shared_type, slots_of):
    def fused_backward(B, H, T, step, dg, dgh, dh_carry, dc, dy, dh_rec, hs, cs, gates, w_hh,
                       lengths, reverse, relu):
        # Loop step ``step`` of T, counted from the sequence's end (t = T-1, or 0 when
        # reverse).  dg, dgh [T, B, G*H] (dgh: the reset-after GRU's recurrent-path gradient,
        # any such array otherwise); dh_carry, dc, dh_rec [B, H] (dc any such array unless
        # LSTM; dh_rec zero before step 0); dy [T, B, H]; hs, cs [T+1, B, H] (hs rebuilt by
        # the LSTM, as the time loop's); gates
        # [T, B, S*H]; w_hh [G*H, H]; lengths [B]
        K = w_hh.shape[0]
        part = cuda.shared.array((SPLITS, UNITS), shared_type)  # partial sums
        u = cuda.threadIdx.x
        s = cuda.threadIdx.y
        j = cuda.blockIdx.x * UNITS + u
        b = cuda.blockIdx.y
        if step > 0:  # the same for every thread: the barrier below is uniform
            rec = recurrent_grad(dg, dgh)
            t_done = slots_of(T, T - step, reverse, 1)[0]
            acc = zero
            if j < H:
                for k in range(s, K, SPLITS):  # rec[t_done, b, :] . W_hh[:, j]
                    acc += rec[t_done, b, k] * w_hh[k, j]
            part[s, u] = acc
            cuda.syncthreads()
            if s == 0 and j < H:
                total = zero
                for p in range(SPLITS):
                    total += part[p, u]
                dh_rec[b, j] = total
        t, before, after, _ = slots_of(T, T - 1 - step, reverse, 1)
        first = slots_of(T, 0, reverse, 1)[1]  # the slot of h0
        if s == 0 and j < H:
            cell_back(b, j, H, t, before, after, first, dg, dgh, dh_carry, dc, dy, dh_rec, hs,
                      cs, gates, lengths, relu)

    return fused_backward


def make_fused_python_kernels(dtype):
    """``{mode: (forward kernel, backward kernel)}`` as Python functions, not yet jitted
    (``compile_ptx`` takes these)."""
    dtype = np.dtype(dtype)
    zero = dtype.type(0)
    shared_type = numba.from_dtype(dtype)
    slots_of = _device(time_slots)
    return {mode: (_forward_kernel(fwd, GATES[mode], zero, shared_type, slots_of),
                   _backward_kernel(back, rec, zero, shared_type, slots_of))
            for mode, (fwd, back, rec) in cell_steps(dtype).items()}


def fused_signature(dtype, backward=False):
    """Numba signature of the fused forward (or backward) kernels, for eager compilation and
    PTX."""
    return numba_signature(FUSED_BACKWARD if backward else FUSED_FORWARD, dtype)


@functools.lru_cache(maxsize=None)
def fused_kernels(dtype, launch):
    """``{mode: (forward, backward)}`` launchers ``launch(B, H, T, step, *args, stream)`` for
    ``dtype`` in launch mode ``launch`` (``kernels.cuda.LAUNCH_MODES``; lazy under the
    simulator)."""
    from .cuda import make_launcher

    dtype = np.dtype(dtype)
    return {mode: (make_launcher(fwd, FUSED_FORWARD, dtype, launch, fused_launch_shape),
                   make_launcher(back, FUSED_BACKWARD, dtype, launch, fused_launch_shape))
            for mode, (fwd, back) in make_fused_python_kernels(dtype).items()}
