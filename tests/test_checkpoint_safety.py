"""Checkpoints are data, never code, and a save killed at any moment loses nothing.

Loading never unpickles; truncated, bit-flipped, forged or mismatched files (other shapes,
cell, options, version, a plain npz, a pickle or a .npy renamed, an empty file, a directory,
compressed or oversized entries) are refused with ``CheckpointError`` (a ValueError); real
save processes are SIGKILLed at random moments and the file left behind is always one
complete save."""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from gpurnn.training import checkpoint as ck
from gpurnn.nn.optim import Adam
from gpurnn.training.tasks import make_task, model_for_task

MARKER = "unpickled-marker"


class _Payload:
    """Unpickling this would call os.mkdir(MARKER): a stand-in for arbitrary code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def _run(cell="gru", hidden=7, seed=0, **options):
    task = make_task("adding", 6)
    model = model_for_task(task, cell, hidden_size=hidden, seed=seed, **options)
    return model, Adam(model.params, model.grads, lr=1e-2), np.random.default_rng([seed, 2])


def _saved(tmp_path, name="c.npz", **kw):
    model, opt, rng = _run(**kw)
    path = tmp_path / name
    ck.save_checkpoint(path, model, opt, 4, rng, {"task": "adding"})
    return path


def _write_forged(path, arrays, meta):
    """An archive with a valid checksum over whatever it holds (anyone can compute one)."""
    payload = dict(arrays, meta=np.array(meta if isinstance(meta, str) else json.dumps(meta)))
    payload["sha256"] = np.array(ck._digest(payload))
    np.savez(path, **payload)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _saved(tmp_path)
    arrays, meta = ck.load_arrays(good)
    evil = dict(arrays)
    evil["model/head.bias"] = np.array([_Payload(MARKER)], dtype=object)
    payload = dict(evil, meta=np.array(json.dumps(meta)))
    payload["sha256"] = np.array("0" * 64)
    np.savez(tmp_path / "object.npz", **payload)  # NumPy pickles the object entry
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps(_Payload(MARKER)))
    with pytest.raises(ck.CheckpointError, match="holds Python objects"):
        ck.load_checkpoint(tmp_path / "object.npz")
    with pytest.raises(ck.CheckpointError, match="looks like a Python pickle"):
        ck.load_checkpoint(tmp_path / "pickle.npz")
    assert not (tmp_path / MARKER).exists()
    pickle.loads(pickle.dumps(_Payload(MARKER)))  # the payload is live: it would have run
    assert (tmp_path / MARKER).exists()


def test_files_that_are_not_checkpoints(tmp_path):
    good = _saved(tmp_path)
    arrays, meta = ck.load_arrays(good)
    cases = {
        "empty.npz": (b"", "not a readable checkpoint"),
        "text.npz": (b"step=4\nweights=...\n", "not a readable checkpoint"),
        "array.npz": (None, "single .npy array"),
        "plain.npz": (None, "no meta/sha256"),
        "compressed.npz": (None, "is compressed"),
        "textentry.npz": (None, "is not a .npy array"),
    }
    np.save(tmp_path / "array.npy", np.zeros(3))
    os.replace(tmp_path / "array.npy", tmp_path / "array.npz")
    np.savez(tmp_path / "plain.npz", x=np.zeros(2))
    np.savez_compressed(tmp_path / "compressed.npz", **arrays, meta=np.array(json.dumps(meta)))
    with zipfile.ZipFile(tmp_path / "textentry.npz", "w") as zf:
        zf.writestr("meta.txt", "{}")
    for name, (data, message) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(ck.CheckpointError, match=message):
            ck.load_checkpoint(tmp_path / name)
    with pytest.raises(ck.CheckpointError, match="Is a directory"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.npz")


def test_a_forged_header_cannot_make_numpy_allocate(tmp_path):
    """An entry whose .npy header declares a huge shape is refused before NumPy allocates it."""
    good = _saved(tmp_path)
    arrays, meta = ck.load_arrays(good)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": (10 ** 12,)})
    forged = tmp_path / "huge.npz"
    with zipfile.ZipFile(forged, "w") as zf:
        zf.writestr("model/x.npy", buf.getvalue() + b"\0" * 64)
    with pytest.raises(ck.CheckpointError, match=r"declares shape \(1000000000000,\)"):
        ck.load_checkpoint(forged)


def test_truncations_and_bit_flips(tmp_path):
    """Every truncation is refused; every flipped byte is refused or (a byte of zip metadata
    that carries no data, such as a timestamp) loads exactly the original content."""
    good = _saved(tmp_path)
    data = good.read_bytes()
    original = ck.load_checkpoint(good)
    rng = np.random.default_rng(7)
    bad = tmp_path / "bad.npz"
    cuts = sorted({0, 1, 21, len(data) - 1, *rng.integers(1, len(data), 40).tolist()})
    for cut in cuts:
        bad.write_bytes(data[:cut])
        with pytest.raises(ck.CheckpointError):
            ck.load_checkpoint(bad)
    refused = 0
    positions = rng.integers(0, len(data), 150)
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        bad.write_bytes(bytes(flipped))
        try:
            loaded = ck.load_checkpoint(bad)
        except ck.CheckpointError:
            refused += 1
            continue
        assert loaded["step"] == original["step"]
        for k, v in original["model"].items():
            assert np.array_equal(loaded["model"][k], v), (pos, k)
    assert refused > len(positions) // 2  # most bytes are data
    print(f"bad inputs: {len(cuts)} truncations, {len(positions)} bit flips ({refused} refused, "
          f"the rest metadata-only and loaded intact)")


@pytest.mark.parametrize("mutate,message", [
    (lambda m: "[1, 2]", "must be a JSON object"),
    (lambda m: "{" * 5 + "not json", "not valid JSON"),
    (lambda m: {**m, "step": "4"}, "step must be int"),
    (lambda m: {**m, "step": -1}, "step must be >= 0"),
    (lambda m: {k: v for k, v in m.items() if k != "optimizer"}, "optimizer must be dict"),
    (lambda m: {**m, "optimizer": {**m["optimizer"], "t": 1.5}}, "t must be int"),
    (lambda m: {**m, "config": None}, "config must be dict"),
    (lambda m: {**m, "version": 2}, "format version 2"),
    (lambda m: {**m, "format": "other"}, "has format 'other'"),
    (lambda m: {**m, "loss_scale": [1]}, "loss_scale must be dict"),
    (lambda m: {**m, "loss_scale": {"scale": -2.0, "skipped": 0, "good_steps": 0}},
     "loss_scale scale must be > 0"),
    (lambda m: {**m, "loss_scale": {"scale": 2.0, "skipped": 0, "good_steps": "3"}},
     "loss_scale good_steps must be int"),
])
def test_forged_meta_is_refused(tmp_path, mutate, message):
    arrays, meta = ck.load_arrays(_saved(tmp_path))
    path = tmp_path / "forged.npz"
    _write_forged(path, arrays, mutate(meta))
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_checkpoint(path)


def test_forged_entries_and_generator_state(tmp_path):
    arrays, meta = ck.load_arrays(_saved(tmp_path))
    path = tmp_path / "forged.npz"
    _write_forged(path, {**arrays, "model/head.bias": np.array(["a"])}, meta)
    with pytest.raises(ck.CheckpointError, match="must be a float array, got <U1"):
        ck.load_checkpoint(path)
    _write_forged(path, {**arrays, "run.sh": np.zeros(1)}, meta)
    with pytest.raises(ck.CheckpointError, match="unexpected entry 'run.sh'"):
        ck.load_checkpoint(path)
    _write_forged(path, arrays, {**meta, "rng_state": {"bit_generator": "PCG64", "state": 5}})
    model, opt, rng = _run()
    with pytest.raises(ck.CheckpointError, match="generator state is not usable"):
        ck.restore(ck.load_checkpoint(path), model, opt, rng)


@pytest.mark.parametrize("other,message", [
    (dict(cell="lstm"), "cell 'gru' \\(this model: 'lstm'\\)"),
    (dict(hidden=9), "hidden_size 7 \\(this model: 9\\)"),
    (dict(reset_after=True), "reset_after None \\(this model: True\\)"),  # same shapes
])
def test_a_checkpoint_of_another_model_is_refused(tmp_path, other, message):
    loaded = ck.load_checkpoint(_saved(tmp_path))
    model, opt, rng = _run(**other)
    before = model.state_dict()
    with pytest.raises(ck.CheckpointError, match=message):
        ck.restore(loaded, model, opt, rng)
    assert all(np.array_equal(before[k], v) for k, v in model.state_dict().items())
    loaded.pop("architecture")  # an older file without it: the shapes still guard
    if "hidden" in other or "cell" in other:
        with pytest.raises(ValueError, match="must have shape"):
            ck.restore(loaded, model, opt, rng)


def _save_loop(path, hidden, pipe):
    """Child: save checkpoints whose every weight equals the step, announcing each."""
    model, opt, rng = _run(hidden=hidden)
    for step in range(1, 10 ** 6):
        for p in model.params.values():
            p[...] = step
        os.write(pipe, f"start {step}\n".encode())
        ck.save_checkpoint(path, model, opt, step, rng)
        os.write(pipe, f"done {step}\n".encode())


def _read_all(fd):
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode().split()


def _check_survivor(path, events, last_step):
    """After a kill: the file at ``path`` loads and is one complete save: the newest this
    child announced done, or (killed between the rename and the announcement) the one it was
    writing; before it completed any, the previous file.  Returns (its step, whether the kill
    landed inside a save)."""
    started = [int(s) for w, s in zip(events[::2], events[1::2]) if w == "start"]
    done = [int(s) for w, s in zip(events[::2], events[1::2]) if w == "done"]
    loaded = ck.load_checkpoint(path)  # never a half-written file
    step = loaded["step"]
    assert step in ({max(done)} if done else {last_step}) | set(started[-1:]), (step, events)
    assert all((v == step).all() for v in loaded["model"].values()) or step == 0
    return step, len(started) > len(done)


def _first_save(path, hidden):
    """Save step 0; returns the seconds it took (with building the model)."""
    t0 = time.perf_counter()
    model, opt, rng = _run(hidden=hidden)
    ck.save_checkpoint(path, model, opt, 0, rng)
    return time.perf_counter() - t0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks real save processes")
def test_kill_at_any_moment_of_a_save_keeps_a_complete_checkpoint(tmp_path):
    """Fork real save processes (a 2.4 MB checkpoint each save) and SIGKILL each at a random
    moment; the file at the path always loads and is one complete save."""
    path, hidden = tmp_path / "c.npz", 256
    save_s = _first_save(path, hidden)
    gen = np.random.default_rng(11)
    kills, mid_save, last_step = 0, 0, 0
    for _ in range(40):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save until killed
            os.close(read_fd)
            try:
                _save_loop(str(path), hidden, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        time.sleep(float(gen.uniform(0.0, 4 * save_s)))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        kills += 1
        events = _read_all(read_fd)
        os.close(read_fd)
        last_step, inside = _check_survivor(path, events, last_step)
        mid_save += inside
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "c.npz"]
    assert all(name.startswith(".c.npz.") and name.endswith(".tmp") for name in leftovers)
    assert mid_save >= 5, f"only {mid_save} of {kills} kills landed inside a save"
    print(f"faults injected: {kills} SIGKILLs of save processes, {mid_save} during a save; "
          f"{len(leftovers)} temporary files left by killed saves; nothing lost")


def test_kill_a_fresh_interpreter_saving(tmp_path):
    """The same with `python` processes started from scratch (no fork): killed at random
    moments after their first save began."""
    path, hidden = tmp_path / "c.npz", 256
    save_s = _first_save(path, hidden)
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {tests!r}); from test_checkpoint_safety import "
            f"_save_loop; _save_loop({str(path)!r}, {hidden}, 1)")
    gen = np.random.default_rng(3)
    last_step, mid_save, kills = 0, 0, 10
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        first = proc.stdout.readline()  # imports done, the first save under way
        time.sleep(float(gen.uniform(0.0, 3 * save_s)))
        proc.send_signal(signal.SIGKILL)
        events = (first + proc.stdout.read()).decode().split()
        assert proc.wait(timeout=60) == -signal.SIGKILL
        last_step, inside = _check_survivor(path, events, last_step)
        mid_save += inside
    print(f"faults injected: {kills} SIGKILLs of fresh save processes, {mid_save} during a "
          f"save; nothing lost")
