"""Non-finite values in training: a NaN or Inf in the loss or gradients is caught at the step it
appears, reported with the step and the tensors, handled by the chosen policy (stop, skip,
raise), never applied to the weights and never saved in a checkpoint."""
import logging

import numpy as np
import pytest

from gpurnn.training import checkpoint as ck
from gpurnn.nn import optim
from gpurnn.training import nonfinite
from gpurnn.cli import main
from gpurnn.training.nonfinite import NonFiniteError, NonFiniteGuard
from gpurnn.nn.optim import Adam
from gpurnn.training.loop import fit
from gpurnn.training.step import train_step
from gpurnn.training.task import Task
from gpurnn.training.tasks import make_task, model_for_task

# NumPy's overflow warnings are expected: these tests inject overflow and NaN on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BAD_STEP = 3


def _run(cell="lstm", seed=0):
    task = make_task("adding", 6)
    model = model_for_task(task, cell, hidden_size=5, seed=seed)
    return task, model, Adam(model.params, model.grads, lr=1e-2), np.random.default_rng([seed, 2])


class _Poisoned:
    """The task, with a NaN put into the input of the batch drawn at ``bad_step``."""

    batches = Task.batches  # the loop's stream of batches, drawn by this batch()

    def __init__(self, task, bad_step, value=np.nan):
        self.task, self.bad_step, self.value, self.drawn = task, bad_step, value, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def batch(self, rng, batch_size):
        batch = self.task.batch(rng, batch_size)
        self.drawn += 1
        if self.drawn == self.bad_step:
            batch.x[2, 1, 0] = self.value
        return batch


def _fit(policy, steps=5, value=np.nan, **kw):
    task, model, opt, rng = _run()
    weights = {}  # step -> weights after it

    def on_step(record):
        weights[record["step"]] = model.state_dict()

    history = fit(model, _Poisoned(task, BAD_STEP, value), opt, rng, steps=steps, batch_size=4,
                  on_step=on_step, on_nonfinite=policy, **kw)
    return history, weights, model, opt


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("clip", [{}, {"clip_norm": 1.0}, {"clip_value": 0.5}])
def test_skip_drops_the_bad_step_only(value, clip):
    history, weights, model, opt = _fit("skip", value=value, **clip)
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    bad = history[BAD_STEP - 1]
    assert bad["skipped"] and f"non-finite values at step {BAD_STEP}" in bad["nonfinite"]
    assert "rnn.weight_ih_l0" in bad["nonfinite"] and "NaN" in bad["nonfinite"]
    assert not any(r.get("skipped") for r in history if r["step"] != BAD_STEP)
    assert _same(weights[BAD_STEP], weights[BAD_STEP - 1])  # not applied
    assert not _same(weights[BAD_STEP + 1], weights[BAD_STEP])  # training went on
    assert opt.t == 4
    assert all(np.isfinite(w).all() for w in model.state_dict().values())


def test_stop_ends_at_the_last_good_weights():
    history, weights, model, opt = _fit("stop")
    assert [r["step"] for r in history] == [1, 2, 3]
    last = history[-1]
    assert last["halted"] and last["skipped"] and "test" in last
    assert _same(model.state_dict(), weights[BAD_STEP - 1]) and opt.t == BAD_STEP - 1


def test_raise_names_the_step_and_leaves_the_weights(caplog):
    task, model, opt, rng = _run()
    seen = {}
    with pytest.raises(NonFiniteError, match=rf"step {BAD_STEP}: loss nan; gradients: .*"
                                             r"rnn.weight_hh_l0 \(\d+ NaN, 0 Inf\)"):
        fit(model, _Poisoned(task, BAD_STEP), opt, rng, steps=5, batch_size=4,
            on_step=lambda r: seen.update({r["step"]: model.state_dict()}))
    assert _same(model.state_dict(), seen[BAD_STEP - 1]) and opt.t == BAD_STEP - 1
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        fit(model, task, opt, rng, steps=1, batch_size=2, on_nonfinite="ignore")


def test_skip_and_stop_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="gpurnn"):
        _fit("skip")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == \
        [f"non-finite values at step {BAD_STEP}"]


def _guarded_step(name, value, **clip):
    """One train_step whose gradient ``name`` is set to ``value`` after the backward: (guard,
    grad norm returned, optimiser, weights before, model)."""
    task, model, opt, rng = _run()
    batch = task.batch(rng, 4)
    real_backward = model.backward

    def backward_then_set(dy):
        real_backward(dy)
        model.grads[name][0] = value

    model.backward = backward_then_set
    before = model.state_dict()
    guard = NonFiniteGuard(model, "skip")
    _, norm = train_step(model, task, opt, batch, guard=guard, **clip)
    return guard, norm, opt, before, model


def test_guard_checks_before_value_clipping_would_hide_an_inf():
    """clip_value maps an Inf gradient to a finite value: the check must come first."""
    guard, norm, opt, before, model = _guarded_step("head.bias", np.inf, clip_value=0.5,
                                                    clip_norm=1.0)
    assert norm is None and opt.t == 0 and _same(model.state_dict(), before)
    assert "head.bias (0 NaN, 1 Inf)" in guard.report and "rnn." not in guard.report


def test_overflowing_norm_of_finite_gradients_is_reported_as_such():
    # 1e30 is finite in float32; its square is not
    guard, norm, opt, before, model = _guarded_step("head.weight", 1e30)
    assert "all finite, but their global norm overflows float32" in guard.report
    assert opt.t == 0 and _same(model.state_dict(), before)


def test_one_norm_per_step_shared_with_clipping(monkeypatch):
    """The check is one global-norm reduction; norm clipping reuses it instead of a second."""
    calls = []
    real = optim.global_norm

    def counting(grads):
        calls.append(1)
        return real(grads)

    monkeypatch.setattr(optim, "global_norm", counting)
    monkeypatch.setattr(nonfinite, "global_norm", counting)
    task, model, opt, rng = _run()
    fit(model, task, opt, rng, steps=3, batch_size=4, clip_norm=1.0, on_nonfinite="skip")
    assert len(calls) == 3
    history = fit(model, task, opt, rng, steps=6, batch_size=4, start_step=3, clip_norm=1e-3)
    assert len(calls) == 6 and all(r["grad_norm"] > 1e-3 for r in history)  # it clipped


def test_checkpoint_refuses_non_finite_arrays(tmp_path):
    task, model, opt, rng = _run()
    path = tmp_path / "c.npz"
    ck.save_checkpoint(path, model, opt, 1, rng)
    before = path.read_bytes()
    model.params["rnn.bias_hh_l0"][3] = np.nan
    with pytest.raises(NonFiniteError, match=r"rnn.bias_hh_l0 \(1 NaN, 0 Inf\)"):
        ck.save_checkpoint(path, model, opt, 2, rng)
    model.params["rnn.bias_hh_l0"][3] = 0.0
    opt.state["m"]["head.bias"][0] = -np.inf  # optimiser buffers are checked too
    with pytest.raises(NonFiniteError, match=r"optim/m/head.bias \(0 NaN, 1 Inf\)"):
        ck.save_checkpoint(path, model, opt, 2, rng)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


TINY = ["--seq-len", "5", "--hidden", "6", "--batch", "4", "--device", "cpu", "--quiet",
        "--clip", "0", "--checkpoint-every", "1"]


@pytest.mark.parametrize("policy,code", [("stop", 3), ("skip", 0), ("raise", 2)])
def test_cli_policies_under_an_overflowing_learning_rate(tmp_path, capsys, caplog, policy, code):
    """lr 1e30 (Adam) makes step 2's loss and gradients non-finite; each policy's exit code,
    report, and a checkpoint that holds only finite values: those after step 1."""
    run = tmp_path / policy
    rc = main(["train", "--steps", "3", "--lr", "1e30", "--out", str(run),
               "--on-nonfinite", policy, *TINY])
    assert rc == code
    captured = capsys.readouterr()
    # (the logged warning goes to stderr through logging's last-resort handler in a shell)
    assert "non-finite values at step 2: loss inf; gradients: rnn.weight_ih_l0" in \
        captured.out + captured.err + caplog.text
    assert main(["train", "--steps", "1", "--lr", "1e30", "--out", str(tmp_path / "one"),
                 *TINY]) == 0
    one = ck.load_checkpoint(tmp_path / "one" / "checkpoint.npz")
    saved = ck.load_checkpoint(run / "checkpoint.npz")
    assert all(np.isfinite(a).all() for a in [*saved["model"].values(),
                                              *saved["optim_buffers"].values()])
    assert saved["step"] == {"stop": 2, "skip": 3, "raise": 1}[policy]
    assert _same(saved["model"], one["model"])  # no update after step 1 was ever applied


def test_guard_on_the_cuda_path():
    """The same check through the CUDA backend (the simulator in CI, a GPU where present)."""
    task = make_task("adding", 4)
    model = model_for_task(task, "gru", hidden_size=3, seed=0, device="cuda")
    opt = Adam(model.params, model.grads, lr=1e-2)
    batch = task.batch(np.random.default_rng(0), 2)
    before = model.state_dict()
    guard = NonFiniteGuard(model, "skip")
    assert train_step(model, task, opt, batch, clip_norm=1.0, guard=guard)[1] is not None
    assert guard.report is None and opt.t == 1
    batch.x[1, 0, 1] = np.nan
    after_one = model.state_dict()
    train_step(model, task, opt, batch, clip_norm=1.0, guard=guard)
    assert "rnn.weight_hh_l0" in guard.report and opt.t == 1
    assert _same(model.state_dict(), after_one) and not _same(after_one, before)
