"""Which CUDA path runs a layer by default, and the measurements that decided it.

The CUDA backend has three ways to run a direction of a layer (docs/gpu.md): step kernels
launched through Numba's dispatcher (``launch="eager"``), the same kernels launched through
cuda.core with prepared arguments (``launch="fast"``), and one persistent kernel for the whole
sequence where ``W_hh`` fits on chip (``persistent``).  The defaults below pick, for a shape, the
fastest of these that was measured; ``GPURNN_CUDA_LAUNCH`` and ``GPURNN_PERSISTENT`` override
them, and so does setting the backend's attributes.

Measured on one NVIDIA H200 at commit 5c4fb45 (BENCHMARKS.md, "GPU"), float32, one layer,
``benchmarks/gpu_compare.py --repeat 20``, training step in ms::

    T,    B,    H  cell     eager    fast   fast + persistent
  100,   64,  512  LSTM     36.3    14.3   (does not fit)
  100,  256, 1024  LSTM     48.8    32.4   (does not fit)
 1000,    4,  256  LSTM    319.3   116.1   29.8
 1000,    1,  128  LSTM    327.2   109.2   18.8
 1000,    4,  256  GRU     312.2   111.4   24.6
 1000,    1,  128  GRU     331.3   105.9   16.5
 1000,    4,  256  RNN     276.5   194.8   15.9
 1000,    1,  128  RNN     255.5   181.9   13.6

* ``fast`` beat ``eager`` at every shape and cell, by 1.4-3.1x (host cost per launch: 104 us
  eager, 21 us fast), with the same results (relative difference to cuDNN 3e-4 both, TF32 on
  cuDNN's side).  So ``fast`` is the default wherever this numba-cuda has cuda.core's launch.
* The persistent kernels engaged (fitted) at B = 1 and 4 and won every time, by 3.9-13x
  (inference: 3.5-8x).
  Batches above 4 where they fit were not measured, so those stay on the per-step path.
"""
import logging

_log = logging.getLogger("gpurnn")

#: Largest batch at which the persistent kernels run by default (where they fit).
PERSISTENT_MAX_BATCH = 4


def default_launch(simulator):
    """``"fast"`` where this numba-cuda can launch through cuda.core, else ``"eager"`` (the
    reason logged); ``"eager"`` under the simulator, where every mode launches lazily."""
    if simulator:
        return "eager"
    from ..kernels.cuda import fast_launch_unavailable

    reason = fast_launch_unavailable()
    if reason is None:
        return "fast"
    _log.info("CUDA step kernels launch through Numba's dispatcher ('eager'): %s", reason)
    return "eager"


def graphs_by_default(simulator, launch, capturable):
    """Whether the per-step time loops run as captured CUDA graphs by default: on a real GPU,
    where the step kernels launch through cuda.core (``fast``: Numba's other launches
    synchronise, which a capture forbids) and the GEMMs through a binding that can be
    captured (``capturable``: nvmath-python's cuBLAS)."""
    return not simulator and launch == "fast" and capturable


def persistent_by_default(B, graphs):
    """Whether a direction with batch ``B`` runs as one persistent kernel when it fits, where
    ``graphs`` says whether its per-step loop would replay as a CUDA graph instead."""
    return not graphs and B <= PERSISTENT_MAX_BATCH
