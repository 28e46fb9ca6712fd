"""``gpurnn train --data``, ``gpurnn evaluate`` and ``gpurnn predict`` on the user's files:
the three commands of the README, the CSV format, predictions equal to ``Model.predict``,
resume, and every bad file answered with one line, exit 2 and nothing written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpurnn
from gpurnn.cli import main
from gpurnn.interop.datafiles import read_data

QUICK = ["--hidden", "5", "--batch", "8", "--device", "cpu", "--quiet"]


def _classification(rng, N=24, T=5):
    x = rng.standard_normal((N, T, 2)).astype(np.float32)
    return x, (x[:, :, 0].sum(axis=1) > 0).astype(np.int64)


def test_train_evaluate_predict_on_an_npz(tmp_path, rng, capsys):
    x, y = _classification(rng)
    lengths = rng.integers(1, 6, size=len(x))
    np.savez(tmp_path / "x.npz", x=x, y=y, lengths=lengths, x_val=x[:6], y_val=y[:6])
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "x.npz"), "--epochs", "2", "--out", str(run),
                 *QUICK]) == 0
    out, err = capsys.readouterr()
    assert "class labels per sequence (2 classes seen): classification, loss 'cross_entropy', " \
           "head 'last'" in err and "(loss and head inferred from y" in err
    assert "validation accuracy" in out
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert records[0]["config"]["loss"] == "cross_entropy"
    assert [r["step"] for r in records if "test" in r and "loss" in r] == [3, 6]  # per epoch

    assert main(["evaluate", str(run), "--data", str(tmp_path / "x.npz"), "--device", "cpu"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    model = gpurnn.load_model(run)
    scores = model.evaluate(x, y, lengths)
    assert {k: float(v) for k, v in printed.items()} == pytest.approx(scores, rel=1e-5)

    preds = tmp_path / "preds.npz"
    assert main(["predict", str(run), "--data", str(tmp_path / "x.npz"), "--out", str(preds),
                 "--device", "cpu"]) == 0
    with np.load(preds) as written:
        assert np.array_equal(written["y_pred"], model.predict(x, lengths))
        assert np.array_equal(written["labels"], written["y_pred"].argmax(axis=1))
        assert np.array_equal(written["lengths"], lengths)


def _write_csv(path, rows, header="sequence,a,b,y"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def test_the_csv_format(tmp_path):
    per_sequence = tmp_path / "seq.csv"
    _write_csv(per_sequence, ["s1,0.5,1,", "s1,0.25,2,3", "s2,1e-3,-1,0", "s3,0,0,", "s3,1,1,",
                              "s3,2,2,1"])
    data = read_data(per_sequence)
    assert data["x"].shape == (3, 3, 2) and data["x"][0, 1, 0] == 0.25
    assert np.array_equal(data["lengths"], [2, 1, 3])
    assert data["y"].dtype == np.int64 and np.array_equal(data["y"], [3, 0, 1])
    assert list(data["sequence"]) == ["s1", "s2", "s3"]
    per_step = tmp_path / "step.csv"
    _write_csv(per_step, ["7,0.5,1,0.5,2", "7,0.25,2,1,3", "8,1,1,2,4"],
               header="sequence,a,b,y_1,y_2")
    data = read_data(per_step)
    assert data["y"].shape == (2, 2, 2) and data["y"].dtype == np.float64
    assert np.array_equal(data["y"][1, 0], [2, 4]) and np.array_equal(data["lengths"], [2, 1])
    inputs_only = tmp_path / "inputs.csv"
    _write_csv(inputs_only, ["a,1", "a,2"], header="sequence,value")
    assert set(read_data(inputs_only)) == {"x", "sequence"}


def test_train_predict_on_a_csv_in_subprocesses(tmp_path, rng):
    """The commands as a user types them, on a CSV of per-step regression targets."""
    rows = []
    for s in range(12):
        for t in range(int(rng.integers(2, 6))):
            v = rng.standard_normal()
            rows.append(f"seq{s},{v:.5f},{t},{2 * v:.5f}")
    _write_csv(tmp_path / "data.csv", rows, header="sequence,v,t,y")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}

    def gpurnn_cmd(*args):
        return subprocess.run([sys.executable, "-m", "gpurnn", *args], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path, env=env)

    train = gpurnn_cmd("train", "--data", "data.csv", "--epochs", "2", "--out", "run", *QUICK)
    assert train.returncode == 0, train.stderr
    assert "values per step" not in train.stderr and "1 value per step: regression" in train.stderr
    predict = gpurnn_cmd("predict", "run", "--data", "data.csv", "--out", "p.npz",
                         "--device", "cpu")
    assert predict.returncode == 0, predict.stderr
    data = read_data(tmp_path / "data.csv")
    with np.load(tmp_path / "p.npz") as written:
        expected = gpurnn.load_model(tmp_path / "run").predict(data["x"], data["lengths"])
        assert np.array_equal(written["y_pred"], expected)
        assert list(written["sequence"]) == [f"seq{s}" for s in range(12)]
        assert "labels" not in written.files


def test_resume_of_a_run_on_data_continues_exactly(tmp_path, rng):
    x, y = _classification(rng, N=20)
    np.savez(tmp_path / "x.npz", x=x, y=y)
    common = ["train", "--data", str(tmp_path / "x.npz"), *QUICK, "--val-split", "0.2"]
    assert main([*common, "--steps", "7", "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--steps", "3", "--out", str(tmp_path / "split")]) == 0  # mid-epoch
    assert main(["train", "--resume", str(tmp_path / "split"), "--steps", "7", "--quiet",
                 "--device", "cpu"]) == 0
    one, split = (gpurnn.load_model(tmp_path / d) for d in ("one", "split"))
    for k, v in one.state_dict().items():
        assert np.array_equal(split.state_dict()[k], v), k


def test_resume_refuses_a_data_file_that_changed(tmp_path, rng, capsys):
    x, y = _classification(rng, N=20)
    np.savez(tmp_path / "x.npz", x=x, y=y)
    run = ["train", "--data", str(tmp_path / "x.npz"), *QUICK, "--out", str(tmp_path / "run")]
    assert main([*run, "--steps", "3"]) == 0
    original = (tmp_path / "x.npz").read_bytes()
    np.savez(tmp_path / "x.npz", x=x[::-1], y=y[::-1])  # same shapes, other order
    capsys.readouterr()
    resume = ["train", "--resume", str(tmp_path / "run"), "--steps", "5", "--quiet",
              "--device", "cpu"]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "x.npz changed since this run started" in err and "Traceback" not in err
    (tmp_path / "x.npz").write_bytes(original)  # the file the run started on
    assert main(resume) == 0


def _npz(**arrays):
    def write(path, rng):
        x, y = _classification(rng, N=6)
        base = {"x": x, "y": y}
        base.update({k: (v(x, y) if callable(v) else v) for k, v in arrays.items()})
        np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return write


def _raw(content, suffix=".csv"):
    def write(path, rng):
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    write.suffix = suffix
    return write


BAD_FILES = [
    ("no x", _npz(x=None), "no array 'x'"),
    ("no y", _npz(y=None), "no targets (y)"),
    ("unknown name", _npz(lenghts=np.ones(6)), "unexpected array(s) ['lenghts']"),
    ("wrong rank", _npz(x=lambda x, y: x[:, 0, 0]),
     "must be float features [N, T, I], got shape (6,)"),
    ("lengths out of range", _npz(lengths=np.array([5, 5, 6, 1, 1, 1])),
     r"lengths must lie in [0, T=5]"),
    ("NaN in x", _npz(x=lambda x, y: np.where(np.arange(5)[:, None] == 3, np.nan, x)),
     "NaN or Inf value(s) (first at sequence 0, step 3)"),
    ("NaN in y", _npz(y=lambda x, y: np.where(np.arange(6) == 2, np.nan, 0.0)),
     "NaN or Inf value(s) (first at sequence 2)"),
    ("mismatched N", _npz(y=lambda x, y: y[:4]), "x has 6 sequences, y has shape (4,)"),
    ("wrong dtype", _npz(x=lambda x, y: x.astype(str)), "got dtype <U"),
    ("x_val without y_val", _npz(x_val=lambda x, y: x), "has x_val but no y_val"),
    ("object array", _npz(y=lambda x, y: np.array([None] * 6)), "not a readable .npz"),
    ("not a zip", _raw("garbage", ".npz"), "not a readable .npz"),
    ("other suffix", _raw("x", ".txt"), "must be a .npz or a .csv"),
    ("csv no sequence column", _raw("a,y\n1,2\n"), "no 'sequence' column"),
    ("csv not a number", _raw("sequence,a,y\ns,1,\ns,abc,2\n"), "line 3, column 'a': 'abc'"),
    ("csv NaN", _raw("sequence,a,y\ns,nan,2\n"), "NaN and Inf are not data"),
    ("csv sequence split", _raw("sequence,a,y\ns,1,1\nt,1,1\ns,1,1\n"),
     "line 4: sequence 's' continues"),
    ("csv targets mixed", _raw("sequence,a,y\ns,1,1\ns,2,\ns,3,1\n"),
     "line 3: no target here"),
    ("csv short row", _raw("sequence,a,y\ns,1\n"), "line 2: 2 fields"),
    ("csv binary", _raw(b"sequence,a\ns,\xff\xfe\n"), "not a readable CSV text file"),
]


@pytest.mark.parametrize("make,words", [(m, w) for _, m, w in BAD_FILES],
                         ids=[name for name, _, _ in BAD_FILES])
def test_bad_files_get_one_line_and_leave_nothing(make, words, tmp_path, rng, capsys,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / ("bad" + getattr(make, "suffix", ".npz"))
    make(path, rng)
    before = sorted(os.listdir(tmp_path))
    assert main(["train", "--data", str(path), "--epochs", "1", *QUICK]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpurnn train: error: ") and words in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no run directory, no gpurnn-runs


def test_evaluate_and_predict_refuse_bad_data_and_write_nothing(tmp_path, rng, capsys):
    x, y = _classification(rng)
    np.savez(tmp_path / "x.npz", x=x, y=y)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "x.npz"), "--epochs", "1", "--out", str(run),
                 *QUICK]) == 0
    np.savez(tmp_path / "three.npz", x=np.zeros((2, 4, 3), np.float32))
    np.savez(tmp_path / "classes.npz", x=x, y=y + 5)
    capsys.readouterr()
    cases = [(["predict", str(run), "--data", str(tmp_path / "three.npz")],
              "takes 2 features per step"),
             (["evaluate", str(run), "--data", str(tmp_path / "three.npz")], "no targets (y)"),
             (["evaluate", str(run), "--data", str(tmp_path / "classes.npz")],
              "y holds class 6, but the model has output_size=2"),
             (["evaluate", str(run)], "give --data FILE"),
             (["predict", str(tmp_path / "nowhere"), "--data", str(tmp_path / "x.npz")],
              "No such file")]
    for argv, words in cases:
        out = tmp_path / "p.npz"
        argv = argv + (["--out", str(out)] if argv[0] == "predict" else [])
        assert main(argv + ["--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)
        assert not out.exists()
    # a write that fails midway leaves neither the file nor a temporary
    out = tmp_path / "p.npz"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    import gpurnn.interop.datafiles as datafiles
    saved = datafiles.np.savez
    datafiles.np.savez = fail
    try:
        assert main(["predict", str(run), "--data", str(tmp_path / "x.npz"), "--out", str(out),
                     "--device", "cpu"]) == 2
    finally:
        datafiles.np.savez = saved
    assert "disk full" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.startswith((".p.npz", "p.npz"))]


def test_evaluate_a_task_run_on_its_test_set(tmp_path, capsys):
    assert main(["train", "--steps", "2", "--seq-len", "5", "--out", str(tmp_path), *QUICK]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path), "--device", "cpu"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    summary = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert float(printed["mse"]) == pytest.approx(summary["test"]["mse"], rel=1e-5)


def test_options_of_the_other_kind_of_run_are_refused(tmp_path, rng, capsys):
    x, y = _classification(rng)
    np.savez(tmp_path / "x.npz", x=x, y=y)
    assert main(["train", "--data", str(tmp_path / "x.npz"), "--task", "digits", *QUICK]) == 2
    assert "--task do not apply" in capsys.readouterr().err
    assert main(["train", "--loss", "mse", *QUICK]) == 2
    assert "--loss applies to --data runs only" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "x.npz"), "--head", "all", *QUICK]) == 2
    assert "the options ask for head='all'" in capsys.readouterr().err


def _readme_blocks():
    """The Python and bash blocks of the README's quickstart."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    quick = text[text.index("## Quickstart"):text.index("## Features")]
    blocks = quick.split("```")[1::2]
    python = next(b for b in blocks if b.startswith("python"))[len("python"):]
    bash = next(b for b in blocks if b.startswith("bash"))[len("bash"):]
    return python, [line.split("#")[0].split() for line in bash.strip().splitlines()]


def _shrunk(code, device):
    """The README's Python at test sizes on ``device``; every substitution must apply."""
    for old, new in [("500, 30, 8", "12, 6, 8"), ("x[:, -5:, 0]", "x[:, -2:, 0]"),
                     ("hidden_size=32", "hidden_size=3"), ("epochs=20", "epochs=2"),
                     ('head="last")', f'head="last", device="{device}")')]:
        assert old in code, f"the README's quickstart no longer holds {old!r}"
        code = code.replace(old, new)
    return code


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_readme_quickstart_runs(device, tmp_path, rng, capsys, monkeypatch):
    """The README's lines of Python and its three commands, at test sizes, on the CPU and on
    the CUDA backend (the simulator without a GPU)."""
    python, commands = _readme_blocks()
    scope = {}
    exec(_shrunk(python, device), scope)
    assert set(scope["model"].evaluate(scope["x"], scope["y"])) == {"loss", "mse"}
    assert scope["history"].params["loss"] == "mse" and len(scope["history"].epochs) == 2

    monkeypatch.chdir(tmp_path)
    x, y = _classification(rng, N=10, T=4)
    for name in ("x.npz", "test.npz", "new.npz"):
        np.savez(name, x=x, y=y)
    assert [c[:2] for c in commands] == [["gpurnn", "train"], ["gpurnn", "evaluate"],
                                         ["gpurnn", "predict"]]
    for argv in commands:
        extra = ["--hidden", "3", "--batch", "4", "--epochs", "1", "--quiet"] \
            if argv[1] == "train" else []
        assert main(argv[1:] + extra + ["--device", device]) == 0, argv
    with np.load("preds.npz") as written:
        model = gpurnn.load_model("runs/mine", device=device)
        assert np.array_equal(written["y_pred"], model.backend.to_numpy(model.predict(x)))


def test_a_checkpoint_of_model_fit_is_read_by_the_commands(tmp_path, rng, capsys):
    """fit(checkpoint_dir=...) in Python, then evaluate and predict on the command line;
    train --resume refuses it with a message (it holds no task nor data file)."""
    x, y = _classification(rng)
    model = gpurnn.Model("gru", 4, 2, input_size=2, head="last", seed=0)
    model.fit(x, y, epochs=1, checkpoint_dir=tmp_path / "run", progress=False)
    np.savez(tmp_path / "x.npz", x=x, y=y)
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "x.npz"),
                 "--device", "cpu"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert printed["accuracy"] == f"{model.evaluate(x, y)['accuracy']:.6g}"  # as printed
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "9", "--quiet"]) == 2
    assert "not of a gpurnn train run" in capsys.readouterr().err
