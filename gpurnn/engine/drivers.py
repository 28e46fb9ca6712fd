"""Drivers: one forward and one backward per cell, for one direction of one layer.

Written once against the backend interface (``gpurnn/backend.py``), so the CPU and the CUDA
backends run the same code.  Around the time loops (``kernels/loops.py``: per step the
recurrent GEMM(s) and the fused step kernel(s)) they run one GEMM for the input projection of
all steps, and whole-sequence GEMMs for the weight gradients.  Time slots of the states:
``kernels/loops.py``.

What the forward keeps for the backward (the ``Tape``):

* ``x``      [T, B, I]   the input (for ``dW_ih``)
* ``hs``     [T+1, B, H] the hidden states (for ``dW_hh`` and the gate derivatives); None for
                          the LSTM: its backward loop rebuilds them (``kernels/loops.py``)
* ``h0``     [B, H]      the LSTM's initial state, where the rebuilt states start (None for the
                          others)
* ``cs``     [T+1, B, H] the LSTM cell states
* ``gates``  [T, B, S*H] post-activation gates: LSTM i, f, g, o (S=4; ``tanh(c)`` recomputed
                          from ``c``); GRU r, z, n and ``W_hn h + b_hn`` (reset after) or
                          ``r * h`` (reset before) (S=4); none (RNN)
* ``lengths`` [B] int32  valid steps of each sequence

The LSTM's tape is then 5H values per row and step (cuDNN's LSTM reserve space: 5H + 10 at
(T, B, H) = (100, 64, 512), BENCHMARKS.md): the backward pays one tanh per element and step and
a [T+1, B, H] buffer shared by the stack (``scratch_buffers``) for 2H fewer values kept per
layer and direction.

Precision.  The tape (``x``, ``hs``, ``h0``, ``cs``, ``gates``), ``y``, the weights
``W_ih``/``W_hh`` and the pre-activation gradients (the GEMMs' operands) have the layer's
dtype; what the GEMMs produce (``xg``, ``hg``, ``dh_rec``, the weight gradients), the biases
and the carried gradients have the compute dtype (``kernels/storage.py``): the same dtype for
float32 and float64, float32 for float16 and bfloat16.  A 16-bit LSTM runs its cell state in float32
(``c_carry``) and keeps it rounded in ``cs`` for the backward.  ``backend.matmul`` accumulates
in the compute dtype.
"""
import functools
from dataclasses import dataclass
from typing import Any, Optional

from ..kernels.loops import make_loops, time_slots
from ..kernels.storage import compute_dtype


@dataclass(frozen=True)
class CellSpec:
    """Which cell: ``mode`` in rnn, lstm, gru; options that change the math."""

    mode: str
    relu: bool = False
    reset_after: bool = False

    @property
    def gates(self):
        """Gate blocks in the weight matrices (G)."""
        return {"rnn": 1, "lstm": 4, "gru": 3}[self.mode]

    @property
    def saved_gates(self):
        """Gate blocks saved per step for the backward."""
        return {"rnn": 0, "lstm": 4, "gru": 4}[self.mode]

    @property
    def has_cell_state(self):
        return self.mode == "lstm"


@dataclass
class Weights:
    """One direction of one layer.  w_ih [G*H, I], w_hh [G*H, H] (the layer's dtype), b_ih
    [G*H], b_hh [G*H] (the compute dtype)."""

    w_ih: Any
    w_hh: Any
    b_ih: Any
    b_hh: Any


@dataclass
class Tape:
    x: Any
    hs: Any
    cs: Optional[Any]
    gates: Optional[Any]
    lengths: Any
    reverse: bool
    h_last: Any
    c_last: Optional[Any]
    h0: Optional[Any] = None


class Workspace:
    """One layer direction's buffers (its tape, its per-step and carried ones), allocated once
    per shape and reused by every later call of the same shape.  The large buffers that live
    within one forward or one backward are the backend's, shared by every layer and direction
    (``Backend.scratch``)."""

    def __init__(self, backend):
        self.backend = backend
        self._buffers = {}

    def get(self, name, shape, dtype):
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            buf = self.backend.buffer(tuple(map(int, shape)), dtype)
            self._buffers[name] = buf
        return buf

    def nbytes(self):
        return sum(int(b.nbytes) for b in self._buffers.values())


def _loops(be, dtype):
    """The backend's compiled loops when it has them (CPU), else the loops as Python."""
    compiled = getattr(be, "compiled_loops", None)
    loops = compiled(dtype) if compiled is not None else None
    return loops if loops is not None else make_loops(be.matmul, be.kernels(dtype), time_slots)


def _run_loop(be, dtype, name, args):
    """The time loop ``name`` over ``args``, through ``be.run_graph`` (a CUDA graph replay
    where graphs are on).  The loops are made inside the enqueued function, so that their
    kernels bind to the stream current then: the capturing one, during a capture."""
    be.run_graph(name, lambda: _loops(be, dtype)[name](*args), args)


def _loop_name(cell, direction):
    if cell.mode == "gru":
        return f"gru_reset_{'after' if cell.reset_after else 'before'}_{direction}"
    return f"{cell.mode}_{direction}"


def forward(be, cell, w, x, h0, c0, lengths, reverse, training, ws):
    """Run one direction over the sequence.

    x [T, B, I]; h0, c0 [B, H] (c0 None unless LSTM); lengths [B] int32 on the device.
    Returns ``y`` [T, B, H] (a fresh array; zero past each sequence's length) and the ``Tape``,
    whose ``h_last``/``c_last`` [B, H] are the states after each sequence's last valid step.
    """
    T, B, I = x.shape
    H = w.w_hh.shape[1]
    G = cell.gates
    dtype = x.dtype
    compute = compute_dtype(dtype)
    n_slots = T + 1 if training else 2

    # [T, B, G*H] x W_ih^T (the kernels add the biases); dead once the loop has run, so the
    # backward reuses this buffer for its pre-activation gradients, and every layer and
    # direction the same one (``Backend.scratch``)
    xg = be.scratch("preact", *scratch_buffers(cell, T, B, H, dtype, training)["preact"])
    be.matmul(x.reshape(T * B, I), w.w_ih.T, out=xg.reshape(T * B, G * H))
    graphed = be.graphs_active()
    if graphed:  # a replayed loop reads and writes the addresses it was captured with
        y = ws.get("y", (T, B, H), dtype)  # [T, B, H], copied out below
        staged = ws.get("lengths", lengths.shape, lengths.dtype)  # [B]
        staged[...] = lengths
        lengths = staged
    else:
        y = be.empty((T, B, H), dtype)  # [T, B, H]
    if training and cell.has_cell_state:  # read by the loop alone: the backward rebuilds it
        hs = be.scratch("states", *scratch_buffers(cell, T, B, H, dtype, training)["states"])
    else:
        hs = ws.get("hs", (n_slots, B, H), dtype)  # [T+1 or 2, B, H]
    first = time_slots(T, 0, reverse, training)[1]
    hs[first] = h0
    cs = gates = c_carry = None
    if cell.has_cell_state:
        cs = ws.get("cs", (n_slots, B, H), dtype)  # [T+1 or 2, B, H]
        cs[first] = c0
        if dtype != compute:
            c_carry = ws.get("c_carry", (2, B, H), compute)  # [2, B, H] the running c, float32
            c_carry[0] = c0
    if cell.saved_gates:
        gates = ws.get("gates", (T if training else 1, B, cell.saved_gates * H), dtype)
    hg = ws.get("hg", (B, G * H), compute)  # [B, G*H] recurrent product of one step

    w_hh_t = w.w_hh.T  # [H, G*H] W_hh^T: a view, or a C-contiguous copy where it pays
    if be.copies_transposed_weights(T * B):
        w_hh_t = ws.get("w_hh_t", (H, G * H), dtype)
        be.transpose_into(w.w_hh, w_hh_t)
    if not be.forward_sequence(cell, w, w_hh_t, xg, y, hs, cs, gates, hg, lengths, reverse,
                               training):
        _run_loop(be, dtype, _loop_name(cell, "forward"),
                  (y, hs, cs, gates, xg, hg, w_hh_t, w.b_ih, w.b_hh, lengths, reverse, training,
                   int(cell.relu), c_carry))

    last = time_slots(T, T - 1, reverse, training)[2]
    h_last = hs[last].copy()
    c_last = None
    if cs is not None:
        c_last = (cs[last] if c_carry is None else c_carry[T % 2]).copy()
    kept_h0 = None
    if training and cell.has_cell_state:  # the start of the backward's rebuilt states
        kept_h0 = ws.get("h0", (B, H), dtype)  # [B, H]
        kept_h0[...] = h0
    tape = Tape(x=x, hs=None if cell.has_cell_state else hs, cs=cs, gates=gates,
                lengths=lengths, reverse=reverse, h_last=h_last, c_last=c_last, h0=kept_h0)
    return (y.copy() if graphed else y), tape


def backward(be, cell, w, tape, dy, dh_last, dc_last, grads, ws):
    """BPTT through one direction, for the forward that produced ``tape`` (a training forward).

    dy [T, B, H] gradient of the output (ignored past each length); dh_last, dc_last [B, H]
    gradients of the final states (dc_last None unless LSTM).  Overwrites ``grads`` (a
    ``Weights`` of gradient arrays) and returns ``dx`` [T, B, I] (fresh), ``dh0``, ``dc0`` [B, H].
    """
    x, hs, cs, gates, lengths = tape.x, tape.hs, tape.cs, tape.gates, tape.lengths
    T, B, I = x.shape
    H = w.w_hh.shape[1]
    G = cell.gates
    dtype = x.dtype
    compute = compute_dtype(dtype)
    reverse = tape.reverse

    scratch = scratch_buffers(cell, T, B, H, dtype, True)  # the backward of a training forward
    if hs is None:  # the LSTM: the loop rebuilds the states [T+1, B, H], from h0
        hs = be.scratch("states", *scratch["states"])
        hs[time_slots(T, 0, reverse, True)[1]] = tape.h0
    # [T, B, G*H] pre-activation gradients (input path), in the forward's xg buffer (its
    # first half when they are 16-bit and xg float32)
    preact = be.scratch("preact", *scratch["preact"])
    dg = preact
    if dtype != compute:
        dg = preact.reshape(-1).view(dtype)[: T * B * G * H].reshape(T, B, G * H)
    dh_carry = ws.get("dh_carry", (B, H), compute)  # [B, H]
    dh_rec = ws.get("dh_rec", (B, H), compute)  # [B, H] dg_{t+1} @ W_hh
    dh_carry[...] = dh_last
    dh_rec[...] = 0
    dc = None
    if cell.has_cell_state:
        dc = ws.get("dc", (B, H), compute)  # [B, H]
        dc[...] = dc_last
    dgh = dg
    if cell.mode == "gru" and cell.reset_after:
        dgh = be.scratch("dgh", *scratch["dgh"])  # [T, B, 3H] recurrent path

    if be.graphs_active():  # a replayed loop reads the address it was captured with
        staged = ws.get("dy", (T, B, H), dtype)  # [T, B, H]
        staged[...] = dy
        dy = staged
    if not be.backward_sequence(cell, w, tape, hs, dg, dgh, dh_carry, dc, dy, dh_rec):
        _run_loop(be, dtype, _loop_name(cell, "backward"),
                  (dg, dgh, dh_carry, dc, dh_rec, dy, hs, cs, gates, w.w_hh, lengths, reverse,
                   int(cell.relu)))

    dh0 = dh_carry + dh_rec
    dc0 = dc.copy() if cell.has_cell_state else None

    # Whole-sequence GEMMs for the weight gradients; bias gradients as plain sums (no atomics).
    D = dg.reshape(T * B, G * H)
    Dh = dgh.reshape(T * B, G * H)
    h_prev = (hs[1:] if reverse else hs[:T]).reshape(T * B, H)  # [T*B, H] state before each step
    be.matmul(D.T, x.reshape(T * B, I), out=grads.w_ih)
    if cell.mode == "gru" and not cell.reset_after:
        rh = gates[:, :, 3 * H:].reshape(T * B, H)  # [T*B, H] r * h_prev, input of W_hn
        be.matmul(D[:, : 2 * H].T, h_prev, out=grads.w_hh[: 2 * H])
        be.matmul(D[:, 2 * H:].T, rh, out=grads.w_hh[2 * H:])
    else:
        be.matmul(Dh.T, h_prev, out=grads.w_hh)
    be.sum_rows(D, grads.b_ih)
    # The two paths' gradients differ only in the reset-after GRU's n block: sum that alone.
    same = 2 * H if dgh is not dg else G * H
    grads.b_hh[:same] = grads.b_ih[:same]
    if same < G * H:
        be.sum_rows(Dh[:, same:], grads.b_hh[same:])
    dx = be.empty((T, B, I), dtype)
    be.matmul(D, w.w_ih, out=dx.reshape(T * B, I))
    return dx, dh0, dc0


@functools.lru_cache(maxsize=64)  # asked on every call: a lookup, not a new table
def scratch_buffers(cell, T, B, H, dtype, training):
    """``{name: (shape, dtype)}`` of the backend's scratch buffers (``Backend.scratch``) that a
    forward (and, when ``training``, its backward) of ``cell`` over T steps of B rows takes for
    a layer of ``dtype``: ``preact`` [T, B, G*H] in the compute dtype (``x W_ih^T``, then the
    pre-activation gradients), the reset-after GRU's ``dgh`` [T, B, G*H] (its recurrent
    path's gradients, in ``dtype``), and the training LSTM's ``states`` [T+1, B, H] (``h`` of
    every step, in ``dtype``: the forward's, then the backward's rebuilt ones)."""
    shape = (T, B, cell.gates * H)
    buffers = {"preact": (shape, compute_dtype(dtype))}
    if training and cell.mode == "gru" and cell.reset_after:
        buffers["dgh"] = (shape, dtype)
    if training and cell.has_cell_state:
        buffers["states"] = ((T + 1, B, H), dtype)
    return buffers


def activation_bytes(cell, T, B, H, dtype):
    """Bytes the tape of one training forward holds per layer and direction, beside the input
    and the output, all in ``dtype``: ``hs`` [T+1, B, H] (the LSTM: ``cs`` [T+1, B, H] and
    ``h0`` [B, H] instead) and the saved gates [T, B, S*H]: S = 4 for the GRU and the LSTM,
    none for the RNN."""
    states = (T + 2 if cell.has_cell_state else T + 1) * B * H
    return int(dtype.itemsize) * (states + T * B * cell.saved_gates * H)
