"""Fuzzing: the ``gpurnn`` command with random and malformed arguments and files, and the
loaders (``gpurnn.training.checkpoint``, ``gpurnn.from_onnx``) with mutated files.  Every case ends in a
clear error (non-zero exit and a message; ValueError subclasses from the loaders), never a
traceback or a hang.  Seeded, so a failure replays; the counts are printed (``pytest -s``)."""
import copy
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

import gpurnn
from gpurnn.training import checkpoint as ck
from gpurnn.cli import main

# NumPy's overflow warnings are expected: fuzzed options include learning rates that overflow.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

CASE_TIMEOUT_S = 60


class Hang(Exception):
    pass


@contextmanager
def _deadline(seconds, what):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s: {what}")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ the command line
def _bad_files(tmp_path):
    """Paths for --resume and --out: garbage, truncated and foreign checkpoints, odd places."""
    run = tmp_path / "good"
    assert main(["train", "--steps", "2", "--seq-len", "5", "--hidden", "4", "--batch", "3",
                 "--device", "cpu", "--quiet", "--out", str(run)]) == 0
    data = (run / "checkpoint.npz").read_bytes()
    files = {"garbage": os.urandom(300), "truncated": data[: len(data) // 3],
             "empty": b"", "pickle": b"\x80\x04\x95" + os.urandom(40),
             "zip-ish": b"PK\x03\x04" + os.urandom(100)}
    paths = [str(run), str(run / "checkpoint.npz")]
    for name, content in files.items():
        (tmp_path / f"{name}.npz").write_bytes(content)
        paths.append(str(tmp_path / f"{name}.npz"))
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "afile").write_text("x")
    paths += [str(tmp_path / "emptydir"), str(tmp_path / "missing.npz"), "", "/dev/null",
              str(tmp_path / "afile" / "below"), "\0bad"]
    return paths


NUMBERS = ["0", "-1", "-7", "nan", "inf", "-inf", "1e3", "0.5", "abc", "", "10**9", "1_000",
           "1000000000000", "99999999999999999999999", "0x10", " 3", "3 ", "1e-320", "2", "5"]
FLOATS = ["0", "-1", "nan", "inf", "-inf", "1e30", "1e-45", "abc", "", "1e400", "0x1p3"]
CHOICES = {"--task": ["adding", "copy", "digits", "nope", ""],
           "--cell": ["rnn", "lstm", "gru", "transformer", "LSTM"],
           "--device": ["cpu", "auto", "gpu", "tpu", ""],
           "--dtype": ["float32", "float64", "float16", "int8"],
           "--optimizer": ["sgd", "momentum", "adam", "lbfgs"],
           "--reduction": ["mean", "sum", "max"],
           "--on-nonfinite": ["stop", "skip", "raise", "ignore"]}
INTS = ["--seq-len", "--hidden", "--batch", "--layers", "--steps", "--eval-every",
        "--checkpoint-every", "--seed", "--tbptt", "--blas-threads"]
REALS = ["--lr", "--clip", "--clip-value", "--stop-at"]
#: a run small enough to train in well under a second; mutations are applied to it
BASE = {"train": ["--steps", "2", "--seq-len", "5", "--hidden", "4", "--batch", "3",
                  "--device", "cpu", "--quiet"],
        "gradflow": ["--seq-len", "5", "--hidden", "4", "--batch", "3", "--device", "cpu",
                     "--cells", "rnn,gru"]}
#: values that would make a valid but long run (not a hang, so not fuzzed): kept small
LONG_RUN = {"--steps": 3, "--seq-len": 40, "--batch": 64, "--hidden": 64, "--layers": 3,
            "--tbptt": None, "--eval-every": None, "--checkpoint-every": None, "--seed": None,
            "--blas-threads": None}


def _too_long(flag, value):
    """A valid value that would only make a long (or, mid-range, memory-hungry) run."""
    try:
        number = int(value)
    except ValueError:
        return False
    limit = LONG_RUN.get(flag)
    huge = number >= 10 ** 12  # refused before allocating: what the fuzz is for
    return limit is not None and limit < number and not huge


def _argv(rng, paths, out):
    command = rng.choice(["train"] * 8 + ["gradflow", "info", "", "nope", "--help-me"])
    argv = [command] if command else []
    options = list(BASE.get(command, BASE["train"]))
    for _ in range(1 if rng.random() < 0.6 else int(rng.integers(2, 4))):
        kind = rng.integers(8)
        if kind == 0:
            flag = str(rng.choice(INTS))
            options += [flag, str(rng.choice(NUMBERS))]
        elif kind == 1:
            options += [str(rng.choice(REALS)), str(rng.choice(FLOATS))]
        elif kind == 2:
            flag = str(rng.choice(list(CHOICES)))
            options += [flag, str(rng.choice(CHOICES[flag]))]
        elif kind == 3:
            options += ["--resume", str(rng.choice(paths))]
        elif kind == 4:
            options += ["--out", str(rng.choice(paths))]
        elif kind == 5:  # a flag without its value, at the end
            options.append(str(rng.choice(INTS + REALS + list(CHOICES) + ["--resume", "--out"])))
        elif kind == 6:
            options.append(str(rng.choice(["--unknown", "-x", "--steps=", "--hidden=-3", "--",
                                           "extra", "--gradflow", "--quiet=1", "-"])))
        else:  # a value without its flag, or a flag's value given to another
            i = int(rng.integers(len(options)))
            options.insert(i, str(rng.choice(NUMBERS + FLOATS)))
    # a run directory of its own unless one is given (never into the good run)
    if "--out" not in options and ("--resume" not in options or command != "train"):
        options += ["--out", out]
    if command == "info":
        options = [o for o in options if o in ("--unknown", "-x")]
    argv += options
    for flag, value in zip(argv, argv[1:]):
        if _too_long(flag, value):
            return None
    return argv


def test_cli_fuzz_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run given no usable --out (e.g. --resume "") writes here
    paths = _bad_files(tmp_path)
    rng = np.random.default_rng(2024)
    outcomes = {"exit 0": 0, "error exit": 0, "usage exit": 0}
    tried = 0
    while tried < 400:
        argv = _argv(rng, paths, str(tmp_path / f"run{tried}"))
        if argv is None:
            continue
        tried += 1
        capsys.readouterr()
        with _deadline(CASE_TIMEOUT_S, argv):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: usage and a message, exit 2
                code = exc.code
                assert code == 2, argv
                outcomes["usage exit"] += 1
                assert "error:" in capsys.readouterr().err, argv
                continue
        err = capsys.readouterr().err
        assert code in (0, 2, 3), (argv, code)
        if code == 0:
            outcomes["exit 0"] += 1
        else:
            outcomes["error exit"] += 1
            assert "error:" in err or "non-finite" in err or code == 3, (argv, err)
            assert "Traceback" not in err, (argv, err)
    assert outcomes["error exit"] > 20 and outcomes["usage exit"] > 100 and outcomes["exit 0"] > 5
    print(f"CLI fuzz (in process): {tried} argument lists: {outcomes}")


@pytest.mark.parametrize("argv,message", [
    (["train", "--hidden", "1000000000", "--layers", "3"], "Lower --hidden or --layers"),
    (["train", "--resume", "{bad}/garbage.npz"], "not a readable checkpoint"),
    (["train", "--resume", "{bad}/missing"], "No such file"),
    (["train", "--resume", ""], "No such file"),
    (["train", "--out", "{bad}/afile/below", "--steps", "1"], "Not a directory"),
    (["train", "--lr", "nan"], "expected a positive number"),
    (["gradflow", "--seq-len", "0"], "expected a positive integer"),
])
def test_cli_fuzz_cases_in_a_real_process(tmp_path, argv, message):
    """The command as a user runs it: a message, a non-zero exit, no traceback, bounded time."""
    (tmp_path / "garbage.npz").write_bytes(os.urandom(200))
    (tmp_path / "afile").write_text("x")
    argv = [a.replace("{bad}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "gpurnn", *argv, "--device", "cpu", "--quiet"]
                          if argv[0] == "train" else [sys.executable, "-m", "gpurnn", *argv],
                          capture_output=True, text=True, timeout=CASE_TIMEOUT_S, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ the loaders
def _mutations(data, rng, n):
    """n mutated copies of ``data``: flipped, overwritten, inserted and deleted bytes,
    truncations, spliced garbage, duplicated ranges."""
    for i in range(n):
        b = bytearray(data)
        kind = i % 6
        if kind == 0:
            for _ in range(rng.integers(1, 8)):
                b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            pos = int(rng.integers(len(b)))
            b[pos:pos + 8] = rng.bytes(8)
        elif kind == 2:
            pos = int(rng.integers(len(b)))
            b[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        elif kind == 3:
            pos = int(rng.integers(len(b)))
            del b[pos:pos + int(rng.integers(1, 64))]
        elif kind == 4:
            b = b[:rng.integers(len(b))] + rng.bytes(int(rng.integers(0, 32)))
        else:
            a, c = sorted(rng.integers(0, len(b), 2).tolist())
            b = b[:c] + b[a:c] + b[c:]
        yield bytes(b)


def test_checkpoint_loader_fuzz(tmp_path):
    from gpurnn.nn.optim import Momentum
    from gpurnn.training.tasks import make_task, model_for_task

    model = model_for_task(make_task("adding", 5), "lstm", hidden_size=5, seed=0)
    opt = Momentum(model.params, model.grads, lr=0.1)
    good = tmp_path / "good.npz"
    ck.save_checkpoint(good, model, opt, 3, np.random.default_rng(0), {"task": "adding"})
    original = ck.load_checkpoint(good)
    rng = np.random.default_rng(99)
    path = tmp_path / "fuzzed.npz"
    refused = intact = 0
    for data in _mutations(good.read_bytes(), rng, 600):
        path.write_bytes(data)
        try:
            loaded = ck.load_checkpoint(path)
        except ck.CheckpointError:
            refused += 1
            continue
        for k, v in original["model"].items():  # accepted only if the content is intact
            assert np.array_equal(loaded["model"][k], v), k
        assert loaded["step"] == 3 and loaded["rng_state"] == original["rng_state"]
        intact += 1
    assert refused > 500
    print(f"checkpoint loader fuzz: {refused + intact} mutated files, {refused} refused, "
          f"{intact} with only metadata bytes changed loaded intact")


def _onnx_structure_mutation(model, rng):
    import onnx

    g = model.graph
    kind = int(rng.integers(7))
    if kind == 0 and len(g.node):
        node = g.node[rng.integers(len(g.node))]
        if len(node.attribute):
            a = node.attribute[rng.integers(len(node.attribute))]
            if a.type == onnx.AttributeProto.INT:
                a.i = int(rng.choice([0, -1, 10 ** 12, 2 ** 62, 5, 7]))
            elif a.type == onnx.AttributeProto.STRING:
                a.s = bytes(rng.choice([b"", b"reverse", b"x", b"bidirectional"]))
            else:
                a.type = onnx.AttributeProto.GRAPH
    elif kind == 1 and len(g.initializer):
        t = g.initializer[rng.integers(len(g.initializer))]
        if len(t.dims):
            t.dims[rng.integers(len(t.dims))] = int(rng.choice([0, 1, 10 ** 9, 3, 16]))
    elif kind == 2 and len(g.initializer):
        del g.initializer[rng.integers(len(g.initializer))]
    elif kind == 3 and len(g.node):
        g.node[rng.integers(len(g.node))].op_type = str(
            rng.choice(["RNN", "LSTM", "GRU", "Identity", "Transpose"]))
    elif kind == 4 and len(g.node):
        node = g.node[rng.integers(len(g.node))]
        if len(node.input):
            node.input[rng.integers(len(node.input))] = str(rng.choice(["", "X", "W", "nope"]))
    elif kind == 5 and len(g.node):
        del g.node[rng.integers(len(g.node))]
    elif len(g.initializer):
        g.initializer[rng.integers(len(g.initializer))].data_type = int(
            rng.choice([1, 11, 7, 10, 16, 8]))


def test_from_onnx_fuzz(tmp_path):
    onnx = pytest.importorskip("onnx")
    rng = np.random.default_rng(5)
    path = tmp_path / "fuzzed.onnx"
    bases = []
    for i, layer in enumerate([gpurnn.GRU(3, 4, seed=0),
                               gpurnn.LSTM(3, 4, num_layers=2, bidirectional=True, seed=0),
                               gpurnn.RNN(3, 4, nonlinearity="relu", seed=0)]):
        layer.to_onnx(tmp_path / f"base{i}.onnx")
        bases.append(onnx.load(str(tmp_path / f"base{i}.onnx")))
    refused = loaded = 0
    cases = [data for base in bases for data in _mutations(base.SerializeToString(), rng, 100)]
    for i in range(600):
        model = copy.deepcopy(bases[i % len(bases)])
        for _ in range(rng.integers(1, 4)):
            _onnx_structure_mutation(model, rng)
        cases.append(model.SerializeToString())
    for data in cases:
        path.write_bytes(data)
        try:
            gpurnn.from_onnx(path)
            loaded += 1
        except ValueError:
            refused += 1
    assert refused > 0.8 * len(cases)
    print(f"from_onnx fuzz: {len(cases)} mutated models (300 byte-level, 600 structural), "
          f"{refused} refused with ValueError, {loaded} still a valid gpurnn graph")
