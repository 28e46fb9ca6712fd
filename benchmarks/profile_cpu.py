"""Where a CPU training step's time goes: recurrent GEMMs, step kernels, whole-sequence GEMMs,
the rest.

The same layer runs its training step (and its inference forward) four ways, on the same
workspaces: as is; with the per-step recurrent GEMMs replaced by a no-op; with the step
kernels replaced by a no-op; with the whole-sequence GEMMs (the input projection, the weight
gradients and ``dx``) replaced by a no-op.  The differences give each phase; "rest" is what none
removes (bias-gradient sums, copies, allocation, Python).  Medians of ``--repeat`` calls, the
variants interleaved call by call; the no-op runs keep the last real values in the workspaces.
``--threads`` and ``--clock`` as in compare_torch.py (``--threads 1 --clock cpu`` holds on a
loaded machine).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_cpu.py \\
        --cell lstm --shape 100,32,256,256
"""
import argparse
import os

import numba
import numpy as np

import gpurnn
from gpurnn.engine.backend import CPUBackend
from gpurnn.kernels import cpu
from gpurnn.kernels.loops import make_loops, time_slots

from compare_torch import CLOCKS, median_ms  # this folder is on sys.path when run as a script

CELLS = {"rnn": ("RNN", {}), "lstm": ("LSTM", {}), "gru": ("GRU", {"reset_after": True}),
         "gru_reset_before": ("GRU", {"reset_after": False})}


@numba.njit(cache=True)
def _no_matmul(a, b, out):
    pass


@numba.njit(cache=True)
def _no_step(B, H, *args):
    pass


class _Without(CPUBackend):
    """The CPU backend with one phase made a no-op: ``recurrent`` GEMMs, step ``kernels`` or
    ``sequence`` GEMMs."""

    def __init__(self, what):
        super().__init__()
        self.what = what

    def matmul(self, a, b, out):
        if self.what != "sequence":
            super().matmul(a, b, out)

    def compiled_loops(self, dtype):
        if dtype not in self._loops:
            kernels = self.kernels(dtype)
            matmul = cpu._make_matmul(dtype)
            if self.what == "recurrent":
                matmul = _no_matmul
            elif self.what == "kernels":
                kernels = {name: _no_step for name in kernels}
            loops = make_loops(matmul, kernels, numba.njit(time_slots))
            self._loops[dtype] = {name: numba.njit(fn) for name, fn in loops.items()}
        return self._loops[dtype]


PHASES = {"recurrent GEMMs": "recurrent", "step kernels": "kernels",
          "sequence GEMMs": "sequence"}


def profile(cell, shape, dtype="float32", repeat=15, clock="wall"):
    """{mode: {phase: median ms}} for mode in train, infer."""
    T, B, I, H = shape
    cls, opts = CELLS[cell]
    m = getattr(gpurnn, cls)(I, H, dtype=dtype, seed=0, **opts)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(dtype)  # [T, B, I]
    dout = rng.standard_normal((T, B, H)).astype(dtype)  # [T, B, H]
    steps = {"train": lambda: (m(x), m.backward(dout)), "infer": lambda: m(x)}
    real = m.backend
    out = {}
    variants = {"all": real, **{what: _Without(what) for what in PHASES.values()}}
    for mode, step in steps.items():
        m.train(mode == "train")
        samples = {variant: [] for variant in variants}
        # Variants interleaved call by call, so that a shared machine's load hits all alike.
        for _ in range(repeat):
            for variant, backend in variants.items():
                m.backend = backend
                samples[variant].append(median_ms(step, 1, 2, CLOCKS[clock]))
        m.backend = real
        times = {variant: sorted(v)[repeat // 2] for variant, v in samples.items()}
        phases = {name: times["all"] - times[what] for name, what in PHASES.items()}
        out[mode] = {"total": times["all"], **phases,
                     "rest": times["all"] - sum(phases.values())}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", choices=list(CELLS))
    parser.add_argument("--shape", default="100,32,256,256", help="T,B,I,H")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="limit BLAS threads (0: default)")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS))
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)  # NumPy's OpenBLAS, loaded by the imports above
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        parser.error(f"--shape must be T,B,I,H, got {args.shape!r}")
    print(f"load average {os.getloadavg()}, threads {args.threads or 'default'}, "
          f"clock {args.clock}")
    for mode, phases in profile(args.cell, shape, args.dtype, args.repeat, args.clock).items():
        print(f"{args.cell} {shape} {mode}: " + ", ".join(
            f"{name} {ms:.1f} ms" for name, ms in phases.items()))


if __name__ == "__main__":
    main()
