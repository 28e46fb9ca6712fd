"""Test set-up.

The CUDA backend is tested without a GPU through Numba's CUDA simulator, which must be switched
on before Numba is first imported: so it is decided here, once, for the whole session.  On a
machine with a working GPU and CuPy the real GPU is used instead (force either way by setting
NUMBA_ENABLE_CUDASIM yourself).
"""
import os
import zlib


def _gpu_present():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0" if _gpu_present() else "1")
# The tests' GEMMs are tiny: BLAS threads only spin.  On the busy 2-core machine an LSTM
# training step (T=100, B=32, H=64) took 1141 ms with OpenBLAS's threads, 193 ms with one.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# The suite's batches are small, where the CUDA backend would run whole sequences as persistent
# kernels by default (gpurnn/engine/dispatch.py): keep the per-step kernels the path every test
# covers.  tests/test_persistent.py switches the persistent kernels on itself and checks the
# default.
os.environ.setdefault("GPURNN_PERSISTENT", "0")
# On a GPU, float32 GEMMs run TF32 by default (gpurnn/engine/backend.py), whose 10-bit mantissa
# products miss the float32 tolerances the suite holds the CUDA backend to against the CPU:
# the suite checks strict float32, and tests/test_cuda_graphs.py the TF32 default.
os.environ.setdefault("GPURNN_TF32", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SIMULATOR = os.environ["NUMBA_ENABLE_CUDASIM"] == "1"

#: (class name, constructor options) of every cell and form.
CELLS = [
    ("RNN", {}),
    ("RNN", {"nonlinearity": "relu"}),
    ("LSTM", {}),
    ("GRU", {}),
    ("GRU", {"reset_after": True}),
]
CELL_IDS = ["rnn_tanh", "rnn_relu", "lstm", "gru_reset_before", "gru_reset_after"]


def cell_params():
    return pytest.mark.parametrize("cell,opts", CELLS, ids=CELL_IDS)


@pytest.fixture
def rng(request):
    # A fresh, test-specific stream: different tests see different data, reruns the same.
    # crc32, not hash(): Python salts str hashes per process (PYTHONHASHSEED), so hash() gave
    # every run other data.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
