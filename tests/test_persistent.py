"""The whole-direction paths of the CUDA backend give the per-step driver's results on the CPU
backend: forward, the outputs, every state slot and the saved gates; backward, every step's
pre-activation gradients and the carried gradients the loop leaves.  Two such paths: the
persistent kernels (one launch for all T steps) and the fused step kernels (one launch a step
that makes the step's product itself, ``kernels/fused.py``).  Under the CUDA simulator a
cooperative grid has one block, so the slicing of the hidden units over blocks is exercised by
giving that block several slices, and checked on its own for many blocks; the fused kernels
run several blocks of units and rows, the last one part-filled."""
import dataclasses

import numpy as np
import pytest

from gpurnn.engine import drivers
from gpurnn.engine.backend import CPUBackend, CUDABackend
from gpurnn.kernels import fused, persistent
from gpurnn.kernels.loops import time_slots

TOL = {"float64": dict(rtol=1e-12, atol=1e-13), "float32": dict(rtol=1e-5, atol=1e-6)}
CELLS = {"rnn_tanh": drivers.CellSpec("rnn"), "rnn_relu": drivers.CellSpec("rnn", relu=True),
         "lstm": drivers.CellSpec("lstm"), "gru": drivers.CellSpec("gru", reset_after=True)}


@pytest.mark.parametrize("G,H,n_slices,n_blocks", [
    (4, 5, 2, 1), (4, 5, 2, 2), (3, 37, 5, 3), (1, 128, 128, 132), (4, 7, 7, 2)])
def test_slices_hold_every_row_once(G, H, n_slices, n_blocks):
    U = -(-H // n_slices)
    rows = -(-n_slices // n_blocks) * G * U
    held = [persistent.slice_row(r, blk, n_blocks, G, U, H, n_slices)
            for blk in range(n_blocks) for r in range(rows)]
    held = [row for row in held if row >= 0]
    assert sorted(held) == list(range(G * H))


@pytest.mark.parametrize("H,n_slices,n_blocks", [(5, 2, 1), (37, 5, 3), (128, 128, 132)])
def test_backward_slices_hold_every_column_once(H, n_slices, n_blocks):
    U = -(-H // n_slices)
    rows = -(-n_slices // n_blocks) * U
    held = [persistent.slice_unit(r, blk, n_blocks, U, H, n_slices)
            for blk in range(n_blocks) for r in range(rows)]
    assert sorted(j for j in held if j >= 0) == list(range(H))


def test_plan_fits_shared_memory_or_refuses():
    shape = persistent.plan(4, 4, 256, 4, 132, 48 * 1024)
    n_blocks, n_slices, U, lanes, threads, nbytes = shape
    assert n_blocks <= 132 and n_slices * U >= 256 and (n_slices - 1) * U < 256
    assert nbytes <= 48 * 1024 and threads % lanes == 0
    assert nbytes == persistent.shared_bytes(4, U, n_slices, n_blocks, 4, 256, threads, 4)
    # LSTM W_hh at H=1024 in float32 is 16 MiB: not in 132 blocks of 48 KiB.
    assert persistent.plan(4, 64, 1024, 4, 132, 48 * 1024) is None
    # Backward stages the [B, 4H] gradient instead of h [B, H]: the same shape fits or not by it.
    back = persistent.plan(4, 4, 256, 4, 132, 48 * 1024, backward=True)
    assert back[5] == persistent.shared_bytes(4, U, n_slices, n_blocks, 4, 256, back[4], 4, True)
    assert back[5] - back[4] * 4 == nbytes - threads * 4 + 3 * 4 * 256 * 4
    assert persistent.plan(4, 12, 256, 4, 132, 48 * 1024, backward=True) is None


def _problem(cell, dtype, T, B, I, H, rng):
    G = cell.gates
    w = drivers.Weights(*(rng.standard_normal(s).astype(dtype) * 0.5
                          for s in [(G * H, I), (G * H, H), (G * H,), (G * H,)]))
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((B, H)).astype(dtype)
    c0 = rng.standard_normal((B, H)).astype(dtype) if cell.has_cell_state else None
    lengths = np.array([T, max(T - 1, 0)][:B] + [T] * (B - 2), dtype=np.int32)
    return w, x, h0, c0, lengths


def _on_device(backend):
    """A function putting a host array (or None) on ``backend``'s device."""
    return lambda a: None if a is None else backend.asarray(a)


def _w_hh_t(w):
    """W_hh^T [H, G*H], C-contiguous, as the driver hands it to ``forward_sequence``."""
    return np.ascontiguousarray(w.w_hh.T)


def _buffers(cell, w, x, h0, c0, training, reverse):
    """What the driver hands its loop: xg, poisoned outputs and slots, h0 (c0) in place."""
    T, B, I = x.shape
    H, G = w.w_hh.shape[1], cell.gates
    S = T + 1 if training else 2
    poison = np.nan
    xg = (x.reshape(T * B, I) @ w.w_ih.T).reshape(T, B, G * H)
    y = np.full((T, B, H), poison, x.dtype)
    hs = np.full((S, B, H), poison, x.dtype)
    cs = np.full((S, B, H), poison, x.dtype) if cell.has_cell_state else None
    gates = (np.full((T if training else 1, B, cell.saved_gates * H), poison, x.dtype)
             if cell.saved_gates else None)
    first = time_slots(T, 0, reverse, training)[1]
    hs[first] = h0
    if cs is not None:
        cs[first] = c0
    hg = np.full((B, G * H), poison, x.dtype)
    return xg, y, hs, cs, gates, hg


def _forward_reference(cell, w, x, h0, c0, lengths, reverse, training):
    """The CPU driver's forward: ``(y, tape, hs)``, ``hs`` every state slot it wrote (the
    LSTM's training forward writes them to the backend's scratch, not to its tape)."""
    cpu = CPUBackend()
    y, tape = drivers.forward(cpu, cell, w, x, h0, c0, lengths, reverse, training,
                              drivers.Workspace(cpu))
    hs = tape.hs
    if hs is None:
        T, B, _ = x.shape
        hs = cpu.scratch("states", (T + 1, B, h0.shape[1]), x.dtype).copy()
    return y, tape, hs


def _check(cell, dtype, training, reverse, got, want_y, want_hs, tape, lengths):
    y, hs, cs, gates = got
    np.testing.assert_allclose(y, want_y, **TOL[dtype])
    if training:
        np.testing.assert_allclose(hs, want_hs, **TOL[dtype])
        if cs is not None:
            np.testing.assert_allclose(cs, tape.cs, **TOL[dtype])
        if gates is not None:  # gates of padded steps are never written, by either path
            valid = np.arange(y.shape[0])[:, None] < lengths[None, :]
            np.testing.assert_allclose(gates[valid], tape.gates[valid], **TOL[dtype])
    last = time_slots(y.shape[0], y.shape[0] - 1, reverse, training)[2]
    np.testing.assert_allclose(hs[last], tape.h_last, **TOL[dtype])


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("dtype,training,reverse,n_slices", [
    ("float64", True, False, 2), ("float64", False, True, 3), ("float32", True, True, 1)])
def test_persistent_kernel_matches_cpu(name, dtype, training, reverse, n_slices, rng):
    cell = CELLS[name]
    T, B, I, H = 3, 2, 2, 5
    w, x, h0, c0, lengths = _problem(cell, dtype, T, B, I, H, rng)
    want_y, tape, want_hs = _forward_reference(cell, w, x, h0, c0, lengths, reverse, training)
    xg, y, hs, cs, gates, hg = _buffers(cell, w, x, h0, c0, training, reverse)
    U = -(-H // n_slices)
    lanes, threads = 2, 4
    shape = (1, n_slices, U, lanes, threads,
             persistent.shared_bytes(cell.gates, U, n_slices, 1, B, H, threads, x.itemsize))
    kernel = persistent.persistent_kernels(dtype)[cell.mode][0]
    persistent.launch_persistent(kernel, shape, T, B, H, y, hs, cs, gates, xg, hg, w.w_hh,
                                 w.b_ih, w.b_hh, lengths, np.full(1, 7, np.int32), reverse,
                                 training, cell.relu)
    _check(cell, dtype, training, reverse, (y, hs, cs, gates), want_y, want_hs, tape, lengths)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_backend_forward_sequence(name, rng):
    """The backend's hook plans the launch itself and runs it only when asked to."""
    cell = CELLS[name]
    T, B, I, H = 2, 1, 3, 4
    w, x, h0, c0, lengths = _problem(cell, "float64", T, B, I, H, rng)
    want_y, tape, want_hs = _forward_reference(cell, w, x, h0, c0, lengths, False, True)
    bufs = _buffers(cell, w, x, h0, c0, True, False)
    xg, y, hs, cs, gates, hg = bufs
    assert not CUDABackend(persistent=False).forward_sequence(cell, w, _w_hh_t(w), *bufs,
                                                              lengths, False, True)
    assert np.isnan(y).all()
    assert CUDABackend(persistent=True).forward_sequence(cell, w, _w_hh_t(w), *bufs, lengths,
                                                         False, True)
    _check(cell, "float64", True, False, (y, hs, cs, gates), want_y, want_hs, tape, lengths)


def test_reset_before_gru_is_left_to_the_step_path(rng):
    cell = drivers.CellSpec("gru", reset_after=False)
    w, x, h0, c0, lengths = _problem(cell, "float64", 2, 1, 2, 3, rng)
    bufs = _buffers(cell, w, x, h0, c0, True, False)
    assert not CUDABackend(persistent=True).forward_sequence(cell, w, _w_hh_t(w), *bufs,
                                                             lengths, False, True)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_by_default_whole_sequences_run_persistent_at_small_batches_only(name, monkeypatch, rng):
    """Where the per-step loops are not captured as CUDA graphs (graphs off, or the simulator);
    where they are, the graphs run at every batch size (``dispatch.py``: they were faster)."""
    from gpurnn.engine.dispatch import PERSISTENT_MAX_BATCH

    monkeypatch.delenv("GPURNN_PERSISTENT")
    backend = CUDABackend(graphs=False)
    assert backend.persistent == "auto"
    cell = CELLS[name]
    for B, engaged in ((1, True), (PERSISTENT_MAX_BATCH, True), (PERSISTENT_MAX_BATCH + 1, False)):
        w, x, h0, c0, lengths = _problem(cell, "float64", 2, B, 3, 4, rng)
        bufs = _buffers(cell, w, x, h0, c0, True, False)
        assert backend.forward_sequence(cell, w, _w_hh_t(w), *bufs, lengths, False,
                                        True) == engaged, B
    monkeypatch.setattr(backend, "graphs_active", lambda: True)
    w, x, h0, c0, lengths = _problem(cell, "float64", 2, 1, 3, 4, rng)
    bufs = _buffers(cell, w, x, h0, c0, True, False)
    assert not backend.forward_sequence(cell, w, _w_hh_t(w), *bufs, lengths, False, True)


def test_default_launch_is_fast_where_numba_cuda_has_it(monkeypatch, caplog):
    from gpurnn.engine import dispatch
    from gpurnn.kernels import cuda as cuda_kernels

    assert dispatch.default_launch(simulator=True) == "eager"  # the simulator launches lazily
    monkeypatch.setattr(cuda_kernels, "fast_launch_unavailable", lambda: None)
    assert dispatch.default_launch(simulator=False) == "fast"
    monkeypatch.setattr(cuda_kernels, "fast_launch_unavailable", lambda: "no cuda.core here")
    with caplog.at_level("INFO", logger="gpurnn"):
        assert dispatch.default_launch(simulator=False) == "eager"
    assert "no cuda.core here" in caplog.text


def test_bad_option_values_are_refused(monkeypatch):
    monkeypatch.setenv("GPURNN_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="GPURNN_PERSISTENT must be auto or 0 or 1, got 'yes'"):
        CUDABackend()
    with pytest.raises(ValueError, match="launch .* must be one of"):
        CUDABackend(launch="quick", persistent=False)
    with pytest.raises(ValueError, match="persistent must be 'auto', False or True, got 'on'"):
        CUDABackend(persistent="on")
    monkeypatch.delenv("GPURNN_PERSISTENT")
    for blocks in ("0", "-2", "many"):
        monkeypatch.setenv("GPURNN_PERSISTENT_BLOCKS", blocks)
        with pytest.raises(ValueError, match=f"GPURNN_PERSISTENT_BLOCKS must be a positive "
                                             f"integer, got '{blocks}'"):
            CUDABackend()
    monkeypatch.setenv("GPURNN_PERSISTENT_BLOCKS", "16")
    assert CUDABackend().persistent_blocks == 16
    assert CUDABackend(persistent_blocks=8).persistent_blocks == 8  # the argument wins
    with pytest.raises(ValueError, match="persistent_blocks must be a positive int or None, "
                                         "got 0"):
        CUDABackend(persistent_blocks=0)


def test_plan_refuses_lanes_that_are_not_a_power_of_two():
    with pytest.raises(ValueError, match="lanes must be a power of two .*, got 24"):
        persistent.plan(4, 1, 128, 4, 16, 48 * 1024, lanes=24)
    assert persistent.plan(4, 1, 128, 4, 16, 48 * 1024, lanes=16)[0] == 16


def _backward_reference(cell, dtype, training_reverse, rng):
    """A CPU training forward and backward; returns the inputs of the backward loop and the
    buffers the CPU loop left (dg, dgh, dh_carry, dc, dh_rec)."""
    T, B, I, H = 3, 2, 2, 5
    w, x, h0, c0, lengths = _problem(cell, dtype, T, B, I, H, rng)
    cpu = CPUBackend()
    ws = drivers.Workspace(cpu)
    y, tape = drivers.forward(cpu, cell, w, x, h0, c0, lengths, training_reverse, True, ws)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dh_last = rng.standard_normal((B, H)).astype(dtype)
    dc_last = rng.standard_normal((B, H)).astype(dtype) if cell.has_cell_state else None
    grads = drivers.Weights(*(np.empty_like(a) for a in (w.w_ih, w.w_hh, w.b_ih, w.b_hh)))
    drivers.backward(cpu, cell, w, tape, dy, dh_last, dc_last, grads, ws)
    G = cell.gates
    left = {"dg": cpu.scratch("preact", (T, B, G * H), x.dtype).copy(),
            **{name: ws.get(name, (B, H), x.dtype).copy() for name in ("dh_carry", "dh_rec")}}
    if cell.has_cell_state:
        left["dc"] = ws.get("dc", (B, H), x.dtype).copy()
    if cell.mode == "gru":
        left["dgh"] = cpu.scratch("dgh", (T, B, G * H), x.dtype).copy()
    if tape.hs is None:  # the LSTM's states, rebuilt by its backward
        left["hs"] = cpu.scratch("states", (T + 1, B, H), x.dtype).copy()
    return w, tape, dy, dh_last, dc_last, left


def _backward_buffers(cell, tape, dy, dh_last, dc_last):
    """What the driver hands its backward loop: the states (the tape's, or for the LSTM a
    poisoned buffer holding h0 in its first slot), poisoned gradients, the carried ones set:
    ``(hs, dg, dgh, dh_carry, dc, dh_rec)``."""
    T, B, H = dy.shape
    G = cell.gates
    hs = tape.hs
    if hs is None:
        hs = np.full((T + 1, B, H), np.nan, dy.dtype)
        hs[time_slots(T, 0, tape.reverse, True)[1]] = tape.h0
    dg = np.full((T, B, G * H), np.nan, dy.dtype)
    dgh = np.full((T, B, G * H), np.nan, dy.dtype) if cell.mode == "gru" else dg
    dc = dc_last.copy() if dc_last is not None else None
    return hs, dg, dgh, dh_last.copy(), dc, np.zeros((B, H), dy.dtype)


def _check_backward(cell, dtype, got, left):
    hs, dg, dgh, dh_carry, dc, dh_rec = got
    for name, value in [("dg", dg), ("dh_carry", dh_carry), ("dh_rec", dh_rec)] + (
            [("dc", dc)] if dc is not None else []) + (
            [("dgh", dgh)] if cell.mode == "gru" else []) + (
            [("hs", hs)] if "hs" in left else []):
        np.testing.assert_allclose(value, left[name], err_msg=name, **TOL[dtype])


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("dtype,reverse,n_slices", [
    ("float64", False, 2), ("float64", True, 3), ("float32", False, 1)])
def test_persistent_backward_matches_cpu(name, dtype, reverse, n_slices, rng):
    cell = CELLS[name]
    w, tape, dy, dh_last, dc_last, left = _backward_reference(cell, dtype, reverse, rng)
    T, B, H = dy.shape
    hs, dg, dgh, dh_carry, dc, dh_rec = _backward_buffers(cell, tape, dy, dh_last, dc_last)
    U = -(-H // n_slices)
    lanes, threads = 2, 4
    shape = (1, n_slices, U, lanes, threads, persistent.shared_bytes(
        cell.gates, U, n_slices, 1, B, H, threads, dy.itemsize, backward=True))
    kernel = persistent.persistent_kernels(dtype)[cell.mode][1]
    persistent.launch_persistent_backward(kernel, shape, T, B, H, dg, dgh, dh_carry, dc, dy,
                                          dh_rec, hs, tape.cs, tape.gates, w.w_hh,
                                          tape.lengths, np.full(1, 7, np.int32), reverse,
                                          cell.relu)
    _check_backward(cell, dtype, (hs, dg, dgh, dh_carry, dc, dh_rec), left)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_backend_backward_sequence(name, rng):
    cell = CELLS[name]
    w, tape, dy, dh_last, dc_last, left = _backward_reference(cell, "float64", False, rng)
    bufs = _backward_buffers(cell, tape, dy, dh_last, dc_last)
    assert not CUDABackend(persistent=False).backward_sequence(cell, w, tape, *bufs[:5], dy,
                                                               bufs[5])
    assert np.isnan(bufs[1]).all()
    assert CUDABackend(persistent=True).backward_sequence(cell, w, tape, *bufs[:5], dy, bufs[5])
    _check_backward(cell, "float64", bufs, left)


@pytest.mark.parametrize("path", ["persistent", "fused"])
@pytest.mark.parametrize("cell,opts", [("LSTM", {}), ("GRU", {"reset_after": True}),
                                       ("RNN", {"nonlinearity": "relu"})])
def test_layers_run_their_own_loops_when_asked(path, cell, opts, monkeypatch, rng):
    """Through the public layers (both directions, lengths): the drivers hand the whole loops
    to the persistent kernels (or the fused step kernels), forward and backward, and every
    result is the CPU backend's."""
    import gpurnn
    from helpers import host, make

    be = gpurnn.get_backend("cuda")
    ran = []
    for hook in ("forward_sequence", "backward_sequence"):
        run = getattr(be, hook)
        monkeypatch.setattr(be, hook, lambda *a, run=run, hook=hook: ran.append(
            (hook, run(*a))) or ran[-1][1])
    monkeypatch.setattr(be, "persistent", path == "persistent")
    monkeypatch.setattr(be, "fused", path == "fused")
    T, B, I, H = 3, 2, 2, 4
    layers = [make(cell, opts, I, H, device=device, dtype="float64", seed=3, bidirectional=True)
              for device in ("cpu", "cuda")]
    x = rng.standard_normal((T, B, I))
    dout = rng.standard_normal((T, B, 2 * H))
    results = []
    for layer in layers:
        out, state = layer(layer.backend.asarray(x), lengths=np.array([3, 1]))
        dx, _ = layer.backward(layer.backend.asarray(dout))
        results.append({"out": host(layer, out), "dx": host(layer, dx),
                        **{f"state{i}": host(layer, s) for i, s in enumerate(
                            state if isinstance(state, tuple) else (state,))},
                        **{k: host(layer, g) for k, g in layer.grads.items()}})
    for key in results[0]:
        np.testing.assert_allclose(results[1][key], results[0][key], rtol=1e-11, atol=1e-12,
                                   err_msg=key)
    assert ran == [("forward_sequence", True)] * 2 + [("backward_sequence", True)] * 2


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("dtype,training,reverse,H", [
    ("float64", True, False, 5), ("float64", False, True, 5), ("float32", True, True, 37)])
def test_fused_forward_matches_cpu(name, dtype, training, reverse, H, rng):
    """H = 37: two blocks of units, the second with 5 of its 32 (``fused.UNITS``)."""
    cell = CELLS[name]
    T, B, I = 3, 2, 2
    w, x, h0, c0, lengths = _problem(cell, dtype, T, B, I, H, rng)
    want_y, tape, want_hs = _forward_reference(cell, w, x, h0, c0, lengths, reverse, training)
    backend = CUDABackend(persistent=False, fused=True)
    on = _on_device(backend)  # the fast launcher (a real GPU) takes device arrays only
    xg, y, hs, cs, gates, hg = map(on, _buffers(cell, w, x, h0, c0, training, reverse))
    assert backend.forward_sequence(cell, drivers.Weights(*map(on, vars(w).values())),
                                    on(_w_hh_t(w)), xg, y, hs, cs, gates, hg, on(lengths),
                                    reverse, training)
    got = tuple(None if a is None else backend.to_numpy(a) for a in (y, hs, cs, gates))
    _check(cell, dtype, training, reverse, got, want_y, want_hs, tape, lengths)


@pytest.mark.parametrize("name", list(CELLS))
@pytest.mark.parametrize("dtype,reverse", [("float64", False), ("float64", True),
                                           ("float32", False)])
def test_fused_backward_matches_cpu(name, dtype, reverse, rng):
    cell = CELLS[name]
    w, tape, dy, dh_last, dc_last, left = _backward_reference(cell, dtype, reverse, rng)
    backend = CUDABackend(persistent=False, fused=True)
    on = _on_device(backend)
    hs, dg, dgh, dh_carry, dc, dh_rec = _backward_buffers(cell, tape, dy, dh_last, dc_last)
    dg_on = on(dg)
    bufs = (on(hs), dg_on, dg_on if dgh is dg else on(dgh), on(dh_carry), on(dc), on(dh_rec))
    tape = dataclasses.replace(tape, hs=on(tape.hs), cs=on(tape.cs), gates=on(tape.gates),
                               lengths=on(tape.lengths))
    assert backend.backward_sequence(cell, drivers.Weights(*map(on, vars(w).values())), tape,
                                     *bufs[:5], on(dy), bufs[5])
    got = tuple(None if a is None else backend.to_numpy(a) for a in bufs)
    _check_backward(cell, dtype, got, left)


def test_fused_steps_are_off_by_default_and_only_where_written(monkeypatch, rng):
    """Off unless asked (``GPURNN_FUSED_STEPS=1`` or ``fused=True``); never for the reset-before
    GRU or a 16-bit layer; behind the persistent path where that runs."""
    monkeypatch.delenv("GPURNN_FUSED_STEPS", raising=False)
    assert CUDABackend().fused is False
    monkeypatch.setenv("GPURNN_FUSED_STEPS", "1")
    assert CUDABackend().fused is True
    monkeypatch.setenv("GPURNN_FUSED_STEPS", "yes")
    with pytest.raises(ValueError, match="GPURNN_FUSED_STEPS must be 0 or 1, got 'yes'"):
        CUDABackend()
    with pytest.raises(ValueError, match="fused must be False or True, got 'auto'"):
        CUDABackend(fused="auto")
    monkeypatch.delenv("GPURNN_FUSED_STEPS")
    backend = CUDABackend(persistent=False, fused=True)
    for cell, dtype in ((drivers.CellSpec("gru"), np.float64), (CELLS["lstm"], np.float16)):
        assert backend._fused_kernel(cell, np.dtype(dtype), backward=False) is None
    cell = CELLS["lstm"]
    w, x, h0, c0, lengths = _problem(cell, "float64", 2, 1, 3, 4, rng)
    bufs = _buffers(cell, w, x, h0, c0, True, False)
    ran = []
    monkeypatch.setattr(fused, "fused_kernels", lambda *a: ran.append(a))
    assert CUDABackend(persistent=True, fused=True).forward_sequence(
        cell, w, _w_hh_t(w), *bufs, lengths, False, True)
    assert ran == []  # the persistent kernel ran the direction
