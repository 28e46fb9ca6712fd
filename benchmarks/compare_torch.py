"""gpurnn against PyTorch on the CPU: medians of the training step and of inference, and ratios.

Each measurement (one side, one cell, one shape) runs in its own fresh Python process, so
torch's OpenMP threads (which spin after each parallel region) and either side's allocator
state cannot slow the other.  In each process: build the layer, warm up, then time ``--repeat``
calls and report the median.  ``--rounds`` processes per side run
alternately (gpurnn, torch, gpurnn, ...), and the median of their medians is reported, so on a
shared machine both sides see the same load.

* training step: forward in training mode, then the backward of ``sum(out * dout)`` down to the
  weights and the input (torch: ``x.requires_grad_()``, since gpurnn always returns ``dx``);
* inference: ``eval()`` forward (torch: also under ``torch.inference_mode()``).

Clocks (``--clock``): ``wall`` (``time.perf_counter``, the default) or ``cpu``
(``time.process_time``: CPU seconds of all the process's threads).  On a shared, loaded machine
a process waits for a core at random; with ``--threads 1`` the CPU clock leaves that wait out
(and counts any spinning thread), so its ratios hold under load where wall-clock ones do not.

Run it with the OpenBLAS settings a user has (see BENCHMARKS.md):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/compare_torch.py --json out.json

The table has medians in ms and the ratio gpurnn / torch (below 1: gpurnn is faster).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPES = [(100, 32, 256, 256), (100, 64, 512, 512), (1000, 1, 128, 128), (50, 256, 128, 128)]
#: name -> (gpurnn class, gpurnn options, torch class, torch options)
CELLS = {
    "rnn": ("RNN", {}, "RNN", {}),
    "lstm": ("LSTM", {}, "LSTM", {}),
    "gru": ("GRU", {"reset_after": True}, "GRU", {}),
    "gru_reset_before": ("GRU", {"reset_after": False}, "GRU", {}),
}


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_ms(fn, repeat, warmup, clock=time.perf_counter):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _measure_gpurnn(cell, shape, dtype, repeat, warmup, clock):
    import numpy as np

    import gpurnn

    T, B, I, H = shape
    cls, opts, _, _ = CELLS[cell]
    rng = np.random.default_rng(0)
    m = getattr(gpurnn, cls)(I, H, dtype=dtype, seed=0, **opts)
    x = rng.standard_normal((T, B, I)).astype(dtype)  # [T, B, I]
    dout = rng.standard_normal((T, B, H)).astype(dtype)  # [T, B, H]

    def train_step():
        m(x)
        m.backward(dout)

    def infer():
        m(x)

    train = median_ms(train_step, repeat, warmup, clock)
    m.eval()
    return {"train_ms": train, "infer_ms": median_ms(infer, repeat, warmup, clock)}


def _measure_torch(cell, shape, dtype, repeat, warmup, clock):
    import torch

    T, B, I, H = shape
    _, _, cls, opts = CELLS[cell]
    torch.manual_seed(0)
    tdtype = getattr(torch, dtype)
    m = getattr(torch.nn, cls)(I, H, **opts).to(tdtype)
    x = torch.randn(T, B, I, dtype=tdtype, requires_grad=True)  # [T, B, I]
    dout = torch.randn(T, B, H, dtype=tdtype)  # [T, B, H]

    def train_step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = m(x)
        out.backward(dout)

    def infer():
        with torch.inference_mode():
            m(x)

    train = median_ms(train_step, repeat, warmup, clock)
    m.eval()
    return {"train_ms": train, "infer_ms": median_ms(infer, repeat, warmup, clock)}


def _blas_info():
    from threadpoolctl import threadpool_info

    return [{k: d.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
            for d in threadpool_info()]


def _child(args):
    """Runs in the subprocess: one side, one cell, one shape; prints one JSON line."""
    shape = tuple(int(s) for s in args.shape.split(","))
    measure = _measure_gpurnn if args.child == "gpurnn" else _measure_torch
    if args.threads:
        from threadpoolctl import threadpool_limits

        # threadpoolctl limits the libraries loaded so far: load this side's first (gpurnn's
        # kernels import Numba, which loads SciPy and its OpenBLAS too).
        if args.child == "torch":
            import torch
        else:
            import gpurnn.kernels.cpu  # noqa: F401
        threadpool_limits(args.threads)  # BLAS and OpenMP pools of this process
        if args.child == "torch":
            torch.set_num_threads(args.threads)
    result = measure(args.cell, shape, args.dtype, args.repeat, args.warmup, CLOCKS[args.clock])
    result["blas"] = _blas_info()
    print(json.dumps(result))


def _run_child(side, cell, shape, dtype, repeat, warmup, threads, clock):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--cell", cell,
           "--shape", ",".join(map(str, shape)), "--dtype", dtype,
           "--repeat", str(repeat), "--warmup", str(warmup), "--threads", str(threads),
           "--clock", clock]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {cell} {shape} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _repeat_for(shape, requested):
    """Fewer repeats for the long shapes, so one table takes minutes, not tens of minutes."""
    T, B, I, H = shape
    small = T * B * H * (I + H) <= 100 * 64 * 512 * 1024 // 4
    return requested if small else max(5, requested // 2)


def _table(rows):
    head = ("| cell | T, B, I, H | gpurnn train ms | torch train ms | train ratio "
            "| gpurnn infer ms | torch infer ms | infer ratio | load |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        g, t = r["gpurnn"], r["torch"]
        lines.append(
            f"| {r['cell']} | {', '.join(map(str, r['shape']))} | {g['train_ms']:.2f} "
            f"| {t['train_ms']:.2f} | {g['train_ms'] / t['train_ms']:.2f} "
            f"| {g['infer_ms']:.2f} | {t['infer_ms']:.2f} | {g['infer_ms'] / t['infer_ms']:.2f} "
            f"| {r['load']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(CELLS),
                        help=f"comma-separated, from {','.join(CELLS)}")
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                        help="semicolon-separated T,B,I,H")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per median")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="processes per side, alternating gpurnn and torch, so both see the "
                             "same load on a shared machine; the median of their medians counts")
    parser.add_argument("--threads", type=int, default=0,
                        help="limit BLAS/OpenMP threads of both sides (0: their defaults)")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="wall: elapsed time; cpu: CPU time of the process (see above)")
    parser.add_argument("--json", help="write the results here as well")
    parser.add_argument("--child", choices=["gpurnn", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        parser.error(f"unknown cells {unknown}; expected some of {list(CELLS)}")
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if any(len(s) != 4 for s in shapes):
        parser.error(f"each shape must be T,B,I,H, got {args.shapes!r}")
    print(f"load average at the start {os.getloadavg()}", flush=True)
    rows, blas = [], None
    for cell in cells:
        for shape in shapes:
            row = {"cell": cell, "shape": shape}
            rounds = {"gpurnn": [], "torch": []}
            for _ in range(args.rounds):
                for side in rounds:
                    res = _run_child(side, cell, shape, args.dtype,
                                     _repeat_for(shape, args.repeat), args.warmup, args.threads,
                                     args.clock)
                    side_blas = res.pop("blas")
                    if side == "gpurnn":
                        blas = side_blas
                    rounds[side].append(res)
            for side, results in rounds.items():
                row[side] = {key: sorted(r[key] for r in results)[len(results) // 2]
                             for key in ("train_ms", "infer_ms")}
                row[side]["rounds"] = results
            row["load"] = os.getloadavg()[0]  # one-minute load average as the row ended
            rows.append(row)
            print(_table([row]).splitlines()[-1], flush=True)
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                          "OMP_NUM_THREADS", "GLIBC_TUNABLES")}
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"dtype {args.dtype}, threads {args.threads or 'default'}, clock {args.clock}, "
          f"env {env}, load average {os.getloadavg()}\nBLAS of the gpurnn process: {blas}\n")
    print(_table(rows))
    if args.json:
        from gpurnn.engine.files import write_atomically  # the parent imports gpurnn only here

        report = {"env": env, "blas": blas, "dtype": args.dtype, "threads": args.threads,
                  "clock": args.clock, "rows": rows}
        write_atomically(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))


if __name__ == "__main__":
    main()
