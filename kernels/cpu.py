"""CPU kernels: each step kernel as a loop over batch rows whose inner loop LLVM vectorises, and
the time loops (``kernels/loops.py``) compiled around the very OpenBLAS NumPy uses.

Step kernels.  The length mask is per row, so it is tested once per row: a padding row is
copied or zeroed as a whole.  A valid row is cut into tiles of ``TILE`` units; per tile, one
loop sums the pre-activations of each gate block into a buffer, one loop calls the cell's
scalar math (``kernels/cell_math.py``) and writes every result into the buffer, and one short
loop per output array copies the tile out.  All three are straight-line, branch-free code that
LLVM turns into packed SIMD instructions (``tests/test_cpu_vectorised.py`` checks the compiled
code).  What it took, each found in the LLVM IR:

* The buffer, on the stack (``_stack_tile``).  LLVM vectorises a loop that stores to arrays it
  cannot prove distinct only behind runtime overlap checks of each stored array against every
  other accessed one, and gives up past 8 checks ("too many memory checks needed"): the LSTM
  forward writes 8 gate blocks and rows and reads 17.  Nothing can overlap a stack buffer, so
  the math loop needs no check, and each copy-out loop reads only the buffer.
* Gate blocks as views (``row[k*H + j0:]``) indexed by a counter from 0.  With ``xg[b, k*H +
  j]`` LLVM cannot prove the index non-negative (``H`` is a runtime value), so Numba's
  negative-index wraparound stays in the loop and the loads become gathers.
* ``error_model="numpy"``.  Numba's default checks every float division for zero (to raise
  ``ZeroDivisionError``), a branch that keeps the loop scalar.
* ``fastmath={"contract"}``, and no other fast-math flag: LLVM fuses ``a*b + c`` into one FMA
  (one rounding instead of two, as the CUDA compiler does by default), but keeps IEEE semantics
  otherwise (the exp's rounding trick and the NaN handling depend on them).  LSTM step at
  B=32, H=256 (callgrind): forward 377k -> 344k instructions, backward 129k -> 57k.
* No NRT: a step kernel allocates nothing, and with NRT every array it touches is increfed and
  decrefed (atomic operations).

Single-threaded on purpose: the per-step pointwise work is small, and a Numba thread pool
spinning against OpenBLAS's threads cost 60x on these machines.  The cores belong to BLAS.

Sequence loops: ``kernels/loops.py`` compiled with Numba, the per-step recurrent GEMM a direct
call of ``cblas_?gemm`` in the OpenBLAS NumPy uses (so one BLAS thread pool, the one
threadpoolctl limits for NumPy): one ``cblas_?gemv`` for a product of one row, and on
OpenBLAS's SkylakeX core one call per block that its small-matrix kernels take without packing
``W_hh`` (``small_gemm_blocks``).  No Python runs between steps.

Numba's on-disk cache (``cache=True``) keys a closure by the pickled contents of its cells.  A
Numba dispatcher pickles with a random per-process UUID, so every closure over a dispatcher
(all of these) missed the cache in every new process and recompiled.  ``_stable_cache_keys``
gives each dispatcher a UUID derived from what it is, so a warm cache is hit; the pickle still
holds the functions' code and constants, so a change of the math still misses.
"""
import ctypes
import inspect
import os
from typing import Any, NamedTuple, Optional

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core.datamodel import models
from numba.core.errors import RequireLiteralValue
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from . import signatures as sig
from .cell_math import make_cell_math
from .loops import make_loops, operand_layout, time_slots
from .storage import make_storage

# CBLAS enums (plain C ints in every CBLAS).
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

#: Numba options of every CPU step kernel (see above).
KERNEL_OPTIONS = {"_nrt": False, "error_model": "numpy", "fastmath": {"contract"}}

#: Units per tile of a step kernel's row loop.  Instructions per call at B=32, H=256, float32
#: AVX2 (callgrind), tiles of 64 / 128 / 256: LSTM forward 344k / 334k / 317k, backward
#: 57k / 47k / 89k.
TILE = 128


@intrinsic
def _stack_tile(typingctx, rows, like):
    """A C-contiguous ``[rows, TILE]`` array of ``like``'s dtype in the calling function's stack
    frame (allocated once, at its entry), uninitialised; ``rows`` a literal int."""
    if not isinstance(rows, types.IntegerLiteral):
        raise RequireLiteralValue(rows)
    if not isinstance(like, types.Array):
        return None
    count = rows.literal_value
    tile_type = types.Array(like.dtype, 2, "C")

    def codegen(context, builder, signature, args):
        item = context.get_value_type(like.dtype)
        with builder.goto_entry_block():
            data = builder.alloca(item, size=ir.Constant(ir.IntType(64), count * TILE))
        itemsize = context.get_abi_sizeof(item)
        intp = context.get_value_type(types.intp)
        tile = make_array(tile_type)(context, builder)
        populate_array(tile, data=data, shape=[intp(count), intp(TILE)],
                       strides=[intp(TILE * itemsize), intp(itemsize)], itemsize=intp(itemsize),
                       meminfo=None)
        return tile._getvalue()

    return tile_type(rows, like), codegen


@numba.njit(inline="always")
def _tiles(H):
    return (H + TILE - 1) // TILE


@numba.njit(inline="always")
def _at(row, k, H, j0):
    """Gate block ``k`` of a row of gate blocks, from unit ``j0`` on: ``row[k*H + j0:]``."""
    return row[k * H + j0:]


@numba.njit(inline="always")
def _copy(dst, src, n):
    for u in range(n):
        dst[u] = src[u]


@numba.njit(inline="always")
def _fill(dst, value, n):
    for u in range(n):
        dst[u] = value


@numba.njit(inline="always")
def _add(dst, src, n):
    for u in range(n):
        dst[u] += src[u]


@numba.njit(inline="always")
def _sum4(out, a, b, c, d, n):
    """out[:n] = a + b + (c + d): a gate's pre-activation x W_ih^T + h W_hh^T + (b_ih + b_hh)."""
    for u in range(n):
        out[u] = a[u] + b[u] + (c[u] + d[u])


@numba.njit(inline="always")
def _sum2(out, a, b, n):
    for u in range(n):
        out[u] = a[u] + b[u]


def _step_kernels(m, s):
    """Every CPU step kernel over the scalar math ``m`` (``make_cell_math``) and the storage
    ``s`` (``make_storage``), as plain Python functions (``make_cpu_kernels`` jits them).
    Shapes as in ``kernels/signatures.py``; the tile buffers hold computed values, which
    ``_put`` stores into ``STORED`` arrays, and values of ``STORED`` arrays are read through
    ``load``."""
    load, store = s.load, s.store
    zero, fzero = s.zero, m.zero  # zeros of the STORED and the FLOAT arrays
    rnn_forward, rnn_backward = m.rnn_forward, m.rnn_backward
    lstm_forward, lstm_backward = m.lstm_forward, m.lstm_backward
    gru_reset_after_forward = m.gru_reset_after_forward
    gru_reset_after_backward = m.gru_reset_after_backward
    gru_reset_before_gates = m.gru_reset_before_gates
    gru_reset_before_candidate = m.gru_reset_before_candidate
    gru_reset_before_candidate_backward = m.gru_reset_before_candidate_backward
    gru_reset_before_gates_backward = m.gru_reset_before_gates_backward

    @numba.njit(inline="always")
    def _put(dst, src, n):
        for u in range(n):
            dst[u] = store(src[u])

    # ------------------------------------------------------------------------------- RNN
    @sig.step_kernel(sig.RNN_FORWARD_STEP)
    def rnn_forward_step(B, H, y, h_new, xg, hg, b_ih, b_hh, h_prev, lengths, t, relu):
        buf = _stack_tile(2, xg)  # pre-activation, h
        for b in range(B):
            if t >= lengths[b]:
                _copy(h_new[b], h_prev[b], H)
                _fill(y[b], zero, H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                _sum4(buf[0], xg[b, j0:], hg[b, j0:], b_ih[j0:], b_hh[j0:], n)
                for u in range(n):
                    buf[1, u] = rnn_forward(buf[0, u], relu)
                _put(h_new[b, j0:], buf[1], n)
                _put(y[b, j0:], buf[1], n)

    @sig.step_kernel(sig.RNN_BACKWARD_STEP)
    def rnn_backward_step(B, H, dg, dh_carry, dy, dh_rec, h, lengths, t, relu):
        buf = _stack_tile(1, dh_carry)  # da
        for b in range(B):
            if t >= lengths[b]:  # padding: no gradient; dL/dh passes on to the step before
                _fill(dg[b], zero, H)
                _add(dh_carry[b], dh_rec[b], H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                carry, rec, dy_, h_ = dh_carry[b, j0:], dh_rec[b, j0:], dy[b, j0:], h[b, j0:]
                for u in range(n):
                    buf[0, u] = rnn_backward(carry[u] + rec[u] + load(dy_[u]), load(h_[u]),
                                             relu)
                _put(dg[b, j0:], buf[0], n)
            _fill(dh_carry[b], fzero, H)

    # ------------------------------------------------------------------------------ LSTM
    @sig.step_kernel(sig.LSTM_FORWARD_STEP)
    def lstm_forward_step(B, H, y, h_new, c_new, c_saved, gates, xg, hg, b_ih, b_hh, h_prev,
                          c_prev, lengths, t, save):
        pre = _stack_tile(4, xg)  # pre-activations of i, f, g, o
        out = _stack_tile(6, xg)  # i, f, g, o (the saved gate blocks), c, h
        for b in range(B):
            if t >= lengths[b]:
                _copy(h_new[b], h_prev[b], H)
                _put(c_saved[b], c_prev[b], H)
                _copy(c_new[b], c_prev[b], H)
                _fill(y[b], zero, H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                for k in range(4):
                    _sum4(pre[k], _at(xg[b], k, H, j0), _at(hg[b], k, H, j0),
                          _at(b_ih, k, H, j0), _at(b_hh, k, H, j0), n)
                c_prev_ = c_prev[b, j0:]
                for u in range(n):
                    (out[0, u], out[1, u], out[2, u], out[3, u], out[4, u],
                     out[5, u]) = lstm_forward(pre[0, u], pre[1, u], pre[2, u], pre[3, u],
                                               c_prev_[u])
                if save:
                    for k in range(4):
                        _put(_at(gates[b], k, H, j0), out[k], n)
                _copy(c_new[b, j0:], out[4], n)
                _put(c_saved[b, j0:], out[4], n)
                _put(h_new[b, j0:], out[5], n)
                _put(y[b, j0:], out[5], n)

    @sig.step_kernel(sig.LSTM_BACKWARD_STEP)
    def lstm_backward_step(B, H, dg, dh_carry, dc, dy, dh_rec, gates, c, c_prev, h, h0, lengths,
                           t):
        out = _stack_tile(6, dh_carry)  # dai, daf, dag, dao, dc_prev, h
        for b in range(B):
            if t >= lengths[b]:  # padding: dL/dh and dL/dc pass on unchanged
                _fill(dg[b], zero, 4 * H)
                _add(dh_carry[b], dh_rec[b], H)
                _copy(h[b], h0[b], H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                carry, rec, dy_, dc_ = dh_carry[b, j0:], dh_rec[b, j0:], dy[b, j0:], dc[b, j0:]
                i, f, g = _at(gates[b], 0, H, j0), _at(gates[b], 1, H, j0), _at(gates[b], 2, H, j0)
                o = _at(gates[b], 3, H, j0)
                c_, c_prev_ = c[b, j0:], c_prev[b, j0:]
                for u in range(n):
                    (out[0, u], out[1, u], out[2, u], out[3, u], out[4, u],
                     out[5, u]) = lstm_backward(
                        carry[u] + rec[u] + load(dy_[u]), dc_[u], load(i[u]), load(f[u]),
                        load(g[u]), load(o[u]), load(c_[u]), load(c_prev_[u]))
                for k in range(4):
                    _put(_at(dg[b], k, H, j0), out[k], n)
                _copy(dc_, out[4], n)
                _put(h[b, j0:], out[5], n)
            _fill(dh_carry[b], fzero, H)

    # ------------------------------------------------------ GRU, reset after the product
    @sig.step_kernel(sig.GRU_RESET_AFTER_FORWARD_STEP)
    def gru_reset_after_forward_step(B, H, y, h_new, gates, xg, hg, b_ih, b_hh, h_prev,
                                     lengths, t, save):
        pre = _stack_tile(4, xg)  # ar, az, W_in x + b_in, W_hn h_prev + b_hn (saved block 3)
        out = _stack_tile(4, xg)  # r, z, n, h
        for b in range(B):
            if t >= lengths[b]:
                _copy(h_new[b], h_prev[b], H)
                _fill(y[b], zero, H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                for k in range(2):
                    _sum4(pre[k], _at(xg[b], k, H, j0), _at(hg[b], k, H, j0),
                          _at(b_ih, k, H, j0), _at(b_hh, k, H, j0), n)
                _sum2(pre[2], _at(xg[b], 2, H, j0), _at(b_ih, 2, H, j0), n)
                _sum2(pre[3], _at(hg[b], 2, H, j0), _at(b_hh, 2, H, j0), n)
                h_prev_ = h_prev[b, j0:]
                for u in range(n):
                    out[0, u], out[1, u], out[2, u], out[3, u] = gru_reset_after_forward(
                        pre[0, u], pre[1, u], pre[2, u], pre[3, u], load(h_prev_[u]))
                if save:
                    for k in range(3):
                        _put(_at(gates[b], k, H, j0), out[k], n)
                    _put(_at(gates[b], 3, H, j0), pre[3], n)
                _put(h_new[b, j0:], out[3], n)
                _put(y[b, j0:], out[3], n)

    @sig.step_kernel(sig.GRU_RESET_AFTER_BACKWARD_STEP)
    def gru_reset_after_backward_step(B, H, dgx, dgh, dh_carry, dy, dh_rec, gates, h_prev,
                                      lengths, t):
        out = _stack_tile(5, dh_carry)  # dar, daz, dxn, dhn, dh_prev (direct part)
        for b in range(B):
            if t >= lengths[b]:
                _fill(dgx[b], zero, 3 * H)
                _fill(dgh[b], zero, 3 * H)
                _add(dh_carry[b], dh_rec[b], H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                carry, rec, dy_ = dh_carry[b, j0:], dh_rec[b, j0:], dy[b, j0:]
                r, z = _at(gates[b], 0, H, j0), _at(gates[b], 1, H, j0)
                n_, hn = _at(gates[b], 2, H, j0), _at(gates[b], 3, H, j0)
                h_prev_ = h_prev[b, j0:]
                for u in range(n):
                    out[0, u], out[1, u], out[2, u], out[3, u], out[4, u] = \
                        gru_reset_after_backward(carry[u] + rec[u] + load(dy_[u]), load(r[u]),
                                                 load(z[u]), load(n_[u]), load(hn[u]),
                                                 load(h_prev_[u]))
                for k in range(3):
                    _put(_at(dgx[b], k, H, j0), out[k], n)
                for k in range(2):
                    _put(_at(dgh[b], k, H, j0), out[k], n)
                _put(_at(dgh[b], 2, H, j0), out[3], n)
                _copy(carry, out[4], n)

    # ----------------------------------------------------- GRU, reset before the product
    @sig.step_kernel(sig.GRU_RESET_BEFORE_GATES_STEP)
    def gru_reset_before_gates_step(B, H, gates, xg, hg_rz, b_ih, b_hh, h_prev):
        pre = _stack_tile(2, xg)  # ar, az
        out = _stack_tile(3, xg)  # r, z, r*h_prev
        for b in range(B):
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                for k in range(2):
                    _sum4(pre[k], _at(xg[b], k, H, j0), _at(hg_rz[b], k, H, j0),
                          _at(b_ih, k, H, j0), _at(b_hh, k, H, j0), n)
                h_prev_ = h_prev[b, j0:]
                for u in range(n):
                    out[0, u], out[1, u], out[2, u] = gru_reset_before_gates(
                        pre[0, u], pre[1, u], load(h_prev_[u]))
                _put(_at(gates[b], 0, H, j0), out[0], n)
                _put(_at(gates[b], 1, H, j0), out[1], n)
                _put(_at(gates[b], 3, H, j0), out[2], n)

    @sig.step_kernel(sig.GRU_RESET_BEFORE_CANDIDATE_STEP)
    def gru_reset_before_candidate_step(B, H, y, h_new, gates, xg, hg_n, b_ih, b_hh, h_prev,
                                        lengths, t):
        pre = _stack_tile(1, xg)  # an
        out = _stack_tile(2, xg)  # n, h
        for b in range(B):
            if t >= lengths[b]:
                _copy(h_new[b], h_prev[b], H)
                _fill(y[b], zero, H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                _sum4(pre[0], _at(xg[b], 2, H, j0), hg_n[b, j0:], _at(b_ih, 2, H, j0),
                      _at(b_hh, 2, H, j0), n)
                z, h_prev_ = _at(gates[b], 1, H, j0), h_prev[b, j0:]
                for u in range(n):
                    out[0, u], out[1, u] = gru_reset_before_candidate(pre[0, u], load(z[u]),
                                                                      load(h_prev_[u]))
                _put(_at(gates[b], 2, H, j0), out[0], n)
                _put(h_new[b, j0:], out[1], n)
                _put(y[b, j0:], out[1], n)

    @sig.step_kernel(sig.GRU_RESET_BEFORE_CANDIDATE_BACKWARD_STEP)
    def gru_reset_before_candidate_backward_step(B, H, dg, dh_carry, dy, dh_rec, gates, h_prev,
                                                 lengths, t):
        out = _stack_tile(3, dh_carry)  # daz, dan, dh_prev (direct part)
        for b in range(B):
            if t >= lengths[b]:
                _fill(_at(dg[b], 1, H, 0), zero, 2 * H)
                _add(dh_carry[b], dh_rec[b], H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                carry, rec, dy_ = dh_carry[b, j0:], dh_rec[b, j0:], dy[b, j0:]
                z, n_ = _at(gates[b], 1, H, j0), _at(gates[b], 2, H, j0)
                h_prev_ = h_prev[b, j0:]
                for u in range(n):
                    out[0, u], out[1, u], out[2, u] = gru_reset_before_candidate_backward(
                        carry[u] + rec[u] + load(dy_[u]), load(z[u]), load(n_[u]),
                        load(h_prev_[u]))
                _put(_at(dg[b], 1, H, j0), out[0], n)
                _put(_at(dg[b], 2, H, j0), out[1], n)
                _copy(carry, out[2], n)

    @sig.step_kernel(sig.GRU_RESET_BEFORE_GATES_BACKWARD_STEP)
    def gru_reset_before_gates_backward_step(B, H, dg, dh_carry, drh, gates, h_prev, lengths,
                                             t):
        out = _stack_tile(2, dh_carry)  # dar, dh_prev (the part through r*h_prev)
        for b in range(B):
            if t >= lengths[b]:
                _fill(dg[b], zero, H)
                continue
            for tile in range(_tiles(H)):
                j0 = tile * TILE
                n = min(TILE, H - j0)
                drh_, r, h_prev_ = drh[b, j0:], _at(gates[b], 0, H, j0), h_prev[b, j0:]
                for u in range(n):
                    out[0, u], out[1, u] = gru_reset_before_gates_backward(drh_[u], load(r[u]),
                                                                           load(h_prev_[u]))
                _put(dg[b, j0:], out[0], n)
                _add(dh_carry[b, j0:], out[1], n)

    # ---------------------------------------------------------------- dropout mask
    dropout = m.dropout

    @sig.step_kernel(sig.DROPOUT_MASK)
    def dropout_mask(B, H, mask, seed, offset, p, scale):
        for b in range(B):
            row = offset + b * H
            for j in range(H):
                mask[b, j] = store(dropout(seed, row + j, p, scale))

    return {fn.__name__: fn for fn in (
        dropout_mask, rnn_forward_step, rnn_backward_step, lstm_forward_step, lstm_backward_step,
        gru_reset_after_forward_step, gru_reset_after_backward_step,
        gru_reset_before_gates_step, gru_reset_before_candidate_step,
        gru_reset_before_candidate_backward_step, gru_reset_before_gates_backward_step)}


def make_cpu_kernels(dtype):
    """``{kernel name: jitted step kernel}`` for layers of ``dtype``, compiled on first call;
    16-bit ``STORED`` arrays are passed as their ``uint16`` bits (``storage.bits``)."""
    s = make_storage(dtype)
    kernels = {}
    for name, fn in _step_kernels(make_cell_math(s.compute_dtype), s).items():
        kernels[name] = numba.njit(cache=True, **KERNEL_OPTIONS)(fn)
        _stable_cache_keys(kernels[name], f"{s.name}.{name}")
    return kernels


class BlasLibrary(NamedTuple):
    """NumPy's OpenBLAS, as the compiled loops call it (``numpy_blas``)."""

    path: str
    #: ``(sgemm symbol, dgemm symbol)``
    gemm: tuple
    #: Numba type of its ``blasint`` (int64 for the ILP64 builds)
    int_type: Any
    #: the kernel set OpenBLAS chose for this CPU, as threadpoolctl reports it (``"SkylakeX"``,
    #: ``"Haswell"``, ...; None where it does not say)
    core: Optional[str]
    #: ``(sgemv symbol, dgemv symbol)``, None where it has none
    gemv: Optional[tuple]
    #: its ``openblas_get_num_threads``, None where it has none
    threads: Optional[str]


def numpy_blas():
    """The ``BlasLibrary`` of the OpenBLAS NumPy uses, or None.

    NumPy's wheels bundle ``scipy_openblas`` with ILP64 symbols (``scipy_cblas_sgemm64_``,
    64-bit ints); other builds export plain ``cblas_sgemm``.  Anything else (MKL, Accelerate, no
    threadpoolctl): None, and the drivers run their per-step Python loop with NumPy's matmul.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    numpy_dir = os.path.dirname(np.__file__)  # .../site-packages/numpy
    numpy_dirs = (numpy_dir + os.sep, numpy_dir + ".libs" + os.sep)  # wheels: numpy.libs/
    candidates = [d for d in threadpool_info()
                  if d.get("user_api") == "blas" and d.get("internal_api") == "openblas"]
    # NumPy's own library first: a SciPy in the process brings a second OpenBLAS (in
    # scipy.libs/), and calling it made training steps 5-30x slower here.
    candidates.sort(key=lambda d: not d["filepath"].startswith(numpy_dirs))
    for d in candidates:
        lib = ctypes.CDLL(d["filepath"])
        for prefix, suffix, int_t in (("scipy_cblas_", "64_", types.int64),
                                      ("cblas_", "64_", types.int64),
                                      ("scipy_cblas_", "", types.int32),
                                      ("cblas_", "", types.int32)):
            gemm = (f"{prefix}sgemm{suffix}", f"{prefix}dgemm{suffix}")
            if all(hasattr(lib, symbol) for symbol in gemm):
                gemv = tuple(symbol.replace("gemm", "gemv") for symbol in gemm)
                threads = prefix.replace("cblas_", "openblas_") + "get_num_threads" + suffix
                return BlasLibrary(d["filepath"], gemm, int_t, d.get("architecture"),
                                   gemv if all(hasattr(lib, s) for s in gemv) else None,
                                   threads if hasattr(lib, threads) else None)
    return None


def _external_blas(blas):
    """``(sgemm, dgemm, sgemv, dgemv, get_num_threads)`` of ``blas`` as Numba external
    functions (None for what it lacks), resolved by name at link time (also for code loaded from
    Numba's cache); a ctypes pointer instead would make the loops uncachable."""
    import llvmlite.binding as llvm

    llvm.load_library_permanently(blas.path)
    e, i, p = types.int32, blas.int_type, types.intp  # CBLAS enum, blasint, pointer (address)
    scalars = (types.float32, types.float64)
    gemm = tuple(_BlasFunction(symbol, types.void(e, e, e, i, i, i, s, p, i, p, i, s, p, i))
                 for symbol, s in zip(blas.gemm, scalars))
    gemv = (None, None) if blas.gemv is None else tuple(
        _BlasFunction(symbol, types.void(e, e, i, i, s, p, i, p, i, s, p, i))
        for symbol, s in zip(blas.gemv, scalars))
    threads = None if blas.threads is None else _BlasFunction(blas.threads, types.int32())
    return gemm + gemv + (threads,)


class _BlasFunction(types.ExternalFunction):
    """An external function that pickles as its symbol and signature.  Numba's cache key
    pickles the functions a cached function calls; the base class pickles with a per-process
    class id, so every new process would miss the cache."""

    def __reduce__(self):
        return _BlasFunction, (self.symbol, self.sig)


models.register_default(_BlasFunction)(models.OpaqueModel)  # as the base class's


_BLAS = numpy_blas()
#: ``_blas_threads``: how many threads OpenBLAS's next call may use (None: unknown)
_sgemm, _dgemm, _sgemv, _dgemv, _blas_threads = (
    _external_blas(_BLAS) if _BLAS is not None else (None,) * 5)


@numba.njit(cache=True)
def _blas_threads_unknown():
    """In place of ``openblas_get_num_threads`` where the library has none: a count that is
    never 1, so rows are never split (``small_gemm_blocks``)."""
    return 0


#: OpenBLAS has small-matrix GEMM kernels, which do not pack their operands, for its SkylakeX
#: core (AVX-512) only, and takes them while M*N*K <= 100**3
#: (``kernel/x86_64/sgemm_small_kernel_permit_skylakex.c``); above that it packs the whole
#: ``[K, N]`` operand on every call, which is most of a call at few rows.  So a float32 product
#: is cut into blocks within that bound (``small_gemm_blocks``), by a rule measured per CPU
#: (``benchmarks/small_gemm_grid.py`` prints the grid on the machine it runs on):
#: ``SMALL_GEMM_RULES[(OpenBLAS core, LLVM's host CPU name)]``, the second ``None`` for any CPU
#: with that core, = ``(max M*K, unit, most columns, least rows, most rows threaded, most row
#: blocks)``:
#:
#: * rows per call: all ``M`` where ``least rows`` is 0, else the most rows, a power of two,
#:   that a block of ``most columns`` holds within the bound (no cut if that is below ``least
#:   rows``, or if ``M`` needs more than ``most row blocks`` of them);
#: * columns per call: the widest multiple of ``unit`` within the bound, at most ``most
#:   columns``;
#: * a product with M*K above ``max M*K`` is not cut, nor, where OpenBLAS runs more than one
#:   thread, one of more than ``most rows threaded`` rows: its small-matrix kernels run on one
#:   thread, the whole product on all.
#:
#: ``("SkylakeX", None)``, measured on an Intel Xeon (family 6, model 167), one thread, us per
#: product [M, K] @ [K, N], whole / cut, W^T C-contiguous then the transposed view of W.  M*K <=
#: 4096, all as fast or faster: [4, 256] @ [256, 1024] 53 / 23, 115 / 109; [8, 256] @ [256, 1024]
#: 66 / 41, 129 / 122; [16, 256] @ [256, 1024] 93 / 88, 164 / 166; [2, 512] @ [512, 1536]
#: 342 / 117, 416 / 298; [8, 512] @ [512, 2048] 496 / 343, 655 / 581; [2, 1024] @ [1024, 3072]
#: 1493 / 718, 1698 / 455; [4, 1024] @ [1024, 4096] 1714 / 1371, 2317 / 611.  Above, mostly
#: slower: [8, 1024] @ [1024, 3072] 1401 / 1654; [16, 512] @ [512, 2048] 477 / 777; [16, 1024] @
#: [1024, 3072] 1855 / 4342 (but [16, 512] @ [512, 1536] 582 / 359).
#:
#: ``("SkylakeX", "znver4")``, measured on an AMD EPYC (family 25, model 17: Zen 4), one thread,
#: W^T C-contiguous.  Blocks of 64 or 128 columns ran alike and faster than any width between
#: (64 columns is the kernel's widest step; [32, 256] @ [256, 1024], us per product, in blocks
#: of 48, 64, 80, 96, 112 columns: 290, 180, 221, 193, 235); whole / blocks of 64 columns and
#: all rows / of 32 and all rows / the Intel rule: [4, 256] @ [256, 1024] 102 / 20 / 104 / 30;
#: [8, 256] @ [256, 1024] 156 / 39 / 83 / 42; [16, 256] @ [256, 1024] 162 / 75 / 158 / 107;
#: [32, 256] @ [256, 1024] 280 / 154 / 199; [2, 512] @ [512, 2048] 525 / 102 / 217 / 110.  Where
#: 64 columns of all rows pass the bound, blocks of fewer rows (the columns outer, so a block
#: of W^T is read once): whole / best blocks (rows x columns): [64, 512] @ [512, 2048] 1722 /
#: 1222 (16 x 64); [64, 2048] @ [2048, 512] 1451 / 1374 (4 x 64); [64, 512] @ [512, 1536] 1062 /
#: 892 (4 x 128, 895 at 16 x 64); [64, 1536] @ [1536, 512] 1072 / 929 (8 x 64); [64, 512] @
#: [512, 512] 343 / 293; [256, 128] @ [128, 512] 333 / 296 (32 x 64); [256, 512] @ [512, 128]
#: 330 / 292 (8 x 64); [256, 128] @ [128, 384] 249 / 221 (64 x 64); [32, 1024] @ [1024, 256]
#: 187 / 145 (8 x 64); [16, 2048] @ [2048, 512] 515 / 345 (4 x 64), where blocks of 8 x 32 took
#: 458 and of 16 rows and 16 columns 1011.  Past 32 blocks of 4 rows the whole product won
#: (``benchmarks/small_gemm_grid.py --threads 1``, whole / 4 x 64: [256, 2048] @ [2048, 512]
#: 5383 / 5872, [256, 2048] @ [2048, 2048] 22486 / 36077), where 32 blocks won but at that
#: depth ([256, 1536] @ [1536, 512] 4143 / 3715, [256, 1024] @ [1024, 256] 1349 / 1187;
#: [128, 2048] @ [2048, 512] 2953 / 2709 in one run, 2759 / 3185 in another): at most 32 row
#: blocks.  (Of 8 rows, 64 blocks still won: [512, 1024] @ [1024, 256] 2609 / 2359; not taken,
#: to keep one bound.)
SMALL_GEMM_RULES = {("SkylakeX", "znver4"): (1 << 62, 64, 64, 4, 16, 32),
                    ("SkylakeX", None): (4096, 16, 1 << 30, 0, 1 << 30, 1 << 30)}
#: M*N*K up to which OpenBLAS takes its small-matrix kernels
SMALL_GEMM_MNK = 100 ** 3
#: a rule that never cuts
NO_CUT = (0, 16, 1 << 30, 0, 0, 1 << 30)


def small_gemm_rule(core, host_cpu):
    """The cut rule (``SMALL_GEMM_RULES``) for OpenBLAS core ``core`` on the CPU LLVM names
    ``host_cpu``: that CPU's own, else its core's, else ``NO_CUT``."""
    return SMALL_GEMM_RULES.get((core, host_cpu), SMALL_GEMM_RULES.get((core, None), NO_CUT))


def host_cpu():
    """LLVM's name of the CPU this process runs on (``"znver4"``, ``"sapphirerapids"``, ...):
    the second key of ``SMALL_GEMM_RULES``."""
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_name()


#: This machine's rule: by the core NumPy's OpenBLAS runs and the CPU under it
SMALL_GEMM_RULE = small_gemm_rule(_BLAS.core if _BLAS is not None else None, host_cpu())


@numba.njit(cache=True)
def small_gemm_blocks(M, N, K, rule, one_thread):
    """``(rows, columns)`` per call of a float32 product [M, K] @ [K, N] under ``rule``
    (``SMALL_GEMM_RULES``): ``(M, N)``, one call, within the small-matrix kernels' bound or where
    the rule does not cut; else blocks within it.  Rows are split only where OpenBLAS runs
    ``one_thread``: its small-matrix kernels run on one, and blocks of fewer rows lost to the
    whole threaded product at two (Zen 4, 2 threads, us, whole / best blocks: [64, 512] @
    [512, 2048] 872 / 1265; [256, 128] @ [128, 512] 212 / 301; [32, 1024] @ [1024, 256] 117 /
    157).  At two threads the whole products of 32 rows won inside the time loops too (Zen 4,
    ms per forward, whole / blocks of 64 columns: LSTM (100, 32, 256, 256) 31.1 / 34.8, GRU 19.6
    / 24.0), those of 16 and 8 rows lost (LSTM (100, 16, 256, 256) 18.6 / 15.2, (100, 8, 512,
    512) 44.7 / 31.5; GRU (100, 16, 256, 256) 15.6 / 13.5): ``most rows threaded``."""
    max_mk, unit, most, least_rows, threaded_rows, most_row_blocks = rule
    if M * N * K <= SMALL_GEMM_MNK or M * K > max_mk or (M > threaded_rows and not one_thread):
        return M, N
    rows = M
    if least_rows > 0:
        fit = SMALL_GEMM_MNK // (min(most, N) * K)  # rows a block of the widest columns holds
        power = 1
        while power * 2 <= fit:
            power *= 2
        if power < least_rows or (M > power and not one_thread) or M > power * most_row_blocks:
            return M, N
        rows = min(M, power)
    cols = min(SMALL_GEMM_MNK // (rows * K) // unit * unit, most)
    if cols < unit:
        return M, N
    return rows, min(cols, N)


_operand_layout = numba.njit(inline="always")(operand_layout)


@numba.njit(inline="always")
def _operand(x):
    """(CBLAS transpose flag, leading dimension) of a 2-D operand with unit stride on one axis,
    or (-1, 0)."""
    rows, cols = x.shape
    transposed, ld = _operand_layout(rows, cols, x.strides[0], x.strides[1], x.itemsize)
    if transposed < 0:
        return -1, 0
    return (_TRANS if transposed else _NO_TRANS), ld


@numba.njit(cache=True)
def sgemm_blocks(a, b, out, rows, cols):
    """``out = a @ b`` in float32 by one ``cblas_sgemm`` per block of ``rows`` x ``cols`` of
    ``out`` (the last ones shorter), the columns outer, so that a block of ``b`` is read once:
    what ``_make_matmul`` runs with ``small_gemm_blocks``' sizes, and what
    ``benchmarks/small_gemm_grid.py`` times to measure a rule.  Operands as ``_make_matmul``
    takes them, their shapes checked there."""
    ta, lda = _operand(a)
    tb, ldb = _operand(b)
    _sgemm_blocks(a, ta, lda, b, tb, ldb, out, _operand(out)[1], rows, cols)


@numba.njit(inline="always")
def _sgemm_blocks(a, ta, lda, b, tb, ldb, out, ldo, rows, cols):
    """``sgemm_blocks`` with the operands' CBLAS layouts (``_operand``) given."""
    M, K = a.shape
    N = b.shape[1]
    item = 4
    a_step = lda * item if ta == _NO_TRANS else item  # row i of a: i steps on
    b_step = item if tb == _NO_TRANS else ldb * item  # column j of b: j steps on
    one, zero = np.float32(1), np.float32(0)
    for j in range(0, N, cols):
        for i in range(0, M, rows):
            _sgemm(_ROW_MAJOR, ta, tb, min(rows, M - i), min(cols, N - j), K, one,
                   a.ctypes.data + i * a_step, lda, b.ctypes.data + j * b_step, ldb, zero,
                   out.ctypes.data + (i * ldo + j) * item, ldo)


@numba.njit(cache=True)
def _gemv_missing(order, trans, M, N, alpha, a, lda, x, incx, beta, y, incy):
    pass  # never called: ``_make_matmul`` takes the GEMM path where the BLAS has no GEMV


def _make_matmul(dtype, rule=None):
    """A jitted ``matmul(a, b, out)``: ``out = a @ b`` by one ``cblas_?gemm`` call; for a
    product of one row, by one ``cblas_?gemv`` call; for a float32 product of more, one call
    per block small enough for OpenBLAS's small-matrix kernels (``small_gemm_blocks`` under
    ``rule``; None: this machine's, ``SMALL_GEMM_RULE``).

    One row (a streamed step, or a batch of one) goes to GEMV: OpenBLAS's GEMM of one row took
    up to 9x its GEMV (Zen 4, one thread, float32, us per product [1, K] @ [K, N], ``W^T``
    C-contiguous, GEMM / GEMV: K, N = 128, 512: 4.35 / 2.61; 512, 128: 2.95 / 2.35; 128, 384:
    2.35 / 1.94; 256, 1024: 32.1 / 12.2; 1024, 256: 14.4 / 12.9; 512, 2048: 466 / 52).

    a [M, K], b [K, N], out [M, N] (unit stride along rows); ``a`` and ``b`` may be transposed
    views (unit stride along the first axis), as ``w.T`` is.
    """
    dtype = np.dtype(dtype)
    single = dtype == np.float32
    one, zero = dtype.type(1), dtype.type(0)
    rule = SMALL_GEMM_RULE if rule is None else tuple(rule)
    blas_threads = _blas_threads if _blas_threads is not None else _blas_threads_unknown
    gemv = _sgemv if single else _dgemv
    by_gemv = gemv is not None
    gemv = gemv if by_gemv else _gemv_missing
    # The symbol in the message also puts it in the cache key: another BLAS build recompiles.
    error = f"matmul by {_BLAS.gemm[0 if single else 1]}: shapes must " \
            "be a [M, K], b [K, N], out [M, N], each with unit stride along one axis"

    @numba.njit(cache=True)
    def matmul(a, b, out):
        M, K = a.shape
        N = b.shape[1]
        ta, lda = _operand(a)
        tb, ldb = _operand(b)
        to, ldo = _operand(out)
        if b.shape[0] != K or out.shape[0] != M or out.shape[1] != N or ta < 0 or tb < 0 \
                or to != _NO_TRANS:
            raise ValueError(error)
        if M == 0 or N == 0:
            return
        if K == 0:
            out[...] = zero
            return
        if M == 1 and by_gemv:  # out[0] = b^T a[0]
            incx = 1 if ta == _NO_TRANS else lda  # a's one row: contiguous, or a column
            if tb == _NO_TRANS:  # b [K, N], its rows contiguous
                gemv(_ROW_MAJOR, _TRANS, K, N, one, b.ctypes.data, ldb, a.ctypes.data, incx,
                     zero, out.ctypes.data, 1)
            else:  # b = w^T, w [N, K] with its rows contiguous
                gemv(_ROW_MAJOR, _NO_TRANS, N, K, one, b.ctypes.data, ldb, a.ctypes.data, incx,
                     zero, out.ctypes.data, 1)
        elif single:
            rows, cols = small_gemm_blocks(M, N, K, rule, blas_threads() == 1)
            _sgemm_blocks(a, ta, lda, b, tb, ldb, out, ldo, rows, cols)
        else:
            _dgemm(_ROW_MAJOR, ta, tb, M, N, K, one, a.ctypes.data, lda, b.ctypes.data, ldb,
                   zero, out.ctypes.data, ldo)

    return matmul


#: Square tile of ``transpose_into`` (16 and 32 measured alike, 8 slower)
_TRANSPOSE_TILE = 32


@numba.njit(cache=True)
def transpose_into(src, dst):
    """``dst[...] = src.T`` for ``src`` [R, C] and a C-contiguous ``dst`` [C, R], by square
    tiles: each row of ``dst`` written in runs, ``src`` read down its columns within a tile.
    NumPy's strided copy of a transposed view is far slower once the matrix leaves the caches:
    on an Intel Xeon (family 6, model 167), float32, 1 MiB took 304 us against 175, 4 MiB
    7740 us against 1151, 16 MiB 26786 us against 5565 (below 256 KiB NumPy's is as fast:
    ``CPUBackend.transpose_into`` chooses)."""
    R, C = src.shape
    for j0 in range(0, C, _TRANSPOSE_TILE):
        for i0 in range(0, R, _TRANSPOSE_TILE):
            for j in range(j0, min(j0 + _TRANSPOSE_TILE, C)):
                for i in range(i0, min(i0 + _TRANSPOSE_TILE, R)):
                    dst[j, i] = src[i, j]


def make_cpu_loops(dtype, kernels):
    """``kernels/loops.py``'s loops compiled for the CPU: ``{loop name: jitted loop}``, or None
    where NumPy's BLAS was not found (the drivers then run the loops as Python)."""
    if _BLAS is None:
        return None
    name = np.dtype(dtype).name
    matmul = _make_matmul(dtype)
    _stable_cache_keys(matmul, f"{name}.matmul")
    slots = numba.njit(cache=True)(time_slots)
    _stable_cache_keys(slots, "time_slots")
    loops = {}
    for loop_name, fn in make_loops(matmul, kernels, slots).items():
        loops[loop_name] = numba.njit(cache=True)(fn)
        _stable_cache_keys(loops[loop_name], f"{name}.{loop_name}")
    return loops


def _stable_cache_keys(obj, tag):
    """Give dispatcher ``obj`` a UUID derived from ``tag``, and every dispatcher and intrinsic
    its code refers to (closure cells and globals) one derived from where it is.

    The pickled closure (Numba's cache key) then no longer changes from process to process.
    Uses Numba's private ``_set_uuid``; where it is missing the cache only misses.
    """
    set_uuid = getattr(obj, "_set_uuid", None)
    if set_uuid is None:
        return
    try:
        set_uuid(f"gpurnn.{tag}")
    except AssertionError:  # already has one (it was pickled before): nothing to change
        return
    fn = getattr(obj, "py_func", None)
    if fn is None:  # an intrinsic: its code is Numba's typing, nothing to follow
        return
    refs = inspect.getclosurevars(fn)
    for name, inner in refs.nonlocals.items():
        _stable_cache_keys(inner, f"{tag}.{name}")
    for name, inner in refs.globals.items():
        _stable_cache_keys(inner, f"{fn.__module__}.{name}")
