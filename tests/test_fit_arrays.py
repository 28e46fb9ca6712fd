"""``Model.fit`` / ``evaluate`` / ``predict`` on the user's arrays: the same weights, metrics and
outputs as the task path on the same data and seed (bit for bit on the CPU), ragged lists equal
hand padding, torch tensors and DLPack-only arrays equal NumPy (zero-copy where promised), the
inferred loss and head, validation, stop_at, checkpoints, bad input, and the CUDA backend
under the simulator."""
import math

import numpy as np
import pytest
import torch

import gpurnn
from conftest import SIMULATOR
from gpurnn.engine.arrays import adopt
from gpurnn.nn import data as nn_data
from gpurnn.nn.data import SequenceData
from gpurnn.nn.optim import Adam
from gpurnn.training.loop import evaluate, fit
from gpurnn.training.tasks import make_task, model_for_task


def _sample_major(a, per_step):
    """A task batch's time-major array [T, B, ...] as the user holds it, [B, T, ...]."""
    return np.swapaxes(a, 0, 1) if per_step else a


def _as_arrays(batches, per_step):
    x = np.concatenate([_sample_major(b.x, True) for b in batches])
    y = np.concatenate([_sample_major(b.target, per_step) for b in batches])
    return x, y


@pytest.mark.parametrize("name,seq_len", [("adding", 7), ("digits", 8), ("charlm", 9)])
def test_fit_evaluate_predict_equal_the_task_path(name, seq_len):
    """The task's own batches, laid out as the user's arrays, trained with ``Model.fit`` (no
    shuffling, one epoch): the same weights bit for bit as ``loop.fit`` on the task; then the
    same test metrics and outputs."""
    task = make_task(name, seq_len)
    per_step = task.head == "all"
    steps, B = 4, 6
    rng = np.random.default_rng([5, 2])
    x, y = _as_arrays([task.batch(rng, B) for _ in range(steps)], per_step)

    by_task = model_for_task(task, "gru", hidden_size=8, seed=3)
    records = fit(by_task, task, Adam(by_task.params, by_task.grads, lr=1e-2),
                  np.random.default_rng([5, 2]), steps, B, clip_norm=1.0)
    by_arrays = model_for_task(task, "gru", hidden_size=8, seed=3)
    history = by_arrays.fit(x, y, batch_size=B, epochs=1, shuffle=False, lr=1e-2, clip=1.0,
                            progress=False)

    assert history.params["loss"] == task.loss and history.params["head"] == task.head
    assert [r["loss"] for r in history.steps] == [r["loss"] for r in records]
    mine, theirs = by_arrays.state_dict(), by_task.state_dict()
    for k in theirs:
        assert np.array_equal(mine[k], theirs[k]), k

    test = list(task.test_batches())
    x_test, y_test = _as_arrays(test, per_step)
    scores = by_arrays.evaluate(x_test, y_test, batch_size=len(x_test))
    reference = evaluate(by_task, task)
    shared = set(scores) & set(reference)
    assert shared and all(scores[k] == reference[k] for k in shared), (scores, reference)
    if len(test) == 1:  # one forward on each side: the same outputs to the bit
        out = by_arrays.predict(x_test, batch_size=len(x_test))
        assert np.array_equal(out, _sample_major(by_task(test[0].x), per_step))


def _ragged(rng, N=7, I=3, longest=6):
    lengths = rng.integers(1, longest + 1, size=N)
    lengths[0] = longest
    return [rng.standard_normal((n, I)).astype(np.float32) for n in lengths], lengths


def _pad(sequences, T):
    out = np.zeros((len(sequences), T) + sequences[0].shape[1:], sequences[0].dtype)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = s
    return out


@pytest.mark.parametrize("head", ["all", "last"])
def test_ragged_lists_equal_hand_padding(head, rng):
    """A list of sequences of different lengths (and per-step targets alike) trains, scores and
    predicts as the same data padded by hand with lengths, also padded further than the
    longest; outputs past each length are zero."""
    xs, lengths = _ragged(rng)
    if head == "all":
        ys = [rng.standard_normal((len(s), 2)) for s in xs]
        y_padded = _pad(ys, 6)
    else:
        ys = list(rng.integers(0, 3, size=len(xs)))
        y_padded = np.array(ys)
    K = 2 if head == "all" else 3
    results = []
    for x, y, lens in ((xs, ys, None), (_pad(xs, 6), y_padded, lengths),
                       (_pad(xs, 9), _pad(ys, 9) if head == "all" else y_padded, lengths)):
        model = gpurnn.Model("lstm", 5, K, input_size=3, head=head, seed=2)
        history = model.fit(x, y, lens, batch_size=3, epochs=2, seed=4, progress=False)
        results.append((model.state_dict(), history.history["loss"],
                        model.evaluate(x, y, lens), model.predict(x, lens)))
    (w0, l0, s0, p0) = results[0]
    for w, loss, scores, pred in results[1:]:
        assert all(np.array_equal(w[k], w0[k]) for k in w0)
        assert loss == l0 and scores == s0
        assert np.array_equal(pred[:, :p0.shape[1]] if head == "all" else pred, p0)
    if head == "all":
        past = np.arange(p0.shape[1])[None, :] >= lengths[:, None]  # [N, T]
        assert np.all(p0[past] == 0) and np.all(p0[~past] != 0)


class DLPackOnly:
    """An array known only through the DLPack protocol, as a JAX array is to NumPy."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class OnGPU(DLPackOnly):
    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA


def test_torch_and_dlpack_inputs_equal_numpy(rng):
    x = rng.standard_normal((6, 5, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=6)
    lengths = np.array([5, 2, 4, 5, 1, 3])
    kinds = {"numpy": (x, y, lengths),
             "torch": (torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(lengths)),
             "dlpack": (DLPackOnly(x), DLPackOnly(y), DLPackOnly(lengths))}
    results = {}
    for kind, (xk, yk, lk) in kinds.items():
        model = gpurnn.Model("gru", 4, 4, input_size=3, head="last", seed=1)
        model.fit(xk, yk, lk, batch_size=4, epochs=2, progress=False)
        pred = model.predict(xk, lk)
        assert type(pred) is np.ndarray  # the backend's arrays come back
        results[kind] = (model.state_dict(), model.evaluate(xk, yk, lk), pred)
    for kind in ("torch", "dlpack"):
        w, scores, pred = results[kind]
        assert all(np.array_equal(w[k], results["numpy"][0][k]) for k in w), kind
        assert scores == results["numpy"][1] and np.array_equal(pred, results["numpy"][2])

    layer = gpurnn.LSTM(3, 4, seed=0)
    xt = torch.from_numpy(np.ascontiguousarray(x.swapaxes(0, 1)))  # [T, B, I]
    ref, (h, c) = layer(xt.numpy(), lengths=lengths)
    for given in (xt, DLPackOnly(xt.numpy())):
        out, (h2, c2) = layer(given, lengths=torch.from_numpy(lengths))
        assert type(out) is np.ndarray and np.array_equal(out, ref) and np.array_equal(h2, h)


def test_zero_copy_on_the_device_where_promised(rng):
    """A torch CPU tensor reaches a CPU layer and a model's data as a view of its memory."""
    t = torch.from_numpy(rng.standard_normal((5, 2, 3)).astype(np.float32))
    backend = gpurnn.get_backend("cpu")
    assert adopt(backend, t, "x").__array_interface__["data"][0] == t.data_ptr()
    model = gpurnn.Model("rnn", 4, 1, input_size=3, seed=0)
    data = SequenceData(model, t)
    assert data.x.__array_interface__["data"][0] == t.data_ptr()
    other = SequenceData(model, t.double())  # another dtype: converted, so a copy
    assert other.x.dtype == np.float32 and np.shares_memory(other.x, t.numpy()) is False


def test_device_memory_given_to_a_cpu_model_is_refused(rng):
    model = gpurnn.Model("lstm", 4, 1, input_size=3, head="last", seed=0)
    x = OnGPU(rng.standard_normal((4, 5, 3)).astype(np.float32))
    with pytest.raises(TypeError, match=r"numpy.ndarray on device 'cpu'.*device memory"):
        model.predict(x)
    with pytest.raises(TypeError, match=r"device memory.*tensor.cpu\(\)"):
        gpurnn.LSTM(3, 4)(x)
    with pytest.raises(TypeError, match="require gradient"):
        model.predict(torch.zeros(2, 5, 3, requires_grad=True))


def test_head_and_loss_are_inferred_and_checked(rng):
    x = rng.standard_normal((8, 5, 2))
    model = gpurnn.Model("gru", 4, 3, input_size=2, seed=0)  # head "all" by default
    with pytest.raises(ValueError, match=r"per sequence, but the model has head='all'"):
        model.fit(x, rng.integers(0, 3, size=8), progress=False)
    history = model.fit(x, rng.integers(0, 3, size=(8, 5)), progress=False)
    assert (history.params["loss"], history.params["head"]) == ("cross_entropy", "all")
    assert "class labels per step" in history.params["task"]
    reg = gpurnn.Model("gru", 4, 1, input_size=2, seed=0)
    history = reg.fit(x, rng.standard_normal((8, 5)), progress=False)  # [N, T]: K = 1
    assert (history.params["loss"], history.params["head"]) == ("mse", "all")
    with pytest.raises(ValueError, match="y holds class 5, but the model has output_size=3"):
        model.fit(x, np.full((8, 5), 5), progress=False)
    with pytest.raises(TypeError, match="non-integer"):
        model.fit(x, np.full((8, 5), 0.5), loss="cross_entropy", progress=False)
    last = gpurnn.Model("gru", 4, 2, input_size=2, head="last", seed=0)
    with pytest.raises(ValueError, match="per step, but the model has head='last'"):
        last.fit(x, rng.standard_normal((8, 5, 2)), progress=False)


@pytest.mark.parametrize("call,error,words", [
    (lambda m, x, y: m.fit(x[:, :, :1], y), ValueError, r"takes 2 features per step"),
    (lambda m, x, y: m.fit(x, y[:5]), ValueError, "x has 8 sequences, y has shape"),
    (lambda m, x, y: m.fit(x, y, [5] * 7 + [6]), ValueError, r"\[0, T=5\].*sequence 7"),
    (lambda m, x, y: m.fit(x, y, [5] * 7 + [0]), ValueError, "every length must be >= 1"),
    (lambda m, x, y: m.fit(x.astype(np.complex64), y), TypeError, "complex64"),
    (lambda m, x, y: m.fit(x[:, :, 0], y), ValueError, r"add an axis"),
    (lambda m, x, y: m.fit(np.where(np.arange(5)[:, None] == 2, np.nan, x), y), ValueError,
     "NaN or Inf value.*sequence 0, step 2"),
    (lambda m, x, y: m.fit(x, y, batch_size=0), ValueError, "batch_size must be a positive"),
    (lambda m, x, y: m.fit(x, y, epochs=2, steps=3), ValueError, "epochs or steps"),
    (lambda m, x, y: m.fit(x, y, stop_at=0.1), ValueError, "stop_at .* validation"),
    (lambda m, x, y: m.fit(x, y, validation_split=1.5), ValueError, r"fraction in \(0, 1\)"),
    (lambda m, x, y: m.fit(x, y, optimizer="rmsprop"), ValueError, "optimizer must be one of"),
    (lambda m, x, y: m.fit(x, y, optimizer=Adam(*_other_params(), lr=1e-3)), ValueError,
     "built on other parameters"),
    (lambda m, x, y: m.fit(x, y, validation_data=(x,)), ValueError, r"\(x, y\) or"),
    (lambda m, x, y: m.predict(x, batch_size=0), ValueError, "batch_size"),
    (lambda m, x, y: m.predict(list(x[:0])), ValueError, "empty list"),
    (lambda m, x, y: m.predict([x[0], x[1, :, :1]]), ValueError, "same F"),
])
def test_bad_data_is_refused_before_training(call, error, words, rng):
    model = gpurnn.Model("lstm", 4, 1, input_size=2, head="last", seed=0)
    before = model.state_dict()
    with pytest.raises(error, match=words):
        call(model, rng.standard_normal((8, 5, 2)), rng.standard_normal(8))
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def _other_params():
    other = gpurnn.Model("lstm", 4, 1, input_size=2, seed=0)
    return other.params, other.grads


def test_non_finite_values_at_padded_steps_are_ignored(rng):
    x = rng.standard_normal((4, 5, 2))
    lengths = np.array([5, 3, 2, 4])
    clean = x.copy()
    for b, n in enumerate(lengths):
        clean[b, n:] = 0
        x[b, n:] = np.nan
    y = rng.standard_normal((4, 5, 1))
    y[0, 4:] = 0  # within the length: must stay finite
    outs = []
    for xs in (clean, x):
        model = gpurnn.Model("gru", 3, 1, input_size=2, seed=0)
        model.fit(xs, np.where(np.isnan(x[:, :, :1]), np.inf, y), lengths, progress=False)
        outs.append(model.predict(xs, lengths))
    assert np.array_equal(outs[0], outs[1]) and np.all(np.isfinite(outs[1]))


def test_validation_stop_at_history_and_checkpoint(tmp_path):
    x = np.random.default_rng(0).random((40, 6, 2)).astype(np.float32)  # reaches stop_at
    y = (x[:, :, 0].sum(axis=1) > 3).astype(np.int64)
    model = gpurnn.Model("lstm", 8, 2, input_size=2, head="last", seed=0)
    history = model.fit(x, y, batch_size=8, epochs=30, validation_split=0.25, lr=2e-2,
                        stop_at=0.5, checkpoint_dir=tmp_path, progress=False)
    assert history.stopped and history.epochs[-1]["val_accuracy"] >= 0.5
    per_epoch = math.ceil(30 / 8)
    assert [e["step"] for e in history.epochs] == \
        [per_epoch * (i + 1) for i in range(len(history.epochs))]
    assert set(history.history) == {"loss", "val_accuracy", "val_loss"}
    assert history.history["val_accuracy"][-1] == history.epochs[-1]["val_accuracy"]
    # the validation set is the last quarter, unseen: its score is evaluate's on it
    scores = model.evaluate(x[30:], y[30:], batch_size=256)
    assert scores["accuracy"] == history.epochs[-1]["val_accuracy"]
    loaded = gpurnn.load_model(tmp_path)
    assert repr(loaded) == repr(model)
    assert np.array_equal(loaded.predict(x), model.predict(x))


def test_steps_end_mid_epoch_and_an_optimizer_object_carries_on(rng):
    x = rng.standard_normal((10, 4, 2))
    y = rng.standard_normal((10, 1))
    model = gpurnn.Model("rnn", 3, 1, input_size=2, head="last", seed=0)
    history = model.fit(x, y, batch_size=4, steps=5, progress=False)  # epochs of 3 steps
    assert [e["step"] for e in history.epochs] == [3, 5] and len(history.steps) == 5
    assert isinstance(model.optimizer, Adam) and model.optimizer.t == 5
    model.fit(x, y, batch_size=4, steps=2, optimizer=model.optimizer, progress=False)
    assert model.optimizer.t == 7
    with pytest.raises(ValueError, match="lr applies to an optimizer given by name"):
        model.fit(x, y, optimizer=model.optimizer, lr=0.1, progress=False)


def test_data_staged_at_once_or_batch_by_batch_give_the_same_run(rng, monkeypatch):
    x = rng.integers(0, 7, size=(9, 5))
    y = rng.integers(0, 3, size=(9, 5))
    lengths = rng.integers(1, 6, size=9)
    runs = []
    for fraction in (nn_data.STAGE_FRACTION, 0.0):
        monkeypatch.setattr(nn_data, "STAGE_FRACTION", fraction)
        model = gpurnn.Model("lstm", 4, 3, vocab_size=7, seed=0)
        assert SequenceData(model, x, lengths).staged == (fraction > 0)
        model.fit(x, y, lengths, batch_size=4, epochs=2, progress=False)
        runs.append((model.state_dict(), model.predict(x, lengths)))
    assert all(np.array_equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert np.array_equal(runs[0][1], runs[1][1])


def test_a_shuffled_run_resumes_exactly_mid_epoch(rng):
    """The epoch's order is drawn from the state the checkpointed generator holds: a run
    resumed at any step sees the batches the whole run saw."""
    from gpurnn.training.data import ArrayTask

    x = rng.standard_normal((11, 4, 2))
    y = rng.standard_normal(11)
    model = gpurnn.Model("gru", 3, 1, input_size=2, head="last", seed=0)
    task = ArrayTask(model, (x, y))
    whole_rng = np.random.default_rng(1)
    whole = task.batches(whole_rng, 3)
    seen = [next(whole).target.copy() for _ in range(10)]  # 4 steps an epoch
    for start in (1, 4, 6):
        resumed_rng = np.random.default_rng(1)
        stream = task.batches(resumed_rng, 3)
        for _ in range(start):
            next(stream)
        state = resumed_rng.bit_generator.state  # what a checkpoint after `start` steps holds
        again = np.random.default_rng(0)
        again.bit_generator.state = state
        replay = task.batches(again, 3, start_step=start)
        for step in range(start, 10):
            assert np.array_equal(next(replay).target, seen[step]), (start, step)


def test_cuda_backend_fits_like_the_cpu(rng):
    if not SIMULATOR:
        pytest.skip("compares against the CPU in float64 under the simulator only")
    xs, lengths = _ragged(rng, N=4, I=2, longest=4)
    y = rng.integers(0, 3, size=4)
    results = []
    for device in ("cpu", "cuda"):
        model = gpurnn.Model("gru", 3, 3, input_size=2, head="last", device=device,
                             dtype="float64", seed=0)
        model.fit(xs, y, batch_size=2, epochs=1, progress=False)
        results.append((model.state_dict(), model.predict(xs), model.evaluate(xs, y)))
    for k in results[0][0]:
        np.testing.assert_allclose(results[1][0][k], results[0][0][k], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)
    assert results[1][2] == pytest.approx(results[0][2], rel=1e-10)
