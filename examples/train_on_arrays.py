"""gpurnn on your own data, two ways (docs/training.md, "Your own data"):

1. a sequence classifier on scikit-learn's 8x8 digits, loaded as arrays: each image is a
   sequence of 8 rows of 8 pixels, one label per sequence;
2. a regressor on a CSV this script writes itself: noisy sine waves of 20 to 60 steps, one
   row per step, the target (the wave's frequency) on each sequence's last row.

    python examples/train_on_arrays.py [--device cpu|cuda|auto] [--out DIR]

Prints each model's test figures beside a baseline, the wall time, the machine and the commit.
"""
import argparse
import os
import platform
import subprocess
import time

import numpy as np
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

import gpurnn


class _Clock:
    """Wall and CPU time since it was made (the CPU time says more on a busy machine)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __str__(self):
        return (f"{time.perf_counter() - self.wall:.1f} s ({time.process_time() - self.cpu:.1f} s "
                f"of CPU)")


def digits(device, epochs):
    images = load_digits()
    x = (images.images / 16.0).astype(np.float32)  # [1797, 8, 8]: 8 steps of 8 pixels
    y = images.target  # [1797] class labels
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:360], order[360:]
    model = gpurnn.Model("lstm", hidden_size=64, output_size=10, input_size=8, head="last",
                         device=device, seed=0)
    clock = _Clock()
    model.fit(x[train], y[train], epochs=epochs, batch_size=32, lr=1e-2, validation_split=0.1,
              progress=False)
    scores = model.evaluate(x[test], y[test])
    predicted = model.predict(x[test]).argmax(axis=1)  # the labels, from the logits [N, 10]
    assert np.mean(predicted == y[test]) == scores["accuracy"]
    majority = np.mean(y[test] == np.bincount(y[train]).argmax())
    return (f"digits: test accuracy {scores['accuracy']:.4f} on {len(test)} images "
            f"(majority class: {majority:.4f}), {epochs} epochs in {clock}")


def write_waves_csv(path, n=600, seed=1):
    """Noisy sines sin(2 pi f t + phase) of 20..60 steps, f uniform in [0.02, 0.2]: one row
    per step (columns sequence, value), the frequency as y on each sequence's last row."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        f.write("sequence,value,y\n")
        for s in range(n):
            T = int(rng.integers(20, 61))
            freq = rng.uniform(0.02, 0.2)
            t = np.arange(T)
            values = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
            values += 0.1 * rng.standard_normal(T)
            for i, v in enumerate(values):
                f.write(f"wave{s},{v:.5f},{freq:.5f}\n" if i == T - 1 else f"wave{s},{v:.5f},\n")


def waves(device, epochs, out):
    path = os.path.join(out, "waves.csv")
    write_waves_csv(path)
    data = gpurnn.read_data(path)  # x [600, 60, 1], lengths [600], y [600, 1]
    x, y, lengths = data["x"], data["y"], data["lengths"]
    train, test = slice(0, 480), slice(480, None)
    model = gpurnn.Model("gru", hidden_size=32, output_size=1, input_size=1, head="last",
                         device=device, seed=0)
    clock = _Clock()
    model.fit(x[train], y[train], lengths[train], epochs=epochs, batch_size=32, lr=1e-2,
              progress=False)
    mse = model.evaluate(x[test], y[test], lengths[test])["mse"]
    baseline = float(np.mean((y[test] - y[train].mean()) ** 2))
    return (f"waves.csv: test MSE {mse:.2e} of the frequency on {len(y[test])} waves "
            f"(predicting the mean: {baseline:.2e}), {epochs} epochs in {clock}")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{cpu}, {os.cpu_count()} cores, gpurnn {gpurnn.__version__} at commit {commit}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", default=".", help="where waves.csv is written")
    parser.add_argument("--digits-epochs", type=int, default=30)
    parser.add_argument("--waves-epochs", type=int, default=40)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # One BLAS thread, as gpurnn train uses: the per-step products are small, and threads
    # spinning against each other cost more than they bring (docs/training.md).  The limit
    # covers the BLAS libraries loaded when it is set: SciPy's too, imported with sklearn above.
    with threadpool_limits(limits=1, user_api="blas"):
        print(digits(args.device, args.digits_epochs))
        print(waves(args.device, args.waves_epochs, args.out))
    print(f"device {gpurnn.get_backend(args.device).name}; {machine()}")


if __name__ == "__main__":
    main()
