"""Where a CPU training step's time goes: recurrent GEMMs, pointwise step kernels, the rest.

The same layer runs its training step (and its inference forward) three ways, on the same
workspaces: as is; with the per-step recurrent GEMMs replaced by a no-op; with the step
kernels replaced by a no-op.  The differences give each phase; "rest" is what neither removes
(the input GEMM, the weight-gradient GEMMs, ``dx``, bias sums, copies, Python).  Medians of
``--repeat`` calls, the three variants interleaved call by call; the no-op runs keep the last
real values in the workspaces.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_cpu.py \\
        --cell lstm --shape 100,32,256,256
"""
import argparse

import numba
import numpy as np

import gpurnn
from gpurnn.backend import CPUBackend
from gpurnn.kernels import cpu
from gpurnn.kernels.loops import make_loops, time_slots

from compare_torch import median_ms  # this folder is on sys.path when run as a script

CELLS = {"rnn": ("RNN", {}), "lstm": ("LSTM", {}), "gru": ("GRU", {"reset_after": True}),
         "gru_reset_before": ("GRU", {"reset_after": False})}


@numba.njit(cache=True)
def _no_matmul(a, b, out):
    pass


@numba.njit(cache=True)
def _no_step(B, H, *args):
    pass


class _Without(CPUBackend):
    """The CPU backend with its recurrent GEMMs or its step kernels made no-ops."""

    def __init__(self, what):
        super().__init__()
        self.what = what

    def compiled_loops(self, dtype):
        if dtype not in self._loops:
            kernels = self.kernels(dtype)
            matmul = cpu._make_matmul(dtype)
            if self.what == "gemm":
                matmul = _no_matmul
            else:
                kernels = {name: _no_step for name in kernels}
            loops = make_loops(matmul, kernels, numba.njit(time_slots))
            self._loops[dtype] = {name: numba.njit(fn) for name, fn in loops.items()}
        return self._loops[dtype]


def profile(cell, shape, dtype="float32", repeat=15):
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
    variants = {"all": real, "no_gemm": _Without("gemm"), "no_pointwise": _Without("pointwise")}
    for mode, step in steps.items():
        m.train(mode == "train")
        samples = {variant: [] for variant in variants}
        # Variants interleaved call by call, so that a shared machine's load hits all alike.
        for _ in range(repeat):
            for variant, backend in variants.items():
                m.backend = backend
                samples[variant].append(median_ms(step, 1, warmup=2))
        m.backend = real
        times = {variant: sorted(v)[repeat // 2] for variant, v in samples.items()}
        gemm = times["all"] - times["no_gemm"]
        pointwise = times["all"] - times["no_pointwise"]
        out[mode] = {"total": times["all"], "recurrent GEMMs": gemm,
                     "pointwise kernels": pointwise,
                     "rest": times["all"] - gemm - pointwise}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", choices=list(CELLS))
    parser.add_argument("--shape", default="100,32,256,256", help="T,B,I,H")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 4:
        parser.error(f"--shape must be T,B,I,H, got {args.shape!r}")
    for mode, phases in profile(args.cell, shape, args.dtype, args.repeat).items():
        print(f"{args.cell} {shape} {mode}: " + ", ".join(
            f"{name} {ms:.1f} ms" for name, ms in phases.items()))


if __name__ == "__main__":
    main()
