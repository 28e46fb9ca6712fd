"""Where the host time of ``gpurnn train`` goes, in steady state: the command run once to warm up
(kernels compiled or loaded, CUDA graphs captured, workspaces sized), then run again under
cProfile, whose table (most time spent in the function itself first) says which Python
functions and which library calls hold the steps up.  On a GPU the training step is bound by
the host (BENCHMARKS.md: the default task took 12.9 ms a step on an H200 against 2.4 on that
machine's CPU); a synchronising call shows up as time inside the CuPy or Numba call that waits.

    python benchmarks/profile_train.py --device cuda [--steps 300] [--top 30] [-- more train options]

The second run includes its own set-up (the model, the data, a checkpoint and the evaluations
every ``--steps``/10 steps, as ``gpurnn train`` does); its time per step is printed beside the
table.
"""
import argparse
import contextlib
import cProfile
import io
import pstats
import tempfile
import time

from gpurnn.cli import main as gpurnn_main

WARMUP_STEPS = 20


def train(device, steps, out, extra):
    """``gpurnn train`` in this process: (exit status, the lines it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = gpurnn_main(["train", "--device", device, "--quiet", "--steps", str(steps),
                              "--out", out, *extra])
    return status, printed.getvalue().splitlines()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=300, help="profiled training steps")
    parser.add_argument("--top", type=int, default=30, help="rows of the table")
    parser.add_argument("extra", nargs="*", help="further `gpurnn train` options (after --)")
    args = parser.parse_args()
    if args.steps < 1 or args.top < 1:
        parser.error(f"--steps and --top must be positive, got {args.steps} and {args.top}")
    with tempfile.TemporaryDirectory() as folder:
        train(args.device, WARMUP_STEPS, f"{folder}/warmup", args.extra)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        status, printed = train(args.device, args.steps, f"{folder}/profiled", args.extra)
        profile.disable()
        seconds = time.perf_counter() - start
    print(*(line for line in printed if line.startswith(("gpurnn train:", "done:"))), sep="\n")
    command = " ".join(["gpurnn train --device", args.device, *args.extra])
    print(f"{command}: {args.steps} steps in "
          f"{seconds:.2f} s under cProfile, {seconds / args.steps * 1e3:.2f} ms per step "
          f"(set-up and evaluations included); exit status {status}")
    table = io.StringIO()
    pstats.Stats(profile, stream=table).sort_stats("tottime").print_stats(args.top)
    print(table.getvalue())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
