"""The grid behind a cut rule of ``kernels/cpu.py`` (``SMALL_GEMM_RULES``), on this machine.

For each float32 product [M, K] @ [K, N] of a recurrent layer's step (forward: K = H, N = G*H;
backward: K = G*H, N = H), microseconds per product made whole (one ``cblas_sgemm``) and in
blocks of rows x columns within OpenBLAS's small-matrix bound (M*N*K <= 100**3), through the
very loop the compiled time loops run (``kernels.cpu.sgemm_blocks``), and the blocks this
machine's rule picks.  ``W_hh^T`` C-contiguous, as the loops pass it from 64 rows on.  Medians of
``--repeat`` timings of ``--calls`` products each; CPU time of the process at one thread (holds on
a loaded machine), wall time at more.  A new CPU gets its rule from this table: the blocks that
win everywhere they are allowed, and the bounds past which the whole product wins.

    env -u OPENBLAS_CORETYPE python benchmarks/small_gemm_grid.py --threads 1
    python benchmarks/small_gemm_grid.py --threads 2 --shapes "32,256,1024;64,512,2048"
"""
import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from gpurnn.kernels import cpu

#: (M, K, N): batch rows x the step products of H = 128, 256, 512 (LSTM: G = 4, GRU: G = 3)
DEFAULT_SHAPES = [(M, K, N) for H in (128, 256, 512) for G in (3, 4)
                  for K, N in ((H, G * H), (G * H, H)) for M in (4, 16, 32, 64, 256)
                  if M * K * N > cpu.SMALL_GEMM_MNK]
ROWS = (4, 8, 16, 32, 64)
COLS = (16, 32, 64, 128, 256)


def microseconds(a, b, out, rows, cols, calls, repeat, clock):
    cpu.sgemm_blocks(a, b, out, rows, cols)  # compiled, caches warm
    times = []
    for _ in range(repeat):
        start = clock()
        for _ in range(calls):
            cpu.sgemm_blocks(a, b, out, rows, cols)
        times.append((clock() - start) / calls * 1e6)
    return float(np.median(times))


def grid(M, K, N, calls, repeat, clock, one_thread):
    """{label: us} for the whole product, every block size within the bound, and the rule's."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)  # [M, K] h or dg of one step
    b = rng.standard_normal((K, N), dtype=np.float32)  # [K, N] W_hh^T or W_hh
    out = np.empty((M, N), np.float32)  # [M, N]
    times = {"whole": microseconds(a, b, out, M, N, calls, repeat, clock)}
    for rows in ROWS:
        for cols in COLS:
            if rows <= M and cols < N and rows * cols * K <= cpu.SMALL_GEMM_MNK:
                times[f"{rows}x{cols}"] = microseconds(a, b, out, rows, cols, calls, repeat,
                                                       clock)
    rows, cols = cpu.small_gemm_blocks(M, N, K, cpu.SMALL_GEMM_RULE, one_thread)
    label = "whole" if (rows, cols) == (M, N) else f"{rows}x{cols}"
    if label not in times:
        times[label] = microseconds(a, b, out, rows, cols, calls, repeat, clock)
    return times, label


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="OpenBLAS threads")
    parser.add_argument("--shapes", help='semicolon-separated "M,K,N" (default: the grid)')
    parser.add_argument("--calls", type=int, default=50, help="products per timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per median")
    args = parser.parse_args()
    shapes = DEFAULT_SHAPES
    if args.shapes:
        shapes = []
        for text in args.shapes.split(";"):
            fields = text.split(",")
            if len(fields) != 3 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
                parser.error(f"a shape is M,K,N (three positive ints), got {text!r}")
            shapes.append(tuple(int(f) for f in fields))
    clock = time.process_time if args.threads == 1 else time.perf_counter
    blas = cpu.numpy_blas()
    print(f"OpenBLAS core {blas.core if blas else None}, host CPU {cpu.host_cpu()}, rule "
          f"{cpu.SMALL_GEMM_RULE}, threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    print("M K N | whole us | rule's blocks: us | best blocks: us (rows x columns)")
    with threadpool_limits(args.threads):
        for M, K, N in shapes:
            times, rule = grid(M, K, N, args.calls, args.repeat, clock, args.threads == 1)
            best = min(times, key=times.get)
            print(f"{M} {K} {N} | {times['whole']:.1f} | {rule}: {times[rule]:.1f} | "
                  f"{best}: {times[best]:.1f}", flush=True)


if __name__ == "__main__":
    main()
