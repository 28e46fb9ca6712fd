"""The ``gpurnn`` command end to end on tiny sizes: train (files written, resume continues
exactly, option clashes refused), gradflow, info."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpurnn.training.checkpoint import load_checkpoint
from gpurnn.cli import main

TINY = ["--seq-len", "5", "--hidden", "6", "--batch", "4", "--device", "cpu", "--quiet"]


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_end_to_end_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gpurnn", "train", "--steps", "3", "--out",
                           str(out), "--gradflow", *TINY], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "done: 3 steps" in proc.stdout and "test mse" in proc.stdout
    for name in ("metrics.jsonl", "checkpoint.npz", "loss.png", "gradflow.png", "gradflow.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = _records(out / "metrics.jsonl")
    assert records[0]["config"]["task"] == "adding"
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert records[-1]["summary"] and records[-1]["step"] == 3
    assert load_checkpoint(out / "checkpoint.npz")["step"] == 3
    flow = json.loads((out / "gradflow.json").read_text())
    assert [g["label"] for g in flow] == ["step 0", "step 3"] and len(flow[0]["norms"]) == 5


@pytest.mark.parametrize("task,extra", [("digits", ["--hidden", "6"]),
                                        ("copy", ["--seq-len", "7", "--hidden", "6"])])
def test_train_other_tasks(tmp_path, task, extra, capsys):
    rc = main(["train", "--task", task, "--steps", "2", "--batch", "3", "--device", "cpu",
               "--quiet", "--out", str(tmp_path), *extra])
    assert rc == 0
    assert "test accuracy" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path):
    common = ["train", "--cell", "gru", "--optimizer", "momentum", *TINY]
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "split")]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--steps", "4", "--quiet",
                 "--device", "cpu"]) == 0
    one = load_checkpoint(tmp_path / "one" / "checkpoint.npz")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.npz")
    assert one["step"] == split["step"] == 4
    for k, v in one["model"].items():
        assert np.array_equal(split["model"][k], v), k
    assert one["rng_state"] == split["rng_state"]
    steps = [r["step"] for r in _records(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_resume_refuses_other_options_and_finished_runs(tmp_path, capsys):
    assert main(["train", "--steps", "2", "--out", str(tmp_path), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path), "--hidden", "9", "--steps", "3"]) == 2
    assert "--hidden 9 (checkpoint: 6)" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--steps", "2", "--quiet"]) == 2
    assert "give --steps above it" in capsys.readouterr().err
    assert main(["train", "--steps", "2", "--out", str(tmp_path), *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    assert main(["train", "--resume", str(tmp_path / "broken.npz"), "--steps", "3"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_gradflow_command(tmp_path, capsys):
    assert main(["gradflow", "--seq-len", "6", "--hidden", "5", "--batch", "2", "--device",
                 "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rnn" in out and "lstm" in out and "gru" in out
    data = json.loads((tmp_path / "gradflow.json").read_text())
    assert sorted(data["curves"]) == ["gru", "lstm", "rnn"]
    assert all(len(v) == 6 and all(x > 0 for x in v) for v in data["curves"].values())
    assert (tmp_path / "gradflow.png").stat().st_size > 0


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import gpurnn

    assert f"gpurnn {gpurnn.__version__}" in out and "numba" in out
    reason = gpurnn.cuda_unavailable_reason()
    assert (reason in out) if reason else ("cuda" in out)


def test_info_says_how_the_cuda_backend_runs(monkeypatch):
    """The line ``gpurnn info`` prints under a usable GPU: launch mode, graphs or why not, the
    fused step kernels when on, and the GEMMs' precision (here through the simulator's backend,
    which captures nothing)."""
    from gpurnn.cli.commands import _cuda_paths
    from gpurnn.engine.backend import get_backend

    be = get_backend("cuda")
    monkeypatch.setattr(be, "tf32", True)
    line = _cuda_paths()
    assert line.startswith(f"launch={be.launch}, ")
    if be.simulator:
        assert "no CUDA graphs (Numba's CUDA simulator captures nothing)" in line
    assert line.endswith("TF32 GEMMs (GPURNN_TF32=0: strict float32)")
    monkeypatch.setattr(be, "graphs", False)
    monkeypatch.setattr(be, "tf32", False)
    line = _cuda_paths()
    assert "no CUDA graphs" in line and line.endswith("strict float32 GEMMs")
    assert "fused" not in line  # off unless asked for
    monkeypatch.setattr(be, "fused", True)
    assert ", fused step kernels (GPURNN_FUSED_STEPS=1), strict float32 GEMMs" in _cuda_paths()


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("gpurnn") == "gpurnn.cli:main"


def test_bad_options_exit_with_a_message(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default run directory would go
    with pytest.raises(SystemExit):
        main(["train", "--cell", "transformer"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])
    assert "positive integer" in capsys.readouterr().err
    assert main(["train", "--task", "digits", "--seq-len", "5", "--quiet"]) == 2
    assert "seq_len must be 8" in capsys.readouterr().err
    assert not os.path.exists("gpurnn-runs")  # a refused run leaves nothing behind
