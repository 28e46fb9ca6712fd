"""CUDA step kernels: one thread per ``(b, j)`` element of one time step.

Each step kernel is a named function with the parameters of its table in
``kernels/signatures.py``; its body is an element function (``*_elem``, one ``(b, j)``: loads,
the cell's scalar math from ``kernels/cell_math.py``, stores, the length mask), which the
persistent kernels (``kernels/persistent.py``) call too.  The element functions are CUDA device
functions; under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) they and the kernels run as
Python in simulated threads, and the scalar math they call is the same compiled function the
CPU kernels use.

Launch: a 2-D grid, x over hidden units (``THREADS`` per block, coalesced along a row),
y over batch rows.

Three ways to launch (``LAUNCH_MODES``; see docs/gpu.md for what each costs and what is
tested where):

* ``"lazy"``: ``cuda.jit(fn)``; every launch types its arguments and looks the compiled
  kernel up by type (Numba's dispatch).  The only mode under the simulator.
* ``"eager"`` (default on a GPU): compiled once at build time with the signature of its table;
  the dispatcher is specialised, so a launch skips type dispatch.  Numba still converts every
  CuPy argument through ``__cuda_array_interface__``, and because CuPy exports its current
  stream there, Numba synchronises the host with that stream once per array argument when
  ``NUMBA_CUDA_ARRAY_INTERFACE_SYNC=1`` (its default).  That sync is redundant here (the
  kernels run on the very stream CuPy uses), but it is Numba's process-wide setting, so it is
  left to the user; ``"fast"`` avoids it.
* ``"fast"``: the eagerly compiled kernel launched by ``cuda.core.launch`` with arguments
  packed here (``pack_args``) straight from the CuPy arrays: no dispatch, no
  ``__cuda_array_interface__`` conversion, so no stream sync.
"""
import ctypes
import functools

import numba
import numpy as np
from numba import cuda

from . import signatures as sig
from .cell_math import make_cell_math
from .storage import make_storage

THREADS = 128
LAUNCH_MODES = ("lazy", "eager", "fast")


def _device(fn):
    return cuda.jit(device=True, inline="always")(fn)


@functools.lru_cache(maxsize=None)
def element_functions(dtype):
    """The element function of every step kernel for layers of ``dtype``, as CUDA device
    functions: ``{kernel name: elem(b, j, *kernel parameters after (B, H))}``.  Shapes as in
    ``kernels/signatures.py``; ``STORED`` arrays are read through ``load`` and written through
    ``store`` (``kernels/storage.py``: the identity unless 16-bit)."""
    s = make_storage(dtype)
    m = make_cell_math(s.compute_dtype)
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

    @_device
    def preactivation(xg, hg, b_ih, b_hh, b, k, H, j):
        """x W_ih^T + h W_hh^T + b_ih + b_hh of gate block ``k``, unit ``j``, row ``b``."""
        col = k * H + j
        return xg[b, col] + hg[b, col] + (b_ih[col] + b_hh[col])

    # ------------------------------------------------------------------------------- RNN
    @_device
    def rnn_forward_elem(b, j, H, y, h_new, xg, hg, b_ih, b_hh, h_prev, lengths, t, relu):
        if t < lengths[b]:
            h = store(rnn_forward(preactivation(xg, hg, b_ih, b_hh, b, 0, H, j), relu))
            h_new[b, j] = h
            y[b, j] = h
        else:
            h_new[b, j] = h_prev[b, j]
            y[b, j] = zero

    @_device
    def rnn_backward_elem(b, j, H, dg, dh_carry, dy, dh_rec, h, lengths, t, relu):
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            dg[b, j] = store(rnn_backward(dh + load(dy[b, j]), load(h[b, j]), relu))
            dh_carry[b, j] = fzero
        else:
            dg[b, j] = zero
            dh_carry[b, j] = dh

    # ------------------------------------------------------------------------------ LSTM
    @_device
    def lstm_forward_elem(b, j, H, y, h_new, c_new, c_saved, gates, xg, hg, b_ih, b_hh, h_prev,
                          c_prev, lengths, t, save):
        if t < lengths[b]:
            i, f, g, o, c, h = lstm_forward(
                preactivation(xg, hg, b_ih, b_hh, b, 0, H, j),
                preactivation(xg, hg, b_ih, b_hh, b, 1, H, j),
                preactivation(xg, hg, b_ih, b_hh, b, 2, H, j),
                preactivation(xg, hg, b_ih, b_hh, b, 3, H, j), c_prev[b, j])
            if save:
                gates[b, j] = store(i)
                gates[b, H + j] = store(f)
                gates[b, 2 * H + j] = store(g)
                gates[b, 3 * H + j] = store(o)
            c_new[b, j] = c
            c_saved[b, j] = store(c)
            h = store(h)
            h_new[b, j] = h
            y[b, j] = h
        else:
            c = c_prev[b, j]
            c_new[b, j] = c
            c_saved[b, j] = store(c)
            h_new[b, j] = h_prev[b, j]
            y[b, j] = zero

    @_device
    def lstm_backward_elem(b, j, H, dg, dh_carry, dc, dy, dh_rec, gates, c, c_prev, h, h0,
                           lengths, t):
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            dai, daf, dag, dao, dc_prev, h_t = lstm_backward(
                dh + load(dy[b, j]), dc[b, j], load(gates[b, j]), load(gates[b, H + j]),
                load(gates[b, 2 * H + j]), load(gates[b, 3 * H + j]), load(c[b, j]),
                load(c_prev[b, j]))
            dg[b, j] = store(dai)
            dg[b, H + j] = store(daf)
            dg[b, 2 * H + j] = store(dag)
            dg[b, 3 * H + j] = store(dao)
            dc[b, j] = dc_prev
            dh_carry[b, j] = fzero
            h[b, j] = store(h_t)
        else:
            for k in range(4):
                dg[b, k * H + j] = zero
            dh_carry[b, j] = dh
            h[b, j] = h0[b, j]

    # ------------------------------------------------------ GRU, reset after the product
    @_device
    def gru_reset_after_forward_elem(b, j, H, y, h_new, gates, xg, hg, b_ih, b_hh, h_prev,
                                     lengths, t, save):
        if t < lengths[b]:
            hn = hg[b, 2 * H + j] + b_hh[2 * H + j]
            r, z, n, h = gru_reset_after_forward(
                preactivation(xg, hg, b_ih, b_hh, b, 0, H, j),
                preactivation(xg, hg, b_ih, b_hh, b, 1, H, j),
                xg[b, 2 * H + j] + b_ih[2 * H + j], hn, load(h_prev[b, j]))
            if save:
                gates[b, j] = store(r)
                gates[b, H + j] = store(z)
                gates[b, 2 * H + j] = store(n)
                gates[b, 3 * H + j] = store(hn)
            h = store(h)
            h_new[b, j] = h
            y[b, j] = h
        else:
            h_new[b, j] = h_prev[b, j]
            y[b, j] = zero

    @_device
    def gru_reset_after_backward_elem(b, j, H, dgx, dgh, dh_carry, dy, dh_rec, gates, h_prev,
                                      lengths, t):
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            dar, daz, dxn, dhn, dh_prev = gru_reset_after_backward(
                dh + load(dy[b, j]), load(gates[b, j]), load(gates[b, H + j]),
                load(gates[b, 2 * H + j]), load(gates[b, 3 * H + j]), load(h_prev[b, j]))
            dar, daz = store(dar), store(daz)
            dgx[b, j] = dar
            dgx[b, H + j] = daz
            dgx[b, 2 * H + j] = store(dxn)
            dgh[b, j] = dar
            dgh[b, H + j] = daz
            dgh[b, 2 * H + j] = store(dhn)
            dh_carry[b, j] = dh_prev
        else:
            for k in range(3):
                dgx[b, k * H + j] = zero
                dgh[b, k * H + j] = zero
            dh_carry[b, j] = dh

    # ----------------------------------------------------- GRU, reset before the product
    @_device
    def gru_reset_before_gates_elem(b, j, H, gates, xg, hg_rz, b_ih, b_hh, h_prev):
        r, z, rh = gru_reset_before_gates(preactivation(xg, hg_rz, b_ih, b_hh, b, 0, H, j),
                                          preactivation(xg, hg_rz, b_ih, b_hh, b, 1, H, j),
                                          load(h_prev[b, j]))
        gates[b, j] = store(r)
        gates[b, H + j] = store(z)
        gates[b, 3 * H + j] = store(rh)

    @_device
    def gru_reset_before_candidate_elem(b, j, H, y, h_new, gates, xg, hg_n, b_ih, b_hh, h_prev,
                                        lengths, t):
        if t < lengths[b]:
            col = 2 * H + j
            n, h = gru_reset_before_candidate(xg[b, col] + hg_n[b, j] + (b_ih[col] + b_hh[col]),
                                              load(gates[b, H + j]), load(h_prev[b, j]))
            gates[b, col] = store(n)
            h = store(h)
            h_new[b, j] = h
            y[b, j] = h
        else:
            h_new[b, j] = h_prev[b, j]
            y[b, j] = zero

    @_device
    def gru_reset_before_candidate_backward_elem(b, j, H, dg, dh_carry, dy, dh_rec, gates,
                                                 h_prev, lengths, t):
        dh = dh_carry[b, j] + dh_rec[b, j]
        if t < lengths[b]:
            daz, dan, dh_prev = gru_reset_before_candidate_backward(
                dh + load(dy[b, j]), load(gates[b, H + j]), load(gates[b, 2 * H + j]),
                load(h_prev[b, j]))
            dg[b, H + j] = store(daz)
            dg[b, 2 * H + j] = store(dan)
            dh_carry[b, j] = dh_prev
        else:
            dg[b, H + j] = zero
            dg[b, 2 * H + j] = zero
            dh_carry[b, j] = dh

    @_device
    def gru_reset_before_gates_backward_elem(b, j, H, dg, dh_carry, drh, gates, h_prev, lengths,
                                             t):
        if t < lengths[b]:
            dar, dh_prev = gru_reset_before_gates_backward(drh[b, j], load(gates[b, j]),
                                                           load(h_prev[b, j]))
            dg[b, j] = store(dar)
            dh_carry[b, j] += dh_prev
        else:
            dg[b, j] = zero

    dropout = m.dropout

    @_device
    def dropout_mask_elem(b, j, H, mask, seed, offset, p, scale):
        mask[b, j] = store(dropout(seed, offset + b * H + j, p, scale))

    return {"dropout_mask": dropout_mask_elem,
            "rnn_forward_step": rnn_forward_elem, "rnn_backward_step": rnn_backward_elem,
            "lstm_forward_step": lstm_forward_elem, "lstm_backward_step": lstm_backward_elem,
            "gru_reset_after_forward_step": gru_reset_after_forward_elem,
            "gru_reset_after_backward_step": gru_reset_after_backward_elem,
            "gru_reset_before_gates_step": gru_reset_before_gates_elem,
            "gru_reset_before_candidate_step": gru_reset_before_candidate_elem,
            "gru_reset_before_candidate_backward_step": gru_reset_before_candidate_backward_elem,
            "gru_reset_before_gates_backward_step": gru_reset_before_gates_backward_elem}


def make_cuda_python_kernels(dtype):
    """``{kernel name: kernel}`` as plain Python functions, not yet jitted (``cuda.jit`` and
    ``compile_ptx`` take these); each one thread per ``(b, j)`` calling its element function."""
    e = element_functions(dtype)
    dropout_mask_elem = e["dropout_mask"]
    rnn_forward_elem = e["rnn_forward_step"]
    rnn_backward_elem = e["rnn_backward_step"]
    lstm_forward_elem = e["lstm_forward_step"]
    lstm_backward_elem = e["lstm_backward_step"]
    gru_reset_after_forward_elem = e["gru_reset_after_forward_step"]
    gru_reset_after_backward_elem = e["gru_reset_after_backward_step"]
    gru_reset_before_gates_elem = e["gru_reset_before_gates_step"]
    gru_reset_before_candidate_elem = e["gru_reset_before_candidate_step"]
    gru_reset_before_candidate_backward_elem = e["gru_reset_before_candidate_backward_step"]
    gru_reset_before_gates_backward_elem = e["gru_reset_before_gates_backward_step"]

    @sig.step_kernel(sig.DROPOUT_MASK)
    def dropout_mask(B, H, mask, seed, offset, p, scale):
        j, b = cuda.grid(2)
        if j < H and b < B:
            dropout_mask_elem(b, j, H, mask, seed, offset, p, scale)

    @sig.step_kernel(sig.RNN_FORWARD_STEP)
    def rnn_forward_step(B, H, y, h_new, xg, hg, b_ih, b_hh, h_prev, lengths, t, relu):
        j, b = cuda.grid(2)
        if j < H and b < B:
            rnn_forward_elem(b, j, H, y, h_new, xg, hg, b_ih, b_hh, h_prev, lengths, t, relu)

    @sig.step_kernel(sig.RNN_BACKWARD_STEP)
    def rnn_backward_step(B, H, dg, dh_carry, dy, dh_rec, h, lengths, t, relu):
        j, b = cuda.grid(2)
        if j < H and b < B:
            rnn_backward_elem(b, j, H, dg, dh_carry, dy, dh_rec, h, lengths, t, relu)

    @sig.step_kernel(sig.LSTM_FORWARD_STEP)
    def lstm_forward_step(B, H, y, h_new, c_new, c_saved, gates, xg, hg, b_ih, b_hh, h_prev,
                          c_prev, lengths, t, save):
        j, b = cuda.grid(2)
        if j < H and b < B:
            lstm_forward_elem(b, j, H, y, h_new, c_new, c_saved, gates, xg, hg, b_ih, b_hh,
                              h_prev, c_prev, lengths, t, save)

    @sig.step_kernel(sig.LSTM_BACKWARD_STEP)
    def lstm_backward_step(B, H, dg, dh_carry, dc, dy, dh_rec, gates, c, c_prev, h, h0, lengths,
                           t):
        j, b = cuda.grid(2)
        if j < H and b < B:
            lstm_backward_elem(b, j, H, dg, dh_carry, dc, dy, dh_rec, gates, c, c_prev, h, h0,
                               lengths, t)

    @sig.step_kernel(sig.GRU_RESET_AFTER_FORWARD_STEP)
    def gru_reset_after_forward_step(B, H, y, h_new, gates, xg, hg, b_ih, b_hh, h_prev,
                                     lengths, t, save):
        j, b = cuda.grid(2)
        if j < H and b < B:
            gru_reset_after_forward_elem(b, j, H, y, h_new, gates, xg, hg, b_ih, b_hh, h_prev,
                                         lengths, t, save)

    @sig.step_kernel(sig.GRU_RESET_AFTER_BACKWARD_STEP)
    def gru_reset_after_backward_step(B, H, dgx, dgh, dh_carry, dy, dh_rec, gates, h_prev,
                                      lengths, t):
        j, b = cuda.grid(2)
        if j < H and b < B:
            gru_reset_after_backward_elem(b, j, H, dgx, dgh, dh_carry, dy, dh_rec, gates, h_prev,
                                          lengths, t)

    @sig.step_kernel(sig.GRU_RESET_BEFORE_GATES_STEP)
    def gru_reset_before_gates_step(B, H, gates, xg, hg_rz, b_ih, b_hh, h_prev):
        j, b = cuda.grid(2)
        if j < H and b < B:
            gru_reset_before_gates_elem(b, j, H, gates, xg, hg_rz, b_ih, b_hh, h_prev)

    @sig.step_kernel(sig.GRU_RESET_BEFORE_CANDIDATE_STEP)
    def gru_reset_before_candidate_step(B, H, y, h_new, gates, xg, hg_n, b_ih, b_hh, h_prev,
                                        lengths, t):
        j, b = cuda.grid(2)
        if j < H and b < B:
            gru_reset_before_candidate_elem(b, j, H, y, h_new, gates, xg, hg_n, b_ih, b_hh,
                                            h_prev, lengths, t)

    @sig.step_kernel(sig.GRU_RESET_BEFORE_CANDIDATE_BACKWARD_STEP)
    def gru_reset_before_candidate_backward_step(B, H, dg, dh_carry, dy, dh_rec, gates, h_prev,
                                                 lengths, t):
        j, b = cuda.grid(2)
        if j < H and b < B:
            gru_reset_before_candidate_backward_elem(b, j, H, dg, dh_carry, dy, dh_rec, gates,
                                                     h_prev, lengths, t)

    @sig.step_kernel(sig.GRU_RESET_BEFORE_GATES_BACKWARD_STEP)
    def gru_reset_before_gates_backward_step(B, H, dg, dh_carry, drh, gates, h_prev, lengths,
                                             t):
        j, b = cuda.grid(2)
        if j < H and b < B:
            gru_reset_before_gates_backward_elem(b, j, H, dg, dh_carry, drh, gates, h_prev,
                                                 lengths, t)

    return {fn.__name__: fn for fn in (
        dropout_mask, rnn_forward_step, rnn_backward_step, lstm_forward_step, lstm_backward_step,
        gru_reset_after_forward_step, gru_reset_after_backward_step,
        gru_reset_before_gates_step, gru_reset_before_candidate_step,
        gru_reset_before_candidate_backward_step, gru_reset_before_gates_backward_step)}


def kernel_signature(name, dtype):
    """Numba signature of step kernel ``name`` for ``dtype`` (eager compilation, PTX)."""
    return sig.numba_signature(sig.STEP_KERNELS[name], dtype)


def make_cuda_kernels(dtype, launch="eager"):
    """``{kernel_name: launch(B, H, *args, stream=0)}`` for one dtype.

    ``launch`` is one of ``LAUNCH_MODES``; under the simulator every mode launches lazily
    (there is nothing to compile).  With ``"fast"``, ``stream`` must be a ``cuda.core`` stream
    (``numba.cuda.cudadrv.driver._to_core_stream`` of a Numba stream); otherwise a Numba stream.
    """
    if launch not in LAUNCH_MODES:
        raise ValueError(f"launch must be one of {LAUNCH_MODES}, got {launch!r}")
    return {name: make_launcher(fn, fn.params, dtype, launch)
            for name, fn in make_cuda_python_kernels(dtype).items()}


def step_launch_shape(B, H):
    """(grid, block) of a step kernel: x over hidden units, whole warps, no more than needed for
    a small H (fewer idle threads, and far fewer Python threads under the simulator); y over
    batch rows."""
    threads = min(THREADS, (H + 31) // 32 * 32)
    return ((H + threads - 1) // threads, B), (threads, 1)


def make_launcher(fn, params, dtype, launch, shape=step_launch_shape):
    """``launch(B, H, *args, stream)`` of kernel ``fn`` (its parameters ``params``, the first
    two ``B`` and ``H``) for ``dtype``, in launch mode ``launch`` (lazy under the simulator),
    on the grid ``shape(B, H)`` gives."""
    if cuda.config.ENABLE_CUDASIM or launch == "lazy":
        return _launcher(cuda.jit(fn), shape)
    signature = sig.numba_signature(params, dtype)
    kernel = cuda.jit(signature)(fn)  # compiles now, for the current device
    return _launcher(kernel, shape) if launch == "eager" else _FastLauncher(kernel, signature,
                                                                           shape)


def _launcher(kernel, shape):
    def launch(B, H, *args, stream=0):
        grid, block = shape(B, H)
        kernel[grid, block, stream](B, H, *args)

    return launch


def fast_launch_unavailable():
    """``None`` when this numba-cuda has what the ``"fast"`` mode uses (``cuda.core.launch``
    and ``driver._to_core_stream``, numba-cuda 0.2x), else why not."""
    try:
        from cuda.core import LaunchConfig, launch  # noqa: F401
        from numba.cuda.cudadrv.driver import _to_core_stream  # noqa: F401
    except ImportError as exc:
        import numba_cuda

        return f"numba-cuda {numba_cuda.__version__} lacks the cuda.core launch path ({exc})"
    return None


def add_one(a):
    """CUDA kernel ``a[i] += 1`` for every ``i``; ``a``: a contiguous float array.  Compiled and
    launched by ``kernels_run_here`` to prove that this numba-cuda can compile for and launch
    on the GPU."""
    i = cuda.grid(1)
    if i < a.size:
        a[i] += np.float32(1)  # float32 + float32 stays float32, float64 + float32 float64


def kernels_run_here():
    """Compile ``add_one``, launch it on 64 elements and check the result: raises whatever
    numba-cuda raises when it cannot (a numba-cuda that imports but fails at its first compile,
    such as numba-cuda 0.30 under NumPy 2.5, which lacks ``np.row_stack``; PTX newer than the
    driver); ``RuntimeError`` when the kernel ran but computed something else."""
    kernel = cuda.jit("void(float32[::1])")(add_one)
    a = cuda.to_device(np.zeros(64, np.float32))  # [64]
    kernel[1, 64](a)
    got = a.copy_to_host()
    if not np.array_equal(got, np.ones(64, np.float32)):
        raise RuntimeError(f"a test kernel ran but returned {got[:4]}... instead of ones")


def pack_args(sig, args):
    """The flat kernel parameters Numba's ABI expects for ``args`` typed by ``sig``.

    An array of ``ndim`` dims becomes ``meminfo, parent, nitems, itemsize, data, *shape,
    *strides`` (Numba's array model, as ``numba.cuda.dispatcher._Kernel._prepare_args`` packs
    it); an int64 a ``ctypes.c_int64``, a float32 or float64 a ``ctypes.c_float`` or
    ``ctypes.c_double``.  Arrays are CuPy arrays (``.data.ptr``); each one is
    checked against the signature, since a mismatched array would be read wrongly, not refused.
    """
    if len(args) != len(sig):
        raise TypeError(f"kernel takes {len(sig)} arguments, got {len(args)}")
    out = []
    for i, (ty, a) in enumerate(zip(sig, args)):
        if isinstance(ty, numba.types.Array):
            want = np.dtype(str(ty.dtype))
            if a.dtype != want or a.ndim != ty.ndim or not a.flags.c_contiguous:
                raise TypeError(
                    f"kernel argument {i}: expected a C-contiguous {ty.ndim}-D {want} array, "
                    f"got {a.ndim}-D {a.dtype} (C-contiguous: {a.flags.c_contiguous})")
            out += [0, 0, a.size, a.itemsize, a.data.ptr, *a.shape, *a.strides]
        elif ty == numba.int64:
            out.append(ctypes.c_int64(a))
        elif ty == numba.float32:
            out.append(ctypes.c_float(a))
        elif ty == numba.float64:
            out.append(ctypes.c_double(a))
        else:
            raise TypeError(f"kernel argument {i}: unsupported parameter type {ty}")
    return out


class _FastLauncher:
    """Launch one eagerly compiled kernel through ``cuda.core.launch`` (mode ``"fast"``)."""

    def __init__(self, dispatcher, sig, shape):
        self._kernel = next(iter(dispatcher.overloads.values()))
        self._sig = sig
        self._shape = shape
        self._cufunc = None  # loaded on first launch, on the device current then
        self._configs = {}

    def __call__(self, B, H, *args, stream):
        from cuda.core import LaunchConfig, launch

        if self._cufunc is None:
            self._cufunc = self._kernel._codelibrary.get_cufunc()
        grid, block = self._shape(B, H)
        config = self._configs.get((grid, block))  # one grid can go with several blocks
        if config is None:
            config = self._configs[grid, block] = LaunchConfig(grid=grid, block=block)
        launch(stream, config, self._cufunc.kernel, *pack_args(self._sig, (B, H) + args))
