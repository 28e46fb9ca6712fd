"""Training float16 and bfloat16 models: float32 master weights and optimiser, dynamic loss
scaling for float16 (an overflowed step is skipped and counted, never applied), none for
bfloat16; and the adding task learnt in either dtype as in float32."""
import numpy as np
import pytest

from gpurnn.cli import main
from gpurnn.nn.optim import SGD
from gpurnn.training.loop import fit
from gpurnn.training.loss_scale import LossScaler, scaler_for
from gpurnn.training.step import train_step
from gpurnn.training.tasks import make_task, model_for_task


def _setup(dtype, seed=0):
    task = make_task("adding", 8)
    model = model_for_task(task, "lstm", hidden_size=6, seed=seed, dtype=dtype)
    return task, model, SGD(model.params, model.grads, lr=0.1)


def test_masters_and_optimiser_are_float32():
    for dtype in ("float16", "bfloat16"):
        _, model, opt = _setup(dtype)
        assert model.dtype.name == dtype
        assert {p.dtype for p in model.params.values()} == {np.dtype(np.float32)}
        assert {g.dtype for g in model.grads.values()} == {np.dtype(np.float32)}
    assert scaler_for(_setup("float16")[1]) is not None
    assert scaler_for(_setup("bfloat16")[1]) is None
    assert scaler_for(_setup("float32")[1]) is None


def test_an_overflowed_step_is_skipped_and_the_scale_halved():
    task, model, opt = _setup("float16")
    batch = task.batch(np.random.default_rng(1), 4)
    before = model.state_dict()
    scaler = LossScaler(init_scale=2.0 ** 40)  # dL/dy * 2^40 overflows float16 (max 65504)
    loss, norm = train_step(model, task, opt, batch, scaler=scaler)
    assert np.isfinite(loss) and norm is None
    assert scaler.skipped == 1 and scaler.scale == 2.0 ** 39
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_scaled_gradients_are_the_unscaled_ones():
    """Scaling by a power of two and dividing again is exact in float32 where nothing
    underflows: the update equals that of the unscaled float32 gradients within float16's
    rounding of the stored values (the scaled dy rounds to the same significands)."""
    task, model, opt = _setup("float16")
    batch = task.batch(np.random.default_rng(2), 4)
    train_step(model, task, SGD(model.params, model.grads, lr=1e-30), batch)
    plain = {k: g.copy() for k, g in model.grads.items()}
    scaler = LossScaler(init_scale=2.0 ** 8, growth_interval=1)
    train_step(model, task, SGD(model.params, model.grads, lr=1e-30), batch, scaler=scaler)
    assert scaler.skipped == 0 and scaler.scale == 2.0 ** 9  # grew after its one good step
    for name, g in plain.items():
        np.testing.assert_allclose(model.grads[name], g, rtol=0,
                                   atol=4 * 2.0 ** -11 * np.abs(g).max(), err_msg=name)


def test_fit_records_the_scale_and_the_skipped_updates():
    task, model, opt = _setup("float16")
    records = fit(model, task, opt, np.random.default_rng(0), steps=3, batch_size=4)
    assert [r["overflow_skipped"] for r in records] == [0, 0, 0]
    assert all(r["loss_scale"] == 2.0 ** 16 for r in records)
    _, bf16, bopt = _setup("bfloat16")
    records = fit(bf16, task, bopt, np.random.default_rng(0), steps=2, batch_size=4)
    assert "loss_scale" not in records[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_adding_task_is_learnt_as_in_float32(dtype, tmp_path, capsys):
    """The issue's check, at T=50 on the CPU (T=100 is the GPU run's): test MSE below 0.01,
    where predicting the mean scores 0.167.  float32 reaches 0.0014 with these settings;
    measured 0.0017 (bfloat16) and 0.0014 (float16)."""
    out = tmp_path / dtype
    assert main(["train", "--task", "adding", "--seq-len", "50", "--dtype", dtype, "--quiet",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    mse = float(text.split("test mse: ")[1].split()[0])
    assert mse < 0.01, text


def test_a_16_bit_run_loads_back_in_its_dtype(tmp_path, capsys):
    from gpurnn import load_model

    out = tmp_path / "run"
    assert main(["train", "--task", "adding", "--seq-len", "8", "--steps", "3", "--dtype",
                 "bfloat16", "--quiet", "--out", str(out)]) == 0
    model = load_model(out)
    assert model.dtype.name == "bfloat16" and model.compute_dtype == np.float32
    assert main(["evaluate", str(out)]) == 0
    assert "mse" in capsys.readouterr().out
