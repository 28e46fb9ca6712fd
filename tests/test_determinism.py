"""Determinism: the same seed gives bit-identical results, run to run and across BLAS thread
counts.  Reductions are plain sums and GEMMs (no atomics), so nothing depends on timing."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from conftest import cell_params
from helpers import make


def _train_steps(cell, opts, device, threads, steps=3, T=12, B=8, I=24, H=32):
    with threadpool_limits(threads):
        layer = make(cell, opts, I, H, device=device, dtype="float32", num_layers=2,
                     bidirectional=True, dropout=0.2, seed=123)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            x = layer.backend.asarray(rng.standard_normal((T, B, I)).astype(np.float32))
            out, _ = layer(x, lengths=rng.integers(1, T + 1, size=B))
            layer.backward(out)  # gradient of sum(out**2)/2
            for k, p in layer.params.items():
                p -= 0.1 * layer.grads[k]
        return {k: layer.backend.to_numpy(p).copy() for k, p in layer.params.items()}


@cell_params()
def test_bit_identical_run_to_run_and_across_thread_counts(cell, opts):
    first = _train_steps(cell, opts, "cpu", threads=1)
    again = _train_steps(cell, opts, "cpu", threads=1)
    two_threads = _train_steps(cell, opts, "cpu", threads=2)
    for k in first:
        assert np.array_equal(first[k], again[k]), k
        assert np.array_equal(first[k], two_threads[k]), k


@pytest.mark.parametrize("cell,opts", [("LSTM", {}), ("GRU", {})])
def test_cuda_path_bit_identical_run_to_run(cell, opts):
    small = dict(threads=1, steps=2, T=4, B=3, I=3, H=5)  # the simulator is slow
    a = _train_steps(cell, opts, "cuda", **small)
    b = _train_steps(cell, opts, "cuda", **small)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
