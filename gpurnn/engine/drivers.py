"""Time-loop drivers: one forward and one backward per cell, for one direction of one layer.

Written once against the backend interface (``gpurnn/backend.py``), so the CPU and the CUDA
backends run the same loop.  Per step: one recurrent GEMM (two for the seed-form GRU), then one
fused step kernel (two for the seed-form GRU).  Around the loop: one GEMM for the input
projection of all steps, and whole-sequence GEMMs for the weight gradients.

Time runs ``t = 0..T-1`` (``T-1..0`` when ``reverse``).  States are stored by time: ``hs`` has
``T+1`` slots, the state before step ``t`` is ``hs[t]`` and after it ``hs[t+1]`` (swapped when
``reverse``: before ``hs[t+1]``, after ``hs[t]``).  In inference there are two slots used in
turn, and one slot of saved gates, so memory does not grow with ``T``.

What the forward keeps for the backward (the ``Tape``):

* ``x``      [T, B, I]   the input (for ``dW_ih``)
* ``hs``     [T+1, B, H] the hidden states (for ``dW_hh`` and the gate derivatives)
* ``cs``     [T+1, B, H] the LSTM cell states
* ``gates``  [T, B, 4H]  post-activation gates: LSTM i, f, g, o; GRU r, z, n and the fourth
                          block ``W_hn h + b_hn`` (reset after) or ``r * h`` (seed form); none (RNN)
* ``lengths`` [B] int32  valid steps of each sequence
"""
from dataclasses import dataclass
from typing import Any, Optional



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
    """One direction of one layer.  w_ih [G*H, I], w_hh [G*H, H], b_ih [G*H], b_hh [G*H]."""

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


class Workspace:
    """Buffers allocated once per shape and reused by every later call of the same shape."""

    def __init__(self, backend):
        self.backend = backend
        self._buffers = {}

    def get(self, name, shape, dtype):
        shape = tuple(int(s) for s in shape)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self.backend.empty(shape, dtype)
            self._buffers[name] = buf
        return buf

    def nbytes(self):
        return sum(int(b.nbytes) for b in self._buffers.values())


def _slots(T, step, reverse, training):
    """(time t, slot of the state before t, slot after t, slot of the saved gates)."""
    t = T - 1 - step if reverse else step
    if not training:
        return t, step % 2, (step + 1) % 2, 0
    if reverse:
        return t, t + 1, t, t
    return t, t, t + 1, t


def make_loops(matmul, k, slots):
    """The time loops of every cell over one direction, as plain functions of arrays and ints.

    ``matmul(a, b, out)``: ``out = a @ b``; ``k``: the step kernels by name (``be.kernels``);
    ``slots``: ``_slots``, or a jitted copy of it.  Written once: the generic driver runs them as
    Python, and the CPU backend compiles them with Numba around its BLAS (``kernels/cpu.py``),
    which removes the per-step Python and dispatch overhead.  Returns ``{name: loop}``.
    """
    rnn_forward_step = k["rnn_forward_step"]
    rnn_backward_step = k["rnn_backward_step"]
    lstm_forward_step = k["lstm_forward_step"]
    lstm_backward_step = k["lstm_backward_step"]
    gru_forward_step = k["gru_forward_step"]
    gru_backward_step = k["gru_backward_step"]
    gru_seed_reset_step = k["gru_seed_reset_step"]
    gru_seed_candidate_step = k["gru_seed_candidate_step"]
    gru_seed_candidate_backward_step = k["gru_seed_candidate_backward_step"]
    gru_seed_reset_backward_step = k["gru_seed_reset_backward_step"]

    # Forward loops: y [T, B, H]; hs, cs [T+1 or 2, B, H] (the first slot holds h0, c0);
    # gates [T or 1, B, 4H]; xg [T, B, G*H]; hg [B, G*H] scratch; w_hh [G*H, H]; b_hh [G*H].
    def rnn_forward(y, hs, xg, hg, w_hh, b_hh, lengths, reverse, training, relu):
        T, B, H = y.shape
        for step in range(T):
            t, p, n, _ = slots(T, step, reverse, training)
            matmul(hs[p], w_hh.T, hg)
            rnn_forward_step(B, H, y[t], hs[n], xg[t], hg, b_hh, hs[p], lengths, t, relu)

    def lstm_forward(y, hs, cs, gates, xg, hg, w_hh, b_hh, lengths, reverse, training):
        T, B, H = y.shape
        for step in range(T):
            t, p, n, s = slots(T, step, reverse, training)
            matmul(hs[p], w_hh.T, hg)
            lstm_forward_step(B, H, y[t], hs[n], cs[n], gates[s], xg[t], hg, b_hh, hs[p], cs[p],
                              lengths, t)

    def gru_forward(y, hs, gates, xg, hg, w_hh, b_hh, lengths, reverse, training):
        T, B, H = y.shape
        for step in range(T):
            t, p, n, s = slots(T, step, reverse, training)
            matmul(hs[p], w_hh.T, hg)
            gru_forward_step(B, H, y[t], hs[n], gates[s], xg[t], hg, b_hh, hs[p], lengths, t)

    def gru_seed_forward(y, hs, gates, xg, hg_rz, hg_n, rh, w_hh, b_hh, lengths, reverse,
                         training):
        # hg_rz [B, 2H], hg_n [B, H], rh [B, H] scratch
        T, B, H = y.shape
        w_hrz, w_hn = w_hh[: 2 * H], w_hh[2 * H:]
        for step in range(T):
            t, p, n, s = slots(T, step, reverse, training)
            matmul(hs[p], w_hrz.T, hg_rz)
            gru_seed_reset_step(B, H, rh, gates[s], xg[t], hg_rz, b_hh, hs[p], lengths, t)
            matmul(rh, w_hn.T, hg_n)
            gru_seed_candidate_step(B, H, y[t], hs[n], gates[s], xg[t], hg_n, b_hh, hs[p],
                                    lengths, t)

    # Backward loops, undoing the forward's steps in the opposite order: dg [T, B, G*H]
    # (pre-activation gradients, input path); dh_carry, dh_rec [B, H] (in place); dy [T, B, H];
    # hs, cs [T+1, B, H]; gates [T, B, 4H].
    def rnn_backward(dg, dh_carry, dh_rec, dy, hs, w_hh, lengths, reverse, relu):
        T, B, H = dy.shape
        for step in range(T - 1, -1, -1):
            t, p, n, _ = slots(T, step, reverse, True)
            rnn_backward_step(B, H, dg[t], dh_carry, dy[t], dh_rec, hs[n], lengths, t, relu)
            matmul(dg[t], w_hh, dh_rec)

    def lstm_backward(dg, dh_carry, dc, dh_rec, dy, cs, gates, w_hh, lengths, reverse):
        # dc [B, H] (in place)
        T, B, H = dy.shape
        for step in range(T - 1, -1, -1):
            t, p, n, _ = slots(T, step, reverse, True)
            lstm_backward_step(B, H, dg[t], dh_carry, dc, dy[t], dh_rec, gates[t], cs[n], cs[p],
                               lengths, t)
            matmul(dg[t], w_hh, dh_rec)

    def gru_backward(dg, dgh, dh_carry, dh_rec, dy, hs, gates, w_hh, lengths, reverse):
        # dgh [T, B, 3H] pre-activation gradients, recurrent path
        T, B, H = dy.shape
        for step in range(T - 1, -1, -1):
            t, p, n, _ = slots(T, step, reverse, True)
            gru_backward_step(B, H, dg[t], dgh[t], dh_carry, dy[t], dh_rec, gates[t], hs[p],
                              lengths, t)
            matmul(dgh[t], w_hh, dh_rec)

    def gru_seed_backward(dg, dh_carry, dh_rec, drh, dy, hs, gates, w_hh, lengths, reverse):
        # drh [B, H] scratch: dL/d(r*h_prev)
        T, B, H = dy.shape
        for step in range(T - 1, -1, -1):
            t, p, n, _ = slots(T, step, reverse, True)
            gru_seed_candidate_backward_step(B, H, dg[t], dh_carry, dy[t], dh_rec, gates[t],
                                             hs[p], lengths, t)
            matmul(dg[t][:, 2 * H:], w_hh[2 * H:], drh)
            gru_seed_reset_backward_step(B, H, dg[t], dh_carry, drh, gates[t], hs[p], lengths, t)
            matmul(dg[t][:, : 2 * H], w_hh[: 2 * H], dh_rec)

    return {"rnn_forward": rnn_forward, "lstm_forward": lstm_forward,
            "gru_forward": gru_forward, "gru_seed_forward": gru_seed_forward,
            "rnn_backward": rnn_backward, "lstm_backward": lstm_backward,
            "gru_backward": gru_backward, "gru_seed_backward": gru_seed_backward}


def _loops(be, dtype):
    """The backend's compiled loops when it has them (CPU), else the loops as Python."""
    compiled = getattr(be, "compiled_loops", None)
    loops = compiled(dtype) if compiled is not None else None
    return loops if loops is not None else make_loops(be.matmul, be.kernels(dtype), _slots)


def _loop_name(cell, direction):
    form = "gru_seed" if cell.mode == "gru" and not cell.reset_after else cell.mode
    return f"{form}_{direction}"


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
    n_slots = T + 1 if training else 2

    xg = ws.get("xg", (T, B, G * H), dtype)  # [T, B, G*H]
    be.matmul(x.reshape(T * B, I), w.w_ih.T, out=xg.reshape(T * B, G * H))
    xg += w.b_ih
    y = be.empty((T, B, H), dtype)  # [T, B, H]
    hs = ws.get("hs", (n_slots, B, H), dtype)  # [T+1 or 2, B, H]
    first = _slots(T, 0, reverse, training)[1]
    hs[first] = h0
    cs = gates = None
    if cell.has_cell_state:
        cs = ws.get("cs", (n_slots, B, H), dtype)  # [T+1 or 2, B, H]
        cs[first] = c0
    if cell.saved_gates:
        gates = ws.get("gates", (T if training else 1, B, cell.saved_gates * H), dtype)
    hg = ws.get("hg", (B, G * H), dtype)  # [B, G*H] recurrent product of one step

    if not be.forward_sequence(cell, w, xg, y, hs, cs, gates, hg, lengths, reverse, training):
        loop = _loops(be, dtype)[_loop_name(cell, "forward")]
        if cell.mode == "rnn":
            loop(y, hs, xg, hg, w.w_hh, w.b_hh, lengths, reverse, training, int(cell.relu))
        elif cell.mode == "lstm":
            loop(y, hs, cs, gates, xg, hg, w.w_hh, w.b_hh, lengths, reverse, training)
        elif cell.reset_after:
            loop(y, hs, gates, xg, hg, w.w_hh, w.b_hh, lengths, reverse, training)
        else:
            loop(y, hs, gates, xg, ws.get("hg_rz", (B, 2 * H), dtype),
                 ws.get("hg_n", (B, H), dtype), ws.get("rh", (B, H), dtype), w.w_hh, w.b_hh,
                 lengths, reverse, training)

    last = _slots(T, T - 1, reverse, training)[2]
    h_last = hs[last].copy()
    c_last = cs[last].copy() if cs is not None else None
    tape = Tape(x=x, hs=hs, cs=cs, gates=gates, lengths=lengths, reverse=reverse,
                h_last=h_last, c_last=c_last)
    return y, tape


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
    reverse = tape.reverse

    dg = ws.get("dg", (T, B, G * H), dtype)  # [T, B, G*H] pre-activation grads, input path
    dh_carry = ws.get("dh_carry", (B, H), dtype)  # [B, H]
    dh_rec = ws.get("dh_rec", (B, H), dtype)  # [B, H] dg_{t+1} @ W_hh
    dh_carry[...] = dh_last
    dh_rec[...] = 0
    dc = None
    if cell.has_cell_state:
        dc = ws.get("dc", (B, H), dtype)  # [B, H]
        dc[...] = dc_last
    dgh = dg
    if cell.mode == "gru" and cell.reset_after:
        dgh = ws.get("dgh", (T, B, G * H), dtype)  # [T, B, 3H] recurrent path

    if not be.backward_sequence(cell, w, tape, dg, dgh, dh_carry, dc, dy, dh_rec):
        loop = _loops(be, dtype)[_loop_name(cell, "backward")]
        if cell.mode == "rnn":
            loop(dg, dh_carry, dh_rec, dy, hs, w.w_hh, lengths, reverse, int(cell.relu))
        elif cell.mode == "lstm":
            loop(dg, dh_carry, dc, dh_rec, dy, cs, gates, w.w_hh, lengths, reverse)
        elif cell.reset_after:
            loop(dg, dgh, dh_carry, dh_rec, dy, hs, gates, w.w_hh, lengths, reverse)
        else:
            loop(dg, dh_carry, dh_rec, ws.get("drh", (B, H), dtype), dy, hs, gates, w.w_hh,
                 lengths, reverse)

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
    D.sum(axis=0, out=grads.b_ih)
    Dh.sum(axis=0, out=grads.b_hh)
    dx = be.empty((T, B, I), dtype)
    be.matmul(D, w.w_ih, out=dx.reshape(T * B, I))
    return dx, dh0, dc0


def activation_bytes(cell, T, B, H, itemsize):
    """Bytes the tape of one training forward holds per layer and direction, beside the input
    and the output: ``hs`` (and ``cs``) [T+1, B, H] and the saved gates [T, B, 4H]."""
    states = (T + 1) * B * H * (2 if cell.has_cell_state else 1)
    return int(itemsize) * (states + T * B * cell.saved_gates * H)
