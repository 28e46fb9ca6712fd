"""benchmarks/gpu_compare.py, torch_modules_compare.py and train_compare.py: without a GPU the
GPU runs say so and exit with status 2 (no traceback, nothing measured); with one, a tiny run
completes and prints its table.  train_compare.py also runs on the CPU, where a tiny run checks
that its torch.nn copy is the same model (the same first loss); so does profile_train.py, whose
table must name the time loops and the GEMMs."""
import json
import os
import subprocess
import sys

import pytest

from conftest import SIMULATOR

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _run(*args, script="gpu_compare.py"):
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not SIMULATOR, reason="a GPU is present: the tiny real run below applies")
def test_without_a_gpu_it_says_so_and_measures_nothing():
    done = _run("--shapes", "3,2,8", "--cells", "gru")
    assert done.returncode == 2
    assert "gpu_compare: no GPU, nothing measured:" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.skipif(SIMULATOR, reason="needs a GPU")
def test_tiny_run_on_the_gpu_completes():
    done = _run("--shapes", "3,2,8", "--cells", "gru", "lstm", "--variants",
                "default,fast+persistent,fast+persistent2,fast+graphs", "--warmup", "1",
                "--repeat", "3")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("default ", "fast+"))]
    assert len(rows) == 2 * 8  # printed as measured, then again in the final table
    graphed = [line for line in rows if line.startswith("fast+graphs")]
    # captured: the training forward, its backward and the inference forward
    assert all(int(line.split()[-1]) == 3 for line in graphed), graphed


def test_bad_arguments_are_refused():
    done = _run("--shapes", "3,2")
    assert done.returncode == 2 and "a shape is T,B,H (three ints), got '3,2'" in done.stderr
    done = _run("--variants", "turbo")
    assert done.returncode == 2
    assert "a variant is MODE[+persistent[N]][+fused][+graphs][+fp32]" in done.stderr
    done = _run("--variants", "fast+persistent0")  # at least one block
    assert done.returncode == 2 and "got 'fast+persistent0'" in done.stderr
    done = _run("--variants", "default+persistent")  # the default decides persistence itself
    assert done.returncode == 2 and "or default[+fp32], got 'default+persistent'" in done.stderr
    done = _run("--variants", "default+fused")  # fused steps are chosen by name only
    assert done.returncode == 2 and "got 'default+fused'" in done.stderr
    done = _run("--variants", "fast+tf32")  # TF32 is the default on both sides now
    assert done.returncode == 2 and "got 'fast+tf32'" in done.stderr


@pytest.mark.skipif(not SIMULATOR, reason="a GPU is present: the tiny real run below applies")
def test_torch_modules_compare_without_a_gpu_measures_nothing():
    done = _run("--cells", "RNN", script="torch_modules_compare.py")
    assert done.returncode == 2
    assert "torch_modules_compare: no GPU, nothing measured:" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.skipif(SIMULATOR, reason="needs a GPU")
def test_torch_modules_compare_runs_on_the_gpu_with_the_weights_in_place():
    done = _run("--cells", "RNN", "--warmup", "1", "--repeat", "2",
                script="torch_modules_compare.py")
    assert done.returncode == 0, done.stderr
    assert "weights in place yes" in done.stdout and "NO" not in done.stdout


@pytest.mark.parametrize("task,cell", [("charlm", "lstm"), ("adding", "gru-reset-after"),
                                       ("digits", "rnn")])
def test_train_compare_runs_the_same_model_in_torch(task, cell, tmp_path):
    out = tmp_path / "r.json"
    done = _run("--task", task, "--cell", cell, "--seq-len", "8", "--hidden", "8", "--batch",
                "3", "--layers", "2", "--steps", "2", "--warmup", "1", "--json", str(out),
                script="train_compare.py")
    assert done.returncode == 0, done.stderr
    assert "seq/s, speed-up" in done.stdout
    report = json.loads(out.read_text())
    first = report["first_loss"]
    assert abs(first["gpurnn"] - first["torch"]) <= 1e-4 * max(1.0, abs(first["torch"]))
    assert report["seq_per_s"]["gpurnn"] > 0 and report["seq_per_s"]["torch"] > 0


@pytest.mark.skipif(not SIMULATOR, reason="a GPU is present")
def test_train_compare_on_cuda_without_a_gpu_measures_nothing():
    done = _run("--device", "cuda", script="train_compare.py")
    assert done.returncode == 2 and "train_compare: no GPU, nothing measured:" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_profile_train_names_the_steps_functions():
    done = _run("--device", "cpu", "--steps", "4", "--top", "200", "--", "--hidden", "8",
                script="profile_train.py")
    assert done.returncode == 0, done.stderr
    head = done.stdout.splitlines()
    assert any(line.startswith("done: 4 steps") for line in head), head[:4]
    assert "gpurnn train --device cpu --hidden 8: 4 steps in" in done.stdout
    assert "ms per step" in done.stdout and "Ordered by: internal time" in done.stdout
    for function in ("loops.py", "backend.py"):  # the time loops and the GEMMs, profiled
        assert function in done.stdout, function


def test_profile_train_refuses_bad_arguments():
    done = _run("--steps", "0", script="profile_train.py")
    assert done.returncode == 2 and "--steps and --top must be positive" in done.stderr
