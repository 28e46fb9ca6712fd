"""``gpurnn study`` on tiny grids: the table, JSON and figures hold what the runs' metrics say,
a killed study resumes to the result of an uninterrupted one, bad arguments are refused."""
import json
import os

import numpy as np
import pytest

from conftest import SIMULATOR

from gpurnn.cli import commands as cli
from gpurnn.cli import main
from gpurnn.cli.study import matching_hidden, parameter_count, prepare_run, read_records
from gpurnn.training import checkpoint
from gpurnn.training.checkpoint import load_checkpoint
from gpurnn.training.tasks import Adding, make_task

TINY = ["--lengths", "6", "--seeds", "1", "--hidden", "5", "--batch", "4", "--steps", "6",
        "--eval-every", "2", "--gradflow-batch", "2"]
PNG = b"\x89PNG\r\n\x1a\n"
TIMINGS = ("seq_per_s", "wall_s", "train_s", "train_s_median", "wall_s_median",
           "seq_per_s_median")


def _study(out, *extra, device="cpu"):
    return main(["study", "adding", "--cells", "rnn,lstm", "--match-params", "", *TINY,
                 "--device", device, "--out", str(out), *extra])


def _runs(out):
    return sorted(os.listdir(os.path.join(out, "runs")))


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_tiny_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert _study(out, "--threshold", "0.3", "--full-budget") == 0
    assert _runs(out) == ["lstm-h5-T6-seed0", "rnn-h5-T6-seed0"]
    for name in ("curves.png", "gradflow.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    result = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert result["info"]["command"].startswith("gpurnn study adding --cells rnn,lstm")
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        run_dir = out / "runs" / f"{row['cell']}-h5-T6-seed0"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
                   .splitlines()]
        tests = [(r["step"], r["test"]["mse"]) for r in records if "test" in r and "loss" in r]
        assert [s for s, _ in tests] == [2, 4, 6]  # --full-budget: all 6 steps
        best = min(v for _, v in tests)
        assert row["best"] == {"median": best, "min": best, "max": best}
        first = next((s for s, v in tests if v <= 0.3), None)
        assert row["steps_to_threshold_per_seed"] == [first]
        assert row["reached"] == (first is not None)
        ckpt = load_checkpoint(run_dir / "checkpoint.npz")
        assert row["params"] == sum(a.size for a in ckpt["model"].values())
        assert row["params"] == parameter_count(row["cell"], 5, make_task("adding", 6))
        step_times = sum(4 / r["seq_per_s"] for r in records if "loss" in r)
        assert row["train_s_median"] == pytest.approx(step_times)
        assert row["wall_s_median"] == next(r["wall_s"] for r in records if r.get("summary"))
        assert row["devices"] == ["cpu"]
        label = f"| {row['cell']} | 5 | {row['params']} | 6 | {best:.3g} ({best:.3g}-{best:.3g}) |"
        assert label in table
        flow = json.loads((run_dir / "gradflow.json").read_text())
        assert len(flow["init"]) == len(flow["trained"]) == 6 and flow["trained_step"] == 6
        assert result["gradflow"]["curves"][f"{row['cell']} H=5"] == flow
    assert "lstm H=5 T=6 seed 0: trained" in capsys.readouterr().err


def test_runs_stop_at_the_threshold(tmp_path):
    # Every model beats an MSE of 100 at the first evaluation: each run stops there.
    assert _study(tmp_path, "--threshold", "100", "--gradflow-batch", "0") == 0
    result = json.loads((tmp_path / "results.json").read_text())
    for row in result["rows"]:
        assert row["steps_to_threshold_per_seed"] == [2]
        assert row["steps_trained_per_seed"] == [2]
        assert "| 2 | " in (tmp_path / "table.md").read_text()
    assert result["gradflow"] is None and not (tmp_path / "gradflow.png").exists()


def test_killed_study_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    assert _study(tmp_path / "whole") == 0
    killed = tmp_path / "killed"
    save = checkpoint.save_checkpoint
    saves = []

    def save_then_die(path, *args, **kwargs):  # the kill: in the second run, at step 4
        saves.append(path)
        if "lstm" in str(path) and sum("lstm" in str(p) for p in saves) == 2:
            raise KeyboardInterrupt
        save(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _study(killed)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    lstm_metrics = killed / "runs" / "lstm-h5-T6-seed0" / "metrics.jsonl"
    with open(lstm_metrics, "a") as f:
        f.write('{"step": 5, "lo')  # a record cut short by the kill
    assert load_checkpoint(lstm_metrics.parent / "checkpoint.npz")["step"] == 2
    rnn_metrics = (killed / "runs" / "rnn-h5-T6-seed0" / "metrics.jsonl").read_bytes()

    calls = []
    train = cli.cmd_train
    monkeypatch.setattr(cli, "cmd_train", lambda args: calls.append(args) or train(args))
    assert _study(killed) == 0
    assert [(a.resume, a.steps) for a in calls] == [(str(lstm_metrics.parent), 6)]
    assert (killed / "runs" / "rnn-h5-T6-seed0" / "metrics.jsonl").read_bytes() == rnn_metrics
    for run in _runs(tmp_path / "whole"):
        a, b = (load_checkpoint(d / "runs" / run / "checkpoint.npz")
                for d in (tmp_path / "whole", killed))
        assert a["step"] == b["step"] == 6
        for name, value in a["model"].items():
            assert np.array_equal(b["model"][name], value), (run, name)
        steps = [[_without_timings(r) for r in read_records(d / "runs" / run / "metrics.jsonl")[0]
                  if "loss" in r] for d in (tmp_path / "whole", killed)]
        assert steps[0] == steps[1] and [r["step"] for r in steps[0]] == [1, 2, 3, 4, 5, 6]
    whole, again = (json.loads((d / "results.json").read_text())
                    for d in (tmp_path / "whole", killed))
    assert _without_timings(whole["rows"]) == _without_timings(again["rows"])
    assert _without_timings(whole["runs"]) == _without_timings(again["runs"])
    assert whole["gradflow"] == again["gradflow"]


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"config": {}, "start": 0}\n{"step": 1, "lo')
    assert prepare_run(str(run_dir), {"task": "adding"}, 6) == "new"
    assert os.listdir(run_dir) == []
    assert prepare_run(str(tmp_path / "absent"), {"task": "adding"}, 6) == "new"


def test_a_study_directory_refuses_other_options(tmp_path, capsys):
    assert _study(tmp_path, "--gradflow-batch", "0") == 0
    capsys.readouterr()
    assert _study(tmp_path, "--gradflow-batch", "0", "--lr", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "holds a study with other options: lr 0.5 (the study there: 0.01)" in err[0]


@pytest.mark.parametrize("argv,message", [
    (["--lengths", "50,x"], "--lengths must be comma-separated integers, got '50,x'"),
    (["--lengths", "1"], "the adding problem needs seq_len >= 2, got 1"),
    (["--cells", "rnn,transformer"], "--cells must be comma-separated cells of"),
    (["--match-params", "gru,lstmm"], "--match-params must be comma-separated cells of"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--gradflow-batch", "-1"], "--gradflow-batch must be >= 0, got -1"),
])
def test_bad_arguments_give_one_error_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # where the default study directory would go
    assert main(["study", "adding", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpurnn study: error: ") and message in err[0]
    assert os.listdir(tmp_path) == []  # refused before anything ran


def test_equal_parameters_picks_the_closest_hidden_size():
    task = make_task("adding", 10)
    target = parameter_count("lstm", 64, task)
    for cell in ("gru", "gru-reset-after", "rnn"):
        hidden, count = matching_hidden(cell, target, task)
        assert count == parameter_count(cell, hidden, task)
        best = min(range(1, 200), key=lambda h: abs(parameter_count(cell, h, task) - target))
        assert abs(count - target) == abs(parameter_count(cell, best, task) - target)
    assert matching_hidden("gru", target, task) == (74, 17391) and target == 17473


def test_train_builds_the_reset_after_gru(tmp_path):
    assert main(["train", "--cell", "gru-reset-after", "--seq-len", "5", "--hidden", "4",
                 "--batch", "2", "--steps", "2", "--device", "cpu", "--quiet", "--out",
                 str(tmp_path)]) == 0
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    assert ckpt["architecture"]["reset_after"] is True
    assert ckpt["config"]["cell"] == "gru-reset-after"
    assert main(["train", "--resume", str(tmp_path), "--steps", "3", "--quiet"]) == 0


@pytest.mark.skipif(not SIMULATOR, reason="runs the CUDA path under Numba's simulator only")
def test_the_same_command_runs_on_the_cuda_path(tmp_path, monkeypatch):
    # 8 test sequences, not 1000: the simulator runs a thread per (sequence, unit)
    monkeypatch.setattr(Adding, "test_batches",
                        lambda self: [self.batch(np.random.default_rng(0), 8)])
    assert main(["study", "adding", "--cells", "gru", "--match-params", "", "--lengths", "3",
                 "--seeds", "1", "--hidden", "3", "--batch", "2", "--steps", "2",
                 "--eval-every", "2", "--gradflow-batch", "1", "--device", "cuda", "--out",
                 str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"][0]["devices"] == ["cuda"]
