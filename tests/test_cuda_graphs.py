"""CUDABackend.run_graph's bookkeeping, with a stand-in for CuPy's streams and graphs (the
capture itself needs a GPU: the suite on a real GPU runs it).  A key (the loop, its arrays'
addresses, shapes, strides and dtypes, its other values, the backend's options) runs as it is
the first time, is captured the second and replayed after; a failed capture is logged,
remembered, and the work runs uncaptured."""
import logging
from types import SimpleNamespace

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
            ptr = "capture"

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


class _FakeBlas:
    capturable = True

    def __init__(self, log):
        self.log = log

    def bind(self, stream_ptr):
        self.log.append(f"bind {stream_ptr}")


class _Array:
    """What ``run_graph`` reads of a CuPy array to key a capture."""

    def __init__(self, ptr, shape=(2, 3), dtype=np.float32):
        self.data = SimpleNamespace(ptr=ptr)
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.strides = (shape[1] * self.dtype.itemsize, self.dtype.itemsize)


@pytest.fixture
def backend():
    be = CUDABackend(graphs=True)
    fake = _FakeCuda()
    be.simulator, be.xp, be.launch = False, type("cupy", (), {"cuda": fake}), "fast"
    be._blas_ = _FakeBlas(fake.log)
    return be, fake


def test_seen_once_runs_then_captured_once_then_replayed(backend):
    be, fake = backend
    ran = []

    def enqueue():
        ran.append(fake.current)

    args = (_Array(0x1000), 7, True, None)
    for _ in range(4):
        be.run_graph("lstm_forward", enqueue, args)
    # the first call runs as it is (loads kernels, sizes buffers); the second is captured
    assert ran == ["origin", "capture"]
    assert fake.log == ["wait", "bind capture", "begin", "end"] + ["launch on origin"] * 3
    be.run_graph("rnn_forward", enqueue, args)
    assert ran == ["origin", "capture", "origin"]


@pytest.mark.parametrize("change", ["address", "shape", "dtype", "value", "tf32"])
def test_anything_that_changes_the_work_is_a_new_key(backend, change):
    be, fake = backend
    ran = []
    args = [_Array(0x1000), 7]
    be.run_graph("lstm_forward", lambda: ran.append(1), args)
    be.run_graph("lstm_forward", lambda: ran.append(1), args)
    assert len(ran) == 2 and fake.log.count("begin") == 1
    if change == "address":
        args[0] = _Array(0x2000)
    elif change == "shape":
        args[0] = _Array(0x1000, shape=(3, 2))
    elif change == "dtype":
        args[0] = _Array(0x1000, dtype=np.float64)
    elif change == "value":
        args[1] = 8
    else:
        be.tf32 = not be.tf32
    be.run_graph("lstm_forward", lambda: ran.append(1), args)
    assert len(ran) == 3 and fake.log.count("begin") == 1  # ran uncaptured, not replayed


def test_failed_capture_falls_back_loudly_and_stays_fallen_back(backend, caplog):
    be, fake = backend
    ran = []

    def enqueue():
        ran.append(fake.current)
        if fake.current == "capture":
            raise RuntimeError("operation not permitted when stream is capturing")

    with caplog.at_level(logging.WARNING, logger="gpurnn"):
        for _ in range(3):
            be.run_graph("gru_reset_after_backward", enqueue, (3,))
    assert ran == ["origin", "capture", "origin", "origin"]
    assert "launch on origin" not in fake.log
    assert ("CUDA graph capture failed (RuntimeError: operation not permitted when stream is "
            "capturing); running gru_reset_after_backward without graphs") in caplog.text
    assert caplog.text.count("capture failed") == 1


def test_graphs_off_just_runs(backend):
    be, fake = backend
    be.graphs = False
    ran = []
    for _ in range(3):
        be.run_graph("rnn_forward", lambda: ran.append(1), (1,))
    assert ran == [1, 1, 1] and fake.log == []


def test_graphs_on_need_fast_launches_and_a_capturable_blas(backend):
    be, _ = backend
    assert be.graphs_active()
    assert be.graphs_unavailable_reason() is None
    be.launch = "eager"
    with pytest.raises(RuntimeError, match="cannot run: launch='eager': Numba's dispatcher "
                                           "synchronises"):
        be.graphs_active()
    be.launch = "fast"
    be._blas_.capturable = False
    assert "pip install nvmath-python" in be.graphs_unavailable_reason()
    with pytest.raises(RuntimeError, match="pip install nvmath-python"):
        be.graphs_active()
    be.graphs = "auto"  # the default: off where they cannot run, without an error
    assert not be.graphs_active()
    be._blas_.capturable = True
    assert be.graphs_active()


def test_graphs_option_is_checked(monkeypatch):
    monkeypatch.setenv("GPURNN_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="GPURNN_CUDA_GRAPHS must be auto or 0 or 1, got 'yes'"):
        CUDABackend()
    with pytest.raises(ValueError, match="graphs must be 'auto', False or True, got 'on'"):
        CUDABackend(graphs="on")
    monkeypatch.delenv("GPURNN_CUDA_GRAPHS")
    assert CUDABackend().graphs == "auto"


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's backend only")
def test_simulated_backend_just_runs():
    ran = []
    sim = CUDABackend(graphs=True)
    for _ in range(3):
        sim.run_graph("rnn_forward", lambda: ran.append(2), (1,))
    assert ran == [2, 2, 2]


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
