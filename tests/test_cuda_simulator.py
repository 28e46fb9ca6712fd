"""The CUDA backend (its Numba CUDA kernels and the cuda driver path) gives the CPU backend's
results: outputs, final states and every gradient.  Without a GPU this runs the very same
kernels in Numba's CUDA simulator, so the sizes are kept small."""
import numpy as np
import pytest

from conftest import SIMULATOR, cell_params
from helpers import host, make, random_state, state_tuple

TOL = {"float64": dict(rtol=1e-11, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-6)}


def _run(layer, x, state, lengths, R, Rs):
    be = layer.backend
    out, final = layer(be.asarray(x), state, lengths=lengths)
    dx, d0 = layer.backward(be.asarray(R), Rs)
    result = {"out": out, "dx": dx, **{f"final{i}": s for i, s in enumerate(state_tuple(final))},
              **{f"dstate{i}": s for i, s in enumerate(state_tuple(d0))}, **layer.grads}
    return {k: host(layer, v) for k, v in result.items()}


def _to(layer, state):
    parts = tuple(layer.backend.asarray(layer.backend.to_numpy(s)) for s in state_tuple(state))
    return parts if len(parts) == 2 else parts[0]


@cell_params()
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layers,bidirectional,lengths", [
    (1, False, None), (2, True, [3, 1, 0]), (1, True, [2, 3, 3])], ids=["plain", "stack_bidir_len", "bidir_len"])
def test_cuda_matches_cpu(cell, opts, dtype, layers, bidirectional, lengths, rng):
    T, B, I, H = 3, 3, 2, 5
    kw = dict(num_layers=layers, bidirectional=bidirectional, dtype=dtype, seed=7)
    cpu = make(cell, opts, I, H, device="cpu", **kw)
    gpu = make(cell, opts, I, H, device="cuda", **kw)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = random_state(cpu, B, rng)
    out, final = cpu(x, state)
    R = rng.standard_normal(out.shape).astype(dtype)
    Rs = tuple(rng.standard_normal(s.shape).astype(dtype) for s in state_tuple(final))
    Rs = Rs if len(Rs) == 2 else Rs[0]
    lengths = None if lengths is None else np.array(lengths)
    want = _run(cpu, x, state, lengths, R, Rs)
    got = _run(gpu, x, _to(gpu, state), lengths, R, _to(gpu, Rs))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **TOL[dtype])


def test_simulator_is_what_runs_here():
    """Without a GPU, device='cuda' must be the simulator (not silently the CPU backend)."""
    import gpurnn

    backend = gpurnn.get_backend("cuda")
    assert backend.name == "cuda"
    if SIMULATOR:
        assert backend.simulator and backend.xp is np


@cell_params()
@pytest.mark.parametrize("graphs", [False, True], ids=["per_step", "graphs"])
def test_repeated_calls_match_cpu(cell, opts, graphs, rng, monkeypatch, caplog):
    """One layer called again and again with fresh inputs, in training and in inference, gives
    the CPU's results every time, and an output is not overwritten by later calls.  With graphs
    on a real GPU, the first call of a shape runs as it is, the second is captured and the
    third replayed (checked: every captured loop became a graph); under the simulator the same
    driver code runs over its staged buffers, uncaptured."""
    import logging

    import gpurnn
    from gpurnn.engine import backend as backend_module

    be = gpurnn.get_backend("cuda")
    monkeypatch.setattr(be, "graphs", graphs)
    monkeypatch.setattr(be, "persistent", False)  # B = 3 would run the persistent kernels
    if graphs and not be.simulator and not be._blas.capturable:
        pytest.skip("nvmath-python is not installed here: no CUDA graphs")
    monkeypatch.setattr(be, "_graph_cache", type(be._graph_cache)())
    T, B, I, H = 4, 3, 2, 5
    kw = dict(num_layers=2, bidirectional=True, dtype="float32", seed=3)
    cpu = make(cell, opts, I, H, device="cpu", **kw)
    gpu = make(cell, opts, I, H, device="cuda", **kw)
    lengths = np.array([4, 2, 3])
    first_out = first_host = None
    with caplog.at_level(logging.WARNING, logger="gpurnn"):
        for training in (True, False):
            cpu.train(training)
            gpu.train(training)
            for _ in range(3):
                x = rng.standard_normal((T, B, I)).astype("float32")
                if training:
                    R = rng.standard_normal((T, B, 2 * H)).astype("float32")
                    want, got = _run(cpu, x, None, lengths, R, None), \
                        _run(gpu, x, None, lengths, R, None)
                else:
                    want = {"out": cpu(x, lengths=lengths)[0]}
                    out = gpu(gpu.backend.asarray(x), lengths=lengths)[0]
                    got = {"out": host(gpu, out)}
                    if first_out is None:
                        first_out, first_host = out, got["out"]
                for k in want:
                    np.testing.assert_allclose(got[k], want[k], err_msg=k, **TOL["float32"])
    np.testing.assert_array_equal(host(gpu, first_out), first_host)
    assert "capture failed" not in caplog.text
    if graphs and not be.simulator:
        kinds = {type(g).__name__ for g in be._graph_cache.values()}
        assert backend_module._SEEN not in be._graph_cache.values(), "a loop was not captured"
        assert kinds == {"Graph"} and len(be._graph_cache) == 2 * 2 * 3, kinds


def _second_steps(reset_after, optimizer, second_batch, monkeypatch, **backend_options):
    """On the CPU and on a fresh CUDA backend (nothing captured yet: the second step of a shape
    captures its loops, and makes the capture stream and its cuBLAS workspace), a GRU model's
    training step on one batch, then the forward and backward of ``second_batch(first)``:
    ``{device: (loss, {parameter: gradient})}``."""
    from gpurnn.engine import backend as backend_module
    from gpurnn.engine.backend import CUDABackend
    from gpurnn.training.step import forward_backward, train_step
    from gpurnn.training.tasks import make_task, model_for_task

    monkeypatch.setitem(backend_module._BACKENDS, "cuda", CUDABackend(**backend_options))
    got = {}
    for device in ("cpu", "cuda"):
        task = make_task("adding", 4)
        model = model_for_task(task, "gru", hidden_size=3, seed=0, device=device,
                               reset_after=reset_after)
        first = task.batch(np.random.default_rng(0), 2)
        train_step(model, task, optimizer(model.params, model.grads, lr=1e-2), first,
                   clip_norm=1.0)
        loss, _ = forward_backward(model, task, second_batch(task, first))
        got[device] = (loss, {k: model.backend.to_numpy(g) for k, g in model.grads.items()})
    return got


@pytest.mark.parametrize("reset_after", [False, True],
                         ids=["gru_reset_before", "gru_reset_after"])
def test_a_fresh_backends_capturing_step_sees_its_own_input(reset_after, monkeypatch):
    """The capturing step must compute with its own input: a NaN put into it reaches the loss
    and every gradient of the recurrent layer, as on the CPU (checked first).  On the H200,
    tests/test_nonfinite.py's guard test saw a finite loss and NaN in ``weight_ih``'s gradient
    alone when its NaN step was a fresh process's first capture; under the simulator nothing is
    captured and this checks the staged path."""
    from gpurnn.nn.optim import Adam

    def with_nan(task, first):
        first.x[1, 0, 1] = np.nan
        return first

    for device, (loss, grads) in _second_steps(reset_after, Adam, with_nan, monkeypatch).items():
        grads = {k: g for k, g in grads.items() if k.startswith("rnn.")}
        assert np.isnan(loss), (device, loss)
        assert all(np.isnan(g).any() for g in grads.values()), \
            (device, {k: int(np.isnan(g).sum()) for k, g in grads.items()})


@pytest.mark.parametrize("reset_after", [False, True],
                         ids=["gru_reset_before", "gru_reset_after"])
def test_a_fresh_backends_capturing_step_computes_the_cpus_loss(reset_after, monkeypatch):
    """The same sequence without a NaN: given new data, the capturing step computes the CPU's
    loss and gradients (SGD, so the first step's rounding differences stay small; strict
    float32 GEMMs).  A capturing call that read the previous step's input would give the
    previous data's loss."""
    from gpurnn.nn.optim import SGD

    got = _second_steps(reset_after, SGD, lambda task, first: task.batch(
        np.random.default_rng(1), 2), monkeypatch, tf32=False)
    np.testing.assert_allclose(got["cuda"][0], got["cpu"][0], rtol=1e-5)
    for k, g in got["cpu"][1].items():
        np.testing.assert_allclose(got["cuda"][1][k], g, rtol=1e-4, atol=1e-6, err_msg=k)
