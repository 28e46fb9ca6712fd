"""Checkpoints: round trips, atomic writes (an interrupted save keeps the previous file),
damaged files refused, and resume equivalence: a run split in two equals one run, bit for bit."""
import json
import os

import numpy as np
import pytest

from gpurnn.training import checkpoint as ck
from gpurnn.training.loop import fit
from gpurnn.nn.optim import Adam, Momentum
from gpurnn.training.tasks import make_task, model_for_task


def _run(seed=0, cell="gru", opt_cls=Adam):
    task = make_task("adding", 6)
    model = model_for_task(task, cell, hidden_size=7, seed=seed)
    opt = opt_cls(model.params, model.grads, lr=1e-2)
    return task, model, opt, np.random.default_rng([seed, 2])


def _train(task, model, opt, rng, start, steps):
    fit(model, task, opt, rng, steps=steps, batch_size=5, start_step=start, clip_norm=1.0)


def test_round_trip(tmp_path):
    task, model, opt, rng = _run()
    _train(task, model, opt, rng, 0, 2)
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, model, opt, 2, rng, {"task": "adding"})
    loaded = ck.load_checkpoint(path)
    assert loaded["step"] == 2 and loaded["config"] == {"task": "adding"}
    _, model2, opt2, rng2 = _run(seed=5)
    assert ck.restore(loaded, model2, opt2, rng2) == 2
    for k, v in model.state_dict().items():
        assert np.array_equal(model2.state_dict()[k], v) and model2.params[k].dtype == v.dtype
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["t"] == b["t"] == 2
    assert all(np.array_equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])
    assert np.array_equal(rng.random(4), rng2.random(4))
    with np.load(path, allow_pickle=False) as npz:  # plain arrays, no pickles
        meta = json.loads(str(npz["meta"]))
    assert meta["format"] == "gpurnn-checkpoint" and meta["version"] == 1


@pytest.mark.parametrize("opt_cls", [Adam, Momentum])
def test_resume_equals_one_run_bit_for_bit(tmp_path, opt_cls):
    one = _run(opt_cls=opt_cls)
    _train(*one, 0, 6)

    first = _run(opt_cls=opt_cls)
    _train(*first, 0, 3)
    path = tmp_path / "half.npz"
    ck.save_checkpoint(path, first[1], first[2], 3, first[3])
    second = _run(seed=11, opt_cls=opt_cls)  # other weights and data stream until restored
    start = ck.restore(ck.load_checkpoint(path), second[1], second[2], second[3])
    _train(*second, start, 6)

    for k, v in one[1].state_dict().items():
        assert np.array_equal(second[1].state_dict()[k], v), k
    a, b = one[2].state_dict(), second[2].state_dict()
    assert all(np.array_equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    task, model, opt, rng = _run()
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, model, opt, 1, rng)
    before = path.read_bytes()
    _train(task, model, opt, rng, 1, 2)

    real_savez = np.savez

    def dies_mid_write(f, **arrays):
        real_savez(f, **arrays)
        f.truncate(f.tell() // 2)  # half of it on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.np, "savez", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, model, opt, 2, rng)
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.npz"]  # no temporary file left behind


def test_truncated_and_altered_files_are_refused(tmp_path):
    task, model, opt, rng = _run()
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, model, opt, 1, rng)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 10):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ck.CheckpointError, match="truncated or corrupted"):
            ck.load_checkpoint(bad)
    # altered payload, re-zipped validly: only the checksum can tell
    arrays, meta = ck.load_arrays(path)
    name = next(k for k in arrays if k.startswith("model/"))
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] += 1
    stored = dict(arrays, meta=np.array(json.dumps(meta)),
                  sha256=np.array(ck._digest({**arrays, "meta": np.array(json.dumps(meta))})))
    ok = tmp_path / "ok.npz"
    np.savez(ok, **stored)
    ck.load_arrays(ok)  # a consistent file loads
    with np.load(path, allow_pickle=False) as npz:
        stored["sha256"] = npz["sha256"]  # the original checksum no longer fits
    altered = tmp_path / "altered.npz"
    np.savez(altered, **stored)
    with pytest.raises(ck.CheckpointError, match="SHA-256"):
        ck.load_checkpoint(altered)


def test_other_format_or_version_refused(tmp_path):
    path = tmp_path / "v.npz"
    ck.save_arrays(path, {"x": np.zeros(2)}, {})
    arrays, meta = ck.load_arrays(path)
    assert np.array_equal(arrays["x"], np.zeros(2))
    meta["version"] = 99
    payload = {"x": np.zeros(2), "meta": np.array(json.dumps(meta))}
    payload["sha256"] = np.array(ck._digest(payload))
    np.savez(path, **payload)
    with pytest.raises(ck.CheckpointError, match="format version 99"):
        ck.load_arrays(path)
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.zeros(2))
    with pytest.raises(ck.CheckpointError, match="not a gpurnn checkpoint"):
        ck.load_arrays(plain)


def test_restore_refuses_another_optimiser(tmp_path):
    task, model, opt, rng = _run()
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, model, opt, 0, rng)
    _, model2, opt2, rng2 = _run(opt_cls=Momentum)
    with pytest.raises(ck.CheckpointError, match="optimiser Adam"):
        ck.restore(ck.load_checkpoint(path), model2, opt2, rng2)


_SAVER = """
import sys, numpy as np
from gpurnn.training.checkpoint import save_arrays
big = np.random.default_rng(0).standard_normal(4_000_000)  # 32 MB: a save takes a while
i = 0
while True:
    save_arrays(sys.argv[1], {"w": big + i}, {"step": i})
    i += 1
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.08])
def test_process_killed_while_saving_leaves_a_whole_checkpoint(tmp_path, delay):
    """SIGKILL a process that saves over and over: the file is always a complete checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "c.npz"
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one save done; the next is under way
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    arrays, meta = ck.load_arrays(path)
    assert arrays["w"].shape == (4_000_000,) and meta["step"] >= 0
    # the file's step and contents agree: one save's whole content, not a mix
    first = np.random.default_rng(0).standard_normal(4)
    np.testing.assert_array_equal(arrays["w"][:4], first + meta["step"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_runs_resume_bit_for_bit(tmp_path, dtype):
    """float32 masters and optimiser state, and float16's loss scale, come back exactly: a
    resumed 16-bit run equals one run."""
    from gpurnn.training.loss_scale import LossScaler, scaler_for

    def run(seed=0):
        task = make_task("adding", 6)
        model = model_for_task(task, "lstm", hidden_size=5, seed=seed, dtype=dtype)
        return task, model, Adam(model.params, model.grads, lr=1e-2), \
            np.random.default_rng([seed, 2]), scaler_for(model)

    def train(task, model, opt, rng, scaler, start, steps):
        fit(model, task, opt, rng, steps=steps, batch_size=5, start_step=start, scaler=scaler)

    # float16: a scale that moves both ways, both sides of the checkpoint: overflows at steps
    # 1, 2 and 5 (skipped), growth after steps 3 and 4
    one = run()
    if dtype == "float16":
        one = one[:4] + (LossScaler(init_scale=2.0 ** 20, growth_interval=2),)
    train(*one, 0, 6)
    first = run()
    first = first[:4] + (LossScaler(init_scale=2.0 ** 20, growth_interval=2),) \
        if dtype == "float16" else first
    train(*first, 0, 3)
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, first[1], first[2], 3, first[3], scaler=first[4])
    second = run(seed=9)
    if dtype == "float16":  # configured as the first part; its state comes from the file
        second = second[:4] + (LossScaler(growth_interval=2),)
    start = ck.restore(ck.load_checkpoint(path), second[1], second[2], second[3], second[4])
    train(*second, start, 6)
    initial = run()[1].state_dict()
    for k, v in one[1].state_dict().items():
        assert v.dtype == np.float32 and np.array_equal(second[1].state_dict()[k], v), k
        assert not np.array_equal(v, initial[k]), k  # updates were applied
    if dtype == "float16":
        assert one[4].state_dict() == second[4].state_dict()
        assert one[4].skipped == 3
