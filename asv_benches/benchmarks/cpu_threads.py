"""Who owns the CPU cores, and what a new process pays before its first training step.

* ``CoreOwnership``: gpurnn's LSTM training step at (100, 32, 256, 256) when another thread pool
  has just run in the same process: Numba's own (a ``parallel=True`` function, as a user's code
  or a ``prange`` slipped into a kernel would start) or torch's OpenMP pool.  A pool spinning
  against OpenBLAS's threads made it up to 20x slower here (BENCHMARKS.md, core ownership);
  compare each figure with ``pool='none'``: a large ratio is the regression.
* ``Startup``: seconds from a new interpreter's start to the end of its first LSTM
  forward+backward, with Numba's cache cold (a fresh cache directory) and warm.
"""
import os
import subprocess
import sys
import tempfile

import numba
import numpy as np

SHAPE = (100, 32, 256, 256)


class CoreOwnership:
    params = [["none", "numba", "torch"]]
    param_names = ["pool"]
    timeout = 300

    def setup(self, pool):
        import gpurnn

        T, B, I, H = SHAPE
        self.layer = gpurnn.LSTM(I, H, seed=0)
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((T, B, I)).astype(np.float32)  # [T, B, I]
        self.dout = rng.standard_normal((T, B, H)).astype(np.float32)  # [T, B, H]
        self.other = _other_pool_work(pool)
        self.time_step_after_other_pool()

    def time_step_after_other_pool(self, *params):
        self.other()
        self.layer(self.x)
        self.layer.backward(self.dout)


def _parallel_sum(a):
    total = 0.0
    for i in numba.prange(a.shape[0]):
        total += a[i]
    return total


def _other_pool_work(pool):
    """A function that runs a little work on another thread pool of this process."""
    if pool == "none":
        return lambda: None
    if pool == "numba":
        work = numba.njit(parallel=True)(_parallel_sum)
        a = np.ones(1 << 16)
        return lambda: work(a)
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed")
    a = torch.ones(512, 512)
    return lambda: a @ a


_STARTUP = """
import time
start = time.perf_counter()
import numpy as np
import gpurnn
m = gpurnn.LSTM(64, 64, seed=0)
x = np.ones((20, 4, 64), np.float32)
out, _ = m(x)
m.backward(out)
print(time.perf_counter() - start)
"""


def _first_step_seconds(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _STARTUP], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


class Startup:
    unit = "seconds"
    timeout = 600
    number = 1
    repeat = 1

    def setup(self):
        self.cache = tempfile.TemporaryDirectory()

    def teardown(self):
        self.cache.cleanup()

    def track_first_step_cold_cache(self):
        return _first_step_seconds(self.cache.name)

    def track_first_step_warm_cache(self):
        _first_step_seconds(self.cache.name)
        return _first_step_seconds(self.cache.name)

    track_first_step_cold_cache.unit = "seconds"
    track_first_step_warm_cache.unit = "seconds"
