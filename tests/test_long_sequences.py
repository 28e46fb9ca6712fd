"""Sequences longer than one call can hold: streaming inference in bounded memory, and a
clear error (not an allocator crash) when a call cannot fit."""
import tracemalloc

import numpy as np
import pytest

import gpurnn
from helpers import make


@pytest.mark.parametrize("cell,opts", [("LSTM", {}), ("GRU", {})])
def test_stream_equals_one_call(cell, opts, rng):
    layer = make(cell, opts, 2, 5, num_layers=2, seed=4).eval()
    x = rng.standard_normal((37, 3, 2))
    want_out, want_state = layer(x)
    chunks = [x[i:i + 8] for i in range(0, 37, 8)]
    results = list(layer.stream(chunks))
    np.testing.assert_allclose(np.concatenate([o for o, _ in results]), want_out, rtol=1e-13, atol=1e-14)
    for a, b in zip(results[-1][1], want_state):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_stream_refuses_a_bidirectional_layer(rng):
    """Its reverse direction reads the sequence from the end: chunked outputs would differ
    from one call's, so it is refused before any chunk runs."""
    layer = make("LSTM", {}, 2, 5, bidirectional=True, seed=4).eval()
    x = rng.standard_normal((6, 2, 2))
    with pytest.raises(ValueError, match="stream\\(\\) needs a unidirectional layer"):
        layer.stream([x[:3], x[3:]])


def test_stream_leaves_gradients_on_between_chunks(rng):
    layer = make("GRU", {}, 2, 3, seed=0)
    for _ in layer.stream([rng.standard_normal((4, 1, 2))] * 2):
        assert gpurnn.is_grad_enabled()
    assert layer.training and gpurnn.is_grad_enabled()


def test_a_million_steps_in_bounded_memory(rng):
    """T = 1,000,000 steps of inference through stream(): matches the unchunked result on a
    prefix, and peak Python-heap memory stays that of one chunk."""
    layer = gpurnn.GRU(1, 4, seed=0, dtype="float64").eval()
    chunk_len, n_chunks = 20_000, 50
    gen = np.random.default_rng(1)

    def chunks():
        for _ in range(n_chunks):
            yield gen.standard_normal((chunk_len, 1, 1))

    prefix = np.random.default_rng(1).standard_normal((chunk_len, 1, 1))
    want_prefix, _ = layer(prefix)
    tracemalloc.start()
    first = None
    steps = 0
    for i, (out, state) in enumerate(layer.stream(chunks())):
        if i == 0:
            first = out.copy()
            tracemalloc.reset_peak()
        steps += out.shape[0]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert steps == 1_000_000
    np.testing.assert_allclose(first, want_prefix, rtol=1e-13, atol=1e-14)
    assert np.isfinite(state).all()
    one_chunk = chunk_len * 1 * (1 + 4 + 3 * 4) * 8  # x, y and xg of one chunk, float64
    assert peak < 3 * one_chunk, f"peak {peak} bytes for a chunk of {one_chunk}"


def test_too_large_a_request_is_refused_before_allocating(monkeypatch, rng):
    layer = gpurnn.LSTM(3, 64, num_layers=2)
    x = rng.standard_normal((50, 8, 3)).astype(np.float32)
    monkeypatch.setattr(gpurnn.engine.memory, "free_bytes", lambda backend: 100_000)
    with pytest.raises(gpurnn.OutOfMemory, match=r"T=50, B=8.*Lower the batch size.*eval\(\)"):
        layer(x)
    assert not layer._workspaces  # nothing was allocated
    # inference of the same shape is smaller and still refused here; a small batch fits
    monkeypatch.setattr(gpurnn.engine.memory, "free_bytes", lambda backend: 10_000_000)
    layer(x[:, :1])


def test_estimate_covers_what_is_allocated(rng):
    """The estimate is not below what a training step really holds in its workspaces."""
    layer = gpurnn.GRU(3, 16, num_layers=2, bidirectional=True, reset_after=True)
    x = rng.standard_normal((20, 4, 3)).astype(np.float32)
    out, _ = layer(x)
    layer.backward(np.ones_like(out))
    held = sum(ws.nbytes() for ws in layer._workspaces.values())
    assert layer.call_bytes(20, 4, True) >= held


def test_device_memory_is_asked_only_for_larger_calls(monkeypatch, rng):
    """A training loop's repeated calls skip the free-memory query; a larger call asks again
    and is still refused when it cannot fit."""
    asked = []

    def free(backend):
        asked.append(1)
        return 10_000_000

    monkeypatch.setattr(gpurnn.engine.memory, "free_bytes", free)
    layer = gpurnn.LSTM(3, 16)
    x = rng.standard_normal((20, 4, 3)).astype(np.float32)
    for _ in range(3):
        layer(x)
    layer(x[:10])
    assert len(asked) == 1
    with pytest.raises(gpurnn.OutOfMemory):
        layer(rng.standard_normal((2000, 64, 3)).astype(np.float32))
    assert len(asked) == 2
