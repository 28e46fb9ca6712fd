"""CUDABackend.run_graph's bookkeeping, with a stand-in for CuPy's streams and graphs (the
capture itself needs a GPU and is untested on hardware: docs/gpu.md).  Captured once per key,
replayed after; a failed capture is logged, remembered, and the work runs uncaptured."""
import logging

import numpy as np
import pytest

from conftest import SIMULATOR
from gpurnn.engine.backend import CUDABackend


class _FakeCuda:
    """Records what the backend does with streams; ``fail`` makes the next capture raise."""

    def __init__(self):
        self.log = []
        self.fail = False
        self.current = "origin"
        cuda = self

        class Stream:
            def __init__(self, non_blocking=False):
                assert non_blocking, "the legacy stream cannot capture"

            def wait_event(self, event):
                cuda.log.append("wait")

            def __enter__(self):
                cuda.current = "capture"

            def __exit__(self, *exc):
                cuda.current = "origin"

            def begin_capture(self):
                cuda.log.append("begin")

            def end_capture(self):
                cuda.log.append("end")
                return Graph()

        class Graph:
            def launch(self, stream):
                cuda.log.append(f"launch on {stream.name}")

        class Origin:
            name = "origin"

            def record(self):
                return "event"

        self.Stream = Stream
        self._origin = Origin()

    def get_current_stream(self):
        return self._origin


@pytest.fixture
def backend():
    be = CUDABackend(graphs=True)
    fake = _FakeCuda()
    be.simulator, be.xp = False, type("cupy", (), {"cuda": fake})
    return be, fake


def test_captured_once_then_replayed(backend):
    be, fake = backend
    ran = []

    def enqueue():
        ran.append(fake.current)

    for _ in range(3):
        be.run_graph("key", enqueue)
    assert ran == ["capture"]  # enqueued once, on the capturing stream
    assert fake.log == ["wait", "begin", "end"] + ["launch on origin"] * 3
    be.run_graph("other", enqueue)
    assert ran == ["capture", "capture"]


def test_failed_capture_falls_back_loudly_and_stays_fallen_back(backend, caplog):
    be, fake = backend
    ran = []

    def enqueue():
        ran.append(fake.current)
        if fake.current == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="gpurnn"):
        be.run_graph("key", enqueue)
        be.run_graph("key", enqueue)
    assert ran == ["capture", "origin", "origin"]
    assert "launch on origin" not in fake.log
    assert "CUDA graph capture failed (RuntimeError: operation not permitted" in caplog.text
    assert caplog.text.count("capture failed") == 1


def test_graphs_off_or_simulated_just_runs(backend):
    be, fake = backend
    be.graphs = False
    ran = []
    be.run_graph("key", lambda: ran.append(1))
    be.run_graph("key", lambda: ran.append(1))
    assert ran == [1, 1] and fake.log == []


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's backend only")
def test_simulated_backend_just_runs():
    ran = []
    sim = CUDABackend(graphs=True)
    sim.run_graph("key", lambda: ran.append(2))
    sim.run_graph("key", lambda: ran.append(2))
    assert ran == [2, 2]


def test_tf32_is_on_by_default_as_in_pytorch(monkeypatch):
    monkeypatch.delenv("GPURNN_TF32", raising=False)
    assert CUDABackend().tf32 is True
    monkeypatch.setenv("GPURNN_TF32", "0")
    assert CUDABackend().tf32 is False
    assert CUDABackend(tf32=True).tf32 is True
    monkeypatch.setenv("GPURNN_TF32", "yes")
    with pytest.raises(ValueError, match="GPURNN_TF32 must be 1 or 0, got 'yes'"):
        CUDABackend()


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's backend only")
def test_tf32_leaves_products_alone_off_the_gpu():
    be = CUDABackend(tf32=True)
    a, b = np.arange(6.0, dtype=np.float32).reshape(2, 3), np.ones((3, 2), np.float32)
    out = np.empty((2, 2), np.float32)
    be.matmul(a, b, out)
    np.testing.assert_array_equal(out, a @ b)
