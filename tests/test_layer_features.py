"""Layer options beyond one plain layer: dropout, inference mode, zero-length sequences,
forget_bias, the activation-memory figure."""
import threading

import numpy as np
import pytest

import gpurnn
from gpurnn.engine import drivers
from gpurnn.engine.backend import CPUBackend
from gpurnn.kernels.loops import time_slots
from conftest import cell_params
from helpers import central_difference, host, make, random_state, state_tuple, to_device


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_dropout_between_layers_only_and_reproducible(device, rng):
    x_host = rng.standard_normal((4, 3, 2))

    def out(layer):  # the layer's output for x_host, on the host
        return host(layer, layer(to_device(layer, x_host))[0])

    a = make("LSTM", {}, 2, 5, device=device, num_layers=2, dropout=0.5, seed=3)
    b = make("LSTM", {}, 2, 5, device=device, num_layers=2, dropout=0.5, seed=3)
    plain = make("LSTM", {}, 2, 5, device=device, num_layers=2, seed=3)
    out_a, out_b, out_plain = out(a), out(b), out(plain)
    np.testing.assert_array_equal(out_a, out_b)            # same seed, same masks
    assert not np.allclose(out_a, out_plain)               # dropout acted between the layers
    single = make("LSTM", {}, 2, 5, device=device, dropout=0.5, seed=3)
    np.testing.assert_array_equal(out(single), out(make("LSTM", {}, 2, 5, device=device, seed=3)))
    a.eval()                                               # off in inference
    np.testing.assert_array_equal(out(a), out_plain)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_dropout_masks_are_drawn_on_the_device_alike_on_every_device(dtype):
    """The masks come from the layer's counter-based stream: values 0 and 1/(1-p) only, about
    a fraction p of zeros, a new mask each call, and the same masks for the same seed on the
    CPU and on the CUDA backend (the simulator here, a GPU where present)."""
    masks = {}
    for device, shape in (("cpu", (40, 25, 100)), ("cuda", (3, 4, 10))):  # the simulator: few
        layer = make("LSTM", {}, 3, 5, device=device, num_layers=2, dropout=0.3, seed=11,
                     dtype=dtype)
        first = host(layer, layer._dropout_mask(shape))
        second = host(layer, layer._dropout_mask(shape))
        assert layer._dropout_drawn == 2 * first.size
        masks[device] = (first, second)
    first, second = masks["cpu"]
    # 1/(1-p) in the kernels' compute dtype, stored in the layer's
    scale = np.asarray(1 / 0.7, layer.param_dtype).astype(layer.dtype).astype(np.float64)
    assert set(np.unique(first.astype(np.float64))) == {0.0, float(scale)}
    n = first.size  # 100,000 draws: the zeros' share within 5 standard deviations of p
    assert abs((first == 0).mean() - 0.3) < 5 * np.sqrt(0.3 * 0.7 / n)
    assert (first != second).any()
    cpu = make("LSTM", {}, 3, 5, num_layers=2, dropout=0.3, seed=11, dtype=dtype)
    for got in masks["cuda"]:  # the CPU's stream from its start, at the same shape
        want = host(cpu, cpu._dropout_mask((3, 4, 10)))
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))


@cell_params()
def test_dropout_backward_matches_finite_differences(cell, opts, rng):
    T, B, I, H = 3, 2, 2, 3
    layer = make(cell, opts, I, H, num_layers=2, bidirectional=True, dropout=0.4, seed=5)
    x = rng.standard_normal((T, B, I))

    def run():  # the same masks on every call: the draws from the stream's start again
        layer._dropout_drawn = 0
        return layer(x)[0]

    R = rng.standard_normal(run().shape)
    run()
    layer.backward(R)
    analytic = {k: v.copy() for k, v in layer.grads.items()}
    for name in ("weight_ih_l0", "weight_hh_l0_reverse", "bias_hh_l0"):
        p = layer.params[name]
        for idx in [tuple(rng.integers(s) for s in p.shape) for _ in range(4)]:
            numeric = central_difference(lambda: (run() * R).sum(), p, idx)
            np.testing.assert_allclose(numeric, analytic[name][idx], rtol=1e-5, atol=1e-7)


@cell_params()
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_inference_equals_training_forward_and_keeps_no_activations(cell, opts, device, rng):
    T, B, I, H = 6, 2, 3, 4
    layer = make(cell, opts, I, H, device=device, num_layers=2, bidirectional=True, seed=1)
    x = to_device(layer, rng.standard_normal((T, B, I)))
    state = random_state(layer, B, rng)
    lengths = np.array([6, 3])
    out_train, final_train = layer(x, state, lengths=lengths)
    layer.eval()
    out_eval, final_eval = layer(x, state, lengths=lengths)
    np.testing.assert_allclose(host(layer, out_eval), host(layer, out_train),
                               rtol=1e-13, atol=1e-14)
    for a, b in zip(state_tuple(final_eval), state_tuple(final_train)):
        np.testing.assert_allclose(host(layer, a), host(layer, b), rtol=1e-13, atol=1e-14)
    # The tape buffers of inference hold two state slots and one gate slot, whatever T is.
    for ws in layer._workspaces.values():
        assert ws._buffers["hs"].shape[0] == 2
        if layer.cell.saved_gates:
            assert ws._buffers["gates"].shape[0] == 1
    assert layer._tape is None


def test_inference_memory_does_not_grow_with_T(rng):
    layer = make("LSTM", {}, 3, 8, seed=0).eval()
    sizes = []
    for T in (10, 40):
        layer._workspaces.clear()
        layer(rng.standard_normal((T, 2, 3)))
        tape_bytes = sum(ws._buffers[k].nbytes for ws in layer._workspaces.values()
                         for k in ("hs", "cs", "gates"))
        sizes.append(tape_bytes)
    assert sizes[0] == sizes[1]
    # while a training forward keeps exactly activation_bytes of tape
    layer.train()
    layer._workspaces.clear()
    layer(rng.standard_normal((40, 2, 3)))
    # (the LSTM keeps h0, not the states: its backward rebuilds them)
    kept = sum(ws._buffers[k].nbytes for ws in layer._workspaces.values()
               for k in ("h0", "cs", "gates"))
    assert "hs" not in layer._workspaces[(0, 0)]._buffers
    assert kept == layer.activation_bytes(40, 2) > 10 * sizes[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_backward_rebuilds_the_states_of_its_forward(dtype, reverse, rng):
    """The LSTM's tape keeps no states ``h``: its backward rebuilds them as ``o*tanh(c)`` from
    the saved gates and cell states, into the scratch buffer its forward wrote them to (which
    another layer may have overwritten since).  They are the forward's, bit for bit, at every
    step within a sequence; past its length a slot holds ``h0``, which is what the reverse
    direction carries there (and no valid step of the forward direction reads)."""
    cell = drivers.CellSpec("lstm")
    T, B, I, H = 6, 3, 2, 5
    cpu = CPUBackend()
    ws = drivers.Workspace(cpu)
    w = drivers.Weights(*(rng.standard_normal(shape).astype(dtype) for shape in
                          [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]))
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0, c0 = (rng.standard_normal((B, H)).astype(dtype) for _ in range(2))
    lengths = np.array([6, 2, 0], np.int32)
    y, tape = drivers.forward(cpu, cell, w, x, h0, c0, lengths, reverse, True, ws)
    assert tape.hs is None
    states = cpu.scratch("states", (T + 1, B, H), x.dtype)
    made = states.copy()
    states[...] = np.nan  # as another layer's forward would leave it
    grads = drivers.Weights(*(np.empty_like(a) for a in vars(w).values()))
    drivers.backward(cpu, cell, w, tape, rng.standard_normal(y.shape).astype(dtype),
                     np.zeros((B, H), dtype), np.zeros((B, H), dtype), grads, ws)
    rebuilt = cpu.scratch("states", (T + 1, B, H), x.dtype)
    for b, length in enumerate(lengths):
        steps = range(T - length, T) if reverse else range(length)  # loop steps of t < length
        valid = [time_slots(T, step, reverse, True)[2] for step in steps]
        first = time_slots(T, 0, reverse, True)[1]
        np.testing.assert_array_equal(rebuilt[valid + [first], b], made[valid + [first], b])
        padding = sorted(set(range(T + 1)) - set(valid) - {first})
        np.testing.assert_array_equal(rebuilt[padding, b], np.broadcast_to(
            h0[b], (len(padding), H)))
        if reverse:  # the forward carried h0 there too
            np.testing.assert_array_equal(made[padding, b], rebuilt[padding, b])


@cell_params()
def test_training_holds_one_projection_sized_buffer_per_stack(cell, opts, rng):
    """The backward's pre-activation gradients reuse the forward's x W_ih^T buffer, and every
    layer and direction the same one: a training step of a two-layer bidirectional layer holds
    one [T, B, G*H] buffer (the backend's scratch), the reset-after GRU one more for its
    recurrent path's gradients and the LSTM one [T+1, B, H] for its states (rebuilt by its
    backward), shared the same way; another thread gets buffers of its own."""
    T, B, I, H = 5, 3, 2, 4
    layer = make(cell, opts, I, H, num_layers=2, bidirectional=True, seed=0)
    G = layer.cell.gates
    be = layer.backend
    out, _ = layer(rng.standard_normal((T, B, I)))
    layer.backward(np.ones_like(out))
    projection = be.scratch("preact", (T, B, G * H), layer.param_dtype)
    for ws in layer._workspaces.values():
        shapes = [b.shape for name, b in ws._buffers.items() if name != "gates"]
        assert (T, B, G * H) not in shapes, shapes
        assert not layer.cell.has_cell_state or "hs" not in ws._buffers
    others = {}  # the other scratch buffers of this cell
    if layer.cell.reset_after:
        others["dgh"] = ((T, B, G * H), layer.dtype)
    if layer.cell.has_cell_state:
        others["states"] = ((T + 1, B, H), layer.dtype)
    assert set(drivers.scratch_buffers(layer.cell, T, B, H, layer.dtype, True)) == {
        "preact", *others}
    recurrent = {name: be.scratch(name, *spec) for name, spec in others.items()}
    again, _ = layer(rng.standard_normal((T, B, I)))
    layer.backward(np.ones_like(again))
    # the same buffers for the whole stack, call after call
    assert be.scratch("preact", (T, B, G * H), layer.param_dtype) is projection
    for name, spec in others.items():
        assert be.scratch(name, *spec) is recurrent[name]
    elsewhere = []
    worker = threading.Thread(target=lambda: elsewhere.append(
        be.scratch("preact", (T, B, G * H), layer.param_dtype)))
    worker.start()
    worker.join()
    assert elsewhere[0] is not projection
    held = sum(ws.nbytes() for ws in layer._workspaces.values()) + projection.nbytes + sum(
        buf.nbytes for buf in recurrent.values())
    assert layer.call_bytes(T, B, True) >= held
    layer.eval()
    layer._workspaces.clear()
    layer(rng.standard_normal((T, B, I)))
    assert layer.call_bytes(T, B, False) >= (sum(ws.nbytes() for ws in layer._workspaces.values())
                                             + projection.nbytes)


@pytest.mark.parametrize("shape", [(3, 4), (0, 5), (7,), 6, (), (2, 3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_aligned_empty_starts_on_a_cache_line(shape, dtype):
    """``aligned_empty`` gives a writable C-contiguous array of the shape and dtype asked for,
    its first element on a 64-byte boundary, that stays valid with no other reference to its
    memory."""
    import gc

    from gpurnn.engine.arrays import HOST_ALIGNMENT, aligned_empty

    arrays = [aligned_empty(shape, dtype) for _ in range(8)]  # malloc's 16-byte steps, mixed
    gc.collect()
    for a in arrays:
        assert a.shape == np.empty(shape).shape and a.dtype == dtype
        assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
        if a.size:
            assert a.ctypes.data % HOST_ALIGNMENT == 0
        a[...] = 7
        assert (a == 7).all()


@cell_params()
def test_cpu_arrays_the_time_loops_read_start_on_a_cache_line(cell, opts, rng):
    """The parameters, the workspaces and the shared scratch of a CPU layer start on 64-byte
    boundaries (``CPUBackend.buffer``), however the allocator placed the arrays before them;
    the step kernels' rows and OpenBLAS's unpacked operands read faster there."""
    layer = make(cell, opts, 3, 16, num_layers=2, bidirectional=True, seed=0)
    out, _ = layer(rng.standard_normal((5, 2, 3)))
    layer.backward(np.ones_like(out))
    kept = dict(layer.params)
    for key, ws in layer._workspaces.items():
        kept.update({(key, name): buf for name, buf in ws._buffers.items()})
    kept.update(layer.backend._scratch_buffers())
    misplaced = {k: a.ctypes.data % 64 for k, a in kept.items() if a.ctypes.data % 64}
    assert not misplaced, misplaced
    assert len(kept) > len(layer.params)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_calls_without_lengths_share_one_lengths_array_a_shape(device, rng):
    """A call without lengths sends none to the device: the all-T lengths of a shape are made
    once and kept (the last ``FULL_LENGTHS_KEPT`` shapes), and no call writes into them."""
    from gpurnn.nn.layers import FULL_LENGTHS_KEPT

    layer = make("LSTM", {}, 3, 4, device=device, seed=0, bidirectional=True)
    kept = layer._lengths_of_full_sequences(5, 2)
    for _ in range(2):
        out, _ = layer(to_device(layer, rng.standard_normal((5, 2, 3))))
        layer.backward(out)
    assert layer._lengths_of_full_sequences(5, 2) is kept
    np.testing.assert_array_equal(host(layer, kept), [5, 5])
    for T in range(1, FULL_LENGTHS_KEPT + 1):  # newer shapes push the oldest out
        layer._lengths_of_full_sequences(T, 7)
    assert len(layer._full_lengths) == FULL_LENGTHS_KEPT
    assert layer._lengths_of_full_sequences(5, 2) is not kept


@cell_params()
def test_zero_length_sequence(cell, opts, rng):
    """Defined behaviour: zero outputs, the initial state as final state, and the final-state
    gradient passes straight to the initial state."""
    layer = make(cell, opts, 3, 4, seed=2, bidirectional=True)
    x = rng.standard_normal((5, 2, 3))
    state = random_state(layer, 2, rng)
    out, final = layer(x, state, lengths=[0, 5])
    assert not out[:, 0].any()
    for f, s in zip(state_tuple(final), state_tuple(state)):
        np.testing.assert_array_equal(f[:, 0], s[:, 0])
    dfinal = tuple(rng.standard_normal(f.shape) for f in state_tuple(final))
    dx, d0 = layer.backward(rng.standard_normal(out.shape),
                            dfinal if len(dfinal) == 2 else dfinal[0])
    assert not dx[:, 0].any()
    for d, df in zip(state_tuple(d0), dfinal):
        np.testing.assert_array_equal(d[:, 0], df[:, 0])


def test_forget_bias():
    layer = gpurnn.LSTM(3, 4, forget_bias=1.0, num_layers=2, seed=0)
    for name, b in layer.params.items():
        if name.startswith("bias_ih"):
            np.testing.assert_array_equal(b[4:8], 1.0)
        if name.startswith("bias_hh"):
            np.testing.assert_array_equal(b[4:8], 0.0)
    default = gpurnn.LSTM(3, 4, seed=0)
    assert np.abs(default.params["bias_ih_l0"]).max() <= 0.5  # PyTorch's U(-1/sqrt(H), 1/sqrt(H))


def test_seed_makes_weights_reproducible():
    a, b, c = (gpurnn.GRU(3, 5, seed=s) for s in (1, 1, 2))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["weight_hh_l0"], c.params["weight_hh_l0"])


def test_auto_device_says_which():
    layer = gpurnn.LSTM(2, 3, device="auto")
    assert layer.device in ("cpu", "cuda")
    assert (layer.device == "cuda") == (gpurnn.cuda_unavailable_reason() is None)


def test_the_probe_kernel_runs():  # on the GPU, or in the simulator
    from gpurnn.kernels.cuda import kernels_run_here

    kernels_run_here()  # raises if the kernel did not add one everywhere


@pytest.fixture
def fresh_cuda_reason():
    """``cuda_unavailable_reason`` recomputed in the test, and again after it."""
    gpurnn.cuda_unavailable_reason.cache_clear()
    yield
    gpurnn.cuda_unavailable_reason.cache_clear()


def test_a_gpu_whose_numba_cuda_cannot_compile_falls_back_to_the_cpu(
        monkeypatch, caplog, fresh_cuda_reason):
    # A GPU, CuPy and a driver that Numba accepts, but a numba-cuda that breaks at its first
    # compile (numba-cuda 0.30 under NumPy 2.5 calls the removed np.row_stack).
    import sys
    import types

    from numba import cuda

    from gpurnn.engine import backend
    from gpurnn.kernels import cuda as cuda_kernels

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=runtime)))
    monkeypatch.setattr(backend, "_simulator_on", lambda: False)
    monkeypatch.setattr(backend, "_BACKENDS", {})
    monkeypatch.setattr(cuda, "is_available", lambda: True)

    def first_compile_fails():
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(cuda_kernels, "kernels_run_here", first_compile_fails)
    reason = gpurnn.cuda_unavailable_reason()
    assert reason is not None and "row_stack" in reason
    with caplog.at_level("INFO", logger="gpurnn"):
        assert gpurnn.get_backend("auto").name == "cpu"
    assert "chose cpu" in caplog.text and "row_stack" in caplog.text
    with pytest.raises(RuntimeError, match="row_stack"):
        gpurnn.get_backend("cuda")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose_into_by_tiles(dtype, rng):
    from gpurnn.kernels.cpu import transpose_into

    for shape in [(1, 1), (3, 70), (97, 33), (128, 64)]:
        src = rng.standard_normal(shape).astype(dtype)
        for view in (src, src[:, ::-1], np.asfortranarray(src)):
            dst = np.full(shape[::-1], np.nan, dtype)
            transpose_into(view, dst)
            np.testing.assert_array_equal(dst, view.T)


@cell_params()
def test_short_calls_use_the_transposed_view_with_the_same_results(cell, opts, monkeypatch, rng):
    """Below ``TRANSPOSED_COPY_MIN_ROWS`` rows the CPU's time loops multiply by the transposed
    view of W_hh instead of a copy made for the call: the same forward and backward, to float64
    rounding (OpenBLAS may sum in another order)."""
    from gpurnn.engine import backend

    T, B, I, H = 3, 2, 4, 5
    x = rng.standard_normal((T, B, I))
    dout = rng.standard_normal((T, B, 2 * H))
    results = []
    for threshold in (0, 10**9):  # always the copy, then always the view
        monkeypatch.setattr(backend, "TRANSPOSED_COPY_MIN_ROWS", threshold)
        layer = make(cell, opts, I, H, num_layers=2, bidirectional=True, seed=2)
        out, state = layer(x, lengths=[3, 2])
        dx, _ = layer.backward(dout)
        results.append([out, *state_tuple(state), dx, *layer.grads.values()])
        buffers = {k for ws in layer._workspaces.values() for k in ws._buffers}
        assert ("w_hh_t" in buffers) == (threshold == 0)
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
