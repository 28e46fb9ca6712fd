"""The time loops of every cell over one direction of one layer, written once.

Per step: the recurrent product(s) (``matmul``), then the cell's step kernel(s).  The loops are
plain functions of arrays and ints: the CPU backend compiles them with Numba around a direct
BLAS call (``kernels/cpu.py``), so no Python runs between steps; the CUDA backend runs them as
Python, each step kernel a launch.  How a BLAS reads the products' operands (plain or
transposed, leading dimension): ``operand_layout``, for the CPU's CBLAS and the GPU's cuBLAS
calls alike.

Time runs ``t = 0..T-1`` (``T-1..0`` when ``reverse``).  States are stored by time: ``hs`` has
``T+1`` slots in training, the state before step ``t`` in slot ``t`` and after it in slot
``t+1`` (swapped when ``reverse``); in inference two slots used in turn and one slot of saved
gates, so memory does not grow with ``T`` (``time_slots``).  In inference the LSTM and the
reset-after GRU store no gates (their kernels' ``save`` is 0: nothing reads them); the
reset-before GRU's step reads its own.

Every forward loop takes the same arguments, and every backward loop, whatever the cell uses
(``None`` for what a cell has not: ``cs`` unless LSTM, ``gates`` for the RNN; ``relu`` is read by
the RNN only):

* forward ``(y, hs, cs, gates, xg, hg, w_hh_t, b_ih, b_hh, lengths, reverse, training, relu,
  c_carry)``:
  y [T, B, H] out; hs, cs [T+1 or 2, B, H] (the first slot holds h0, c0), both of the layer's
  dtype; c_carry [2, B, H]: the LSTM's running cell state in the compute dtype, its two slots
  used in turn (the first holds c0), where ``cs`` is 16-bit (holding it rounded for the
  backward), else None (``cs`` holds it); gates
  [T or 1, B, S*H] out; xg [T, B, G*H] = x W_ih^T (no bias); hg [B, G*H] scratch (C-contiguous);
  w_hh_t [H, G*H] = W_hh^T, C-contiguous (OpenBLAS multiplies by it about 20 % faster than by
  the transposed view of W_hh: it packs the operand on every call, and a transposed one
  slower); b_ih, b_hh [G*H]; lengths [B] int32.
* backward ``(dg, dgh, dh_carry, dc, dh_rec, dy, hs, cs, gates, w_hh, lengths, reverse, relu)``:
  dg [T, B, G*H] out, pre-activation gradients (input path); dgh the recurrent path's (``dg``
  itself unless the reset-after GRU); dh_carry, dc, dh_rec [B, H] in/out (``dh_carry`` the part
  of dL/dh that does not go through ``W_hh``, ``dh_rec`` the part that does, ``dc`` dL/dc);
  dy [T, B, H]; hs, cs [T+1, B, H]; gates [T, B, S*H]; w_hh [G*H, H].  The LSTM keeps no
  states ``h`` for its backward: its backward loop writes them into ``hs``, rebuilt from the
  saved ``o`` and ``c`` (``h = o*tanh(c)``), starting from ``h0`` in the first slot; a padding
  step writes ``h0``, the state padding carries in the reverse direction (its padding comes
  first; in the forward direction no valid step reads it).
"""


def operand_layout(rows, cols, row_stride, col_stride, item):
    """How a row-major BLAS reads a ``[rows, cols]`` operand with these strides (bytes): ``(0,
    leading dimension)`` when rows are contiguous (as stored), ``(1, leading dimension)`` when
    columns are (a transposed view, as ``w.T``), ``(-1, 0)`` when neither.  The CUDA backend's
    16-bit GEMMs (``gpurnn/engine/cublas.py``) read operands by the same rule as the CPU's
    compiled loops (``kernels/cpu.py``)."""
    if col_stride == item and (rows == 1 or row_stride >= cols * item):
        return 0, max(row_stride // item, cols)
    if row_stride == item and (cols == 1 or col_stride >= rows * item):
        return 1, max(col_stride // item, rows)
    return -1, 0


def time_slots(T, step, reverse, training):
    """(time t of loop step ``step``, slot of the state before t, slot after t, gate slot)."""
    t = T - 1 - step if reverse else step
    if not training:
        return t, step % 2, (step + 1) % 2, 0
    if reverse:
        return t, t + 1, t, t
    return t, t, t + 1, t


#: Loop name of each cell form: ``{form}_forward`` and ``{form}_backward``.
FORMS = ("rnn", "lstm", "gru_reset_after", "gru_reset_before")


def make_loops(matmul, kernels, slots):
    """``{"{form}_forward" | "{form}_backward": loop}`` for every form in ``FORMS``.

    ``matmul(a, b, out)``: ``out = a @ b``; ``kernels``: the step kernels by name
    (``kernels/signatures.py``); ``slots``: ``time_slots``, or a jitted copy of it.
    """
    rnn_forward_step = kernels["rnn_forward_step"]
    rnn_backward_step = kernels["rnn_backward_step"]
    lstm_forward_step = kernels["lstm_forward_step"]
    lstm_backward_step = kernels["lstm_backward_step"]
    gru_reset_after_forward_step = kernels["gru_reset_after_forward_step"]
    gru_reset_after_backward_step = kernels["gru_reset_after_backward_step"]
    gru_reset_before_gates_step = kernels["gru_reset_before_gates_step"]
    gru_reset_before_candidate_step = kernels["gru_reset_before_candidate_step"]
    gru_reset_before_candidate_backward_step = kernels["gru_reset_before_candidate_backward_step"]
    gru_reset_before_gates_backward_step = kernels["gru_reset_before_gates_backward_step"]

    def rnn_forward(y, hs, cs, gates, xg, hg, w_hh_t, b_ih, b_hh, lengths, reverse, training,
                    relu, c_carry):
        T, B, H = y.shape
        for step in range(T):
            t, before, after, _ = slots(T, step, reverse, training)
            matmul(hs[before], w_hh_t, hg)
            rnn_forward_step(B, H, y[t], hs[after], xg[t], hg, b_ih, b_hh, hs[before], lengths,
                             t, relu)

    def lstm_forward(y, hs, cs, gates, xg, hg, w_hh_t, b_ih, b_hh, lengths, reverse, training,
                     relu, c_carry):
        T, B, H = y.shape
        for step in range(T):
            t, before, after, saved = slots(T, step, reverse, training)
            matmul(hs[before], w_hh_t, hg)
            c_prev = cs[before] if c_carry is None else c_carry[step % 2]
            c_new = cs[after] if c_carry is None else c_carry[(step + 1) % 2]
            lstm_forward_step(B, H, y[t], hs[after], c_new, cs[after], gates[saved], xg[t], hg,
                              b_ih, b_hh, hs[before], c_prev, lengths, t, int(training))

    def gru_reset_after_forward(y, hs, cs, gates, xg, hg, w_hh_t, b_ih, b_hh, lengths, reverse,
                                training, relu, c_carry):
        T, B, H = y.shape
        for step in range(T):
            t, before, after, saved = slots(T, step, reverse, training)
            matmul(hs[before], w_hh_t, hg)
            gru_reset_after_forward_step(B, H, y[t], hs[after], gates[saved], xg[t], hg, b_ih,
                                         b_hh, hs[before], lengths, t, int(training))

    def gru_reset_before_forward(y, hs, cs, gates, xg, hg, w_hh_t, b_ih, b_hh, lengths, reverse,
                                 training, relu, c_carry):
        T, B, H = y.shape
        w_hrz_t, w_hn_t = w_hh_t[:, : 2 * H], w_hh_t[:, 2 * H:]
        # [B, 2H] and [B, H]: C-contiguous views of the scratch, as GEMM outputs must be
        flat = hg.reshape(B * 3 * H)
        hg_rz = flat[: B * 2 * H].reshape(B, 2 * H)
        hg_n = flat[B * 2 * H:].reshape(B, H)
        for step in range(T):
            t, before, after, saved = slots(T, step, reverse, training)
            matmul(hs[before], w_hrz_t, hg_rz)
            gru_reset_before_gates_step(B, H, gates[saved], xg[t], hg_rz, b_ih, b_hh, hs[before])
            matmul(gates[saved][:, 3 * H:], w_hn_t, hg_n)  # (r * h_prev) W_hn^T
            gru_reset_before_candidate_step(B, H, y[t], hs[after], gates[saved], xg[t], hg_n,
                                            b_ih, b_hh, hs[before], lengths, t)

    # Backward loops: the forward's steps undone in the opposite order.
    def rnn_backward(dg, dgh, dh_carry, dc, dh_rec, dy, hs, cs, gates, w_hh, lengths,
                     reverse, relu):
        T, B, H = dy.shape
        for step in range(T - 1, -1, -1):
            t, _, after, _ = slots(T, step, reverse, True)
            rnn_backward_step(B, H, dg[t], dh_carry, dy[t], dh_rec, hs[after], lengths, t, relu)
            matmul(dg[t], w_hh, dh_rec)

    def lstm_backward(dg, dgh, dh_carry, dc, dh_rec, dy, hs, cs, gates, w_hh, lengths,
                      reverse, relu):
        T, B, H = dy.shape
        first = slots(T, 0, reverse, True)[1]  # the slot of h0
        for step in range(T - 1, -1, -1):
            t, before, after, _ = slots(T, step, reverse, True)
            lstm_backward_step(B, H, dg[t], dh_carry, dc, dy[t], dh_rec, gates[t], cs[after],
                               cs[before], hs[after], hs[first], lengths, t)
            matmul(dg[t], w_hh, dh_rec)

    def gru_reset_after_backward(dg, dgh, dh_carry, dc, dh_rec, dy, hs, cs, gates, w_hh,
                                 lengths, reverse, relu):
        T, B, H = dy.shape
        for step in range(T - 1, -1, -1):
            t, before, _, _ = slots(T, step, reverse, True)
            gru_reset_after_backward_step(B, H, dg[t], dgh[t], dh_carry, dy[t], dh_rec,
                                          gates[t], hs[before], lengths, t)
            matmul(dgh[t], w_hh, dh_rec)

    def gru_reset_before_backward(dg, dgh, dh_carry, dc, dh_rec, dy, hs, cs, gates, w_hh,
                                  lengths, reverse, relu):
        T, B, H = dy.shape
        for step in range(T - 1, -1, -1):
            t, before, _, _ = slots(T, step, reverse, True)
            gru_reset_before_candidate_backward_step(B, H, dg[t], dh_carry, dy[t], dh_rec,
                                                     gates[t], hs[before], lengths, t)
            # dh_rec is free once the candidate's backward has read it: it holds
            # drh = dL/d(r*h_prev) until the next product overwrites it.
            matmul(dg[t][:, 2 * H:], w_hh[2 * H:], dh_rec)
            gru_reset_before_gates_backward_step(B, H, dg[t], dh_carry, dh_rec, gates[t],
                                                 hs[before], lengths, t)
            matmul(dg[t][:, : 2 * H], w_hh[: 2 * H], dh_rec)

    return {"rnn_forward": rnn_forward, "rnn_backward": rnn_backward,
            "lstm_forward": lstm_forward, "lstm_backward": lstm_backward,
            "gru_reset_after_forward": gru_reset_after_forward,
            "gru_reset_after_backward": gru_reset_after_backward,
            "gru_reset_before_forward": gru_reset_before_forward,
            "gru_reset_before_backward": gru_reset_before_backward}
