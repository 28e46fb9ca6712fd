"""Which CUDA path runs a layer by default, and the measurements that decided it.

The CUDA backend has four ways to run a direction of a layer (docs/gpu.md): step kernels
launched through Numba's dispatcher (``launch="eager"``), the same kernels launched through
cuda.core with prepared arguments (``launch="fast"``), the ``fast`` per-step loop captured once
per shape as a CUDA graph and replayed (``graphs``), and one persistent kernel for the whole
sequence where ``W_hh`` fits on chip (``persistent``).  The defaults below pick, for a shape, the
fastest of these that was measured; ``GPURNN_CUDA_LAUNCH``, ``GPURNN_CUDA_GRAPHS`` and
``GPURNN_PERSISTENT`` override them, and so does setting the backend's attributes.

Measured on one NVIDIA H200 (BENCHMARKS.md, "GPU"), float32, one layer,
``benchmarks/gpu_compare.py``, training step in ms (eager and fast at 5c4fb45, ``--repeat
20``, strict FP32 GEMMs; graphs and persistent in one run at 90625a7, ``--repeat 10``, TF32
GEMMs, which change little at these sizes)::

    T,    B,    H  cell     eager    fast   graphs   persistent (graphs off)
  100,   64,  512  LSTM     36.3    14.3     2.96    (does not fit)
  100,  256, 1024  LSTM     48.8    32.4     9.31    (does not fit)
 1000,    4,  256  LSTM    319.3   116.1    16.87    28.55
 1000,    1,  128  LSTM    327.2   109.2     9.96    18.12
 1000,    4,  256  GRU     312.2   111.4    15.96    24.48
 1000,    1,  128  GRU     331.3   105.9     9.61    16.66
 1000,    4,  256  RNN     276.5   194.8    13.96    15.55
 1000,    1,  128  RNN     255.5   181.9     7.33    13.81

* ``fast`` beat ``eager`` at every shape and cell, by 1.4-3.1x (host cost per launch: 104 us
  eager, 21-27 us fast), with the same results.  So ``fast`` is the default wherever this
  numba-cuda has cuda.core's launch.
* Graphs beat every other path at every shape and cell measured, training and inference
  (inference at (1000, 4, 256) LSTM: 8.1 ms against 15.9 persistent).  So they are the default
  wherever they can run: ``fast`` launches (the others synchronise, which a capture forbids)
  and nvmath-python's cuBLAS binding (CuPy's refuses a capturing stream).
* The persistent kernels beat the uncaptured per-step path by 3.9-13x where they fit (B = 1
  and 4; batches above 4 where they fit were not measured), so they remain the default there
  when graphs cannot run.
* With their step barrier a global counter instead of ``grid.sync()`` (0f93856; the same H200,
  ``--repeat 5``, TF32), the persistent kernels ran 7-15 % faster than the column above, and
  still slower than the graphs except the RNN's training step at (1000, 4, 256)::

    T,    B,    H  cell     graphs    persistent, blocks:  16      32      64     132 (all SMs)
 1000,    4,  256  LSTM     16.33                      (no fit)   67.94   34.44   25.42
 1000,    1,  128  LSTM      8.67                        17.57   14.82   14.35   16.95
 1000,    4,  256  GRU      16.04                      (no fit)   43.51   29.04   22.20
 1000,    1,  128  GRU       9.41                        15.43   13.64   13.15   15.18
 1000,    4,  256  RNN      14.08                        35.81   22.66   16.91   13.25
 1000,    1,  128  RNN       7.45                        10.93   10.51   11.20   11.96

  (ms, training step; inference likewise: at (1000, 4, 256) RNN 7.00 persistent against 6.65
  graphs).  So the graphs stay the default everywhere they run.  A persistent kernel takes
  one block per multiprocessor (``persistent_blocks``): fewer were far slower at B = 4; at
  B = 1, 32 or 64 blocks were 4-15 % faster than 128, a difference kept out of the rule
  since that path runs only where graphs cannot.
* The fused step kernels (``kernels/fused.py``: one launch a step that makes the step's
  product itself, so half the graph nodes of the per-step loop) have not run on a GPU yet, so
  no rule turns them on: ``fused`` (``GPURNN_FUSED_STEPS``) is off unless asked for, until
  ``benchmarks/gpu_session.sh bench`` has timed them against the graphs at small batch.
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
    where the step kernels launch through cuda.core (``fast``) and the GEMMs through a binding
    that can be captured (``capturable``: nvmath-python's cuBLAS)."""
    return not simulator and launch == "fast" and capturable


def persistent_by_default(B, graphs):
    """Whether a direction with batch ``B`` runs as one persistent kernel when it fits, where
    ``graphs`` says whether its per-step loop would replay as a CUDA graph instead."""
    return not graphs and B <= PERSISTENT_MAX_BATCH


def persistent_blocks(sms):
    """The most blocks a persistent kernel spreads one direction over, on a GPU of ``sms``
    multiprocessors: one per multiprocessor (the kernels plan at most one block per unit; the
    measurements above)."""
    return sms
