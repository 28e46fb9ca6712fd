"""The Model (embedding -> recurrent layer -> head): gradients of the whole chain against
central finite differences in float64, the head alone, the gradient-flow measurement against
PyTorch, seeding, learning, the CUDA path, and bad input."""
import numpy as np
import pytest
import torch

from conftest import SIMULATOR
from gpurnn import Model
from gpurnn.nn.model import Linear
from gpurnn.nn.optim import Adam
from gpurnn.training.gradflow import gradient_flow
from gpurnn.training.loop import evaluate, fit
from gpurnn.training.tasks import Batch, make_task, model_for_task
from helpers import central_difference
from gpurnn.engine.backend import get_backend

EPS = 1e-6


def _check_model_gradients(model, batch, loss_name, rng, entries=6):
    def loss():
        return model.loss(model(batch.x, batch.lengths), batch, loss_name, "sum")[0]

    y = model(batch.x, batch.lengths)
    _, dy = model.loss(y, batch, loss_name, "sum")
    model.backward(dy)
    grads = {k: v.copy() for k, v in model.grads.items()}
    for name, p in model.params.items():
        flat = list(np.ndindex(p.shape))
        for i in rng.choice(len(flat), size=min(entries, len(flat)), replace=False):
            idx = flat[i]
            num = central_difference(loss, p, idx, EPS)
            assert abs(num - grads[name][idx]) <= 1e-6 + 1e-5 * abs(num), \
                f"{name}{idx}: finite difference {num}, backward {grads[name][idx]}"


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_last_step_head_with_lengths(cell, rng):
    T, B, I, H, K = 6, 4, 3, 5, 2
    model = Model(cell, hidden_size=H, output_size=K, input_size=I, head="last",
                  dtype="float64", seed=3)
    batch = Batch(rng.standard_normal((T, B, I)), rng.standard_normal((B, K)),
                  lengths=np.array([6, 2, 1, 4]))
    _check_model_gradients(model, batch, "mse", rng)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_token_model_every_step_masked_cross_entropy(cell, rng):
    T, B, V, H, C = 5, 3, 7, 4, 6
    model = Model(cell, hidden_size=H, output_size=C, vocab_size=V, embed_size=3, head="all",
                  num_layers=2, dtype="float64", seed=4)
    mask = rng.random((T, B)) < 0.7
    batch = Batch(rng.integers(0, V, size=(T, B)), rng.integers(0, C, size=(T, B)), mask=mask)
    _check_model_gradients(model, batch, "cross_entropy", rng)


def test_head_backward_by_finite_differences(rng):
    be = get_backend("cpu")
    head = Linear(4, 3, be, np.float64, rng)
    h = rng.standard_normal((5, 4))
    R = rng.standard_normal((5, 3))
    head.forward(h)
    dh = head.backward(R)
    grads = {k: v.copy() for k, v in head.grads.items()}
    for name, arr in [("weight", head.params["weight"]), ("bias", head.params["bias"]), ("h", h)]:
        analytic = dh if name == "h" else grads[name]
        for idx in np.ndindex(arr.shape):
            numeric = central_difference(lambda: (head.forward(h) * R).sum(), arr, idx, EPS)
            assert numeric == pytest.approx(analytic[idx], rel=1e-6, abs=1e-9)


def _torch_hidden_grads(model, x, target):
    """dL/dh_t with PyTorch cells in a Python loop, h_t kept as leaves of the graph."""
    sd = {k: torch.tensor(v) for k, v in model.rnn.state_dict().items()}
    cell = model.config["cell"]
    H = model.rnn.hidden_size
    tcell = {"rnn": torch.nn.RNNCell, "lstm": torch.nn.LSTMCell}[cell](
        x.shape[2], H, dtype=torch.float64)
    tcell.load_state_dict({"weight_ih": sd["weight_ih_l0"], "weight_hh": sd["weight_hh_l0"],
                           "bias_ih": sd["bias_ih_l0"], "bias_hh": sd["bias_hh_l0"]})
    B = x.shape[1]
    h = torch.zeros(B, H, dtype=torch.float64)
    c = torch.zeros(B, H, dtype=torch.float64)
    hs = []
    for t in range(x.shape[0]):
        if cell == "lstm":
            h, c = tcell(torch.tensor(x[t]), (h, c))
        else:
            h = tcell(torch.tensor(x[t]), h)
        h.retain_grad()
        hs.append(h)
    W = torch.tensor(model.head.params["weight"])
    b = torch.tensor(model.head.params["bias"])
    loss = 0.5 * ((h @ W.T + b - torch.tensor(target)) ** 2).sum()
    loss.backward()
    return np.array([hh.grad.norm(dim=1).mean().item() for hh in hs])


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_gradient_flow_matches_torch(cell, rng):
    T, B, I, H = 7, 3, 2, 4
    model = Model(cell, hidden_size=H, output_size=1, input_size=I, head="last",
                  dtype="float64", seed=5)
    batch = Batch(rng.standard_normal((T, B, I)), rng.standard_normal((B, 1)))
    ours = gradient_flow(model, batch, "mse")
    ref = _torch_hidden_grads(model, batch.x, batch.target)
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    assert ours.shape == (T,)


def test_gradient_flow_gru_two_layers_by_finite_differences(rng):
    """dL/dh_{T-2} of the top layer: perturb that state through the suffix run directly."""
    T, B, I, H = 5, 2, 3, 3
    model = Model("gru", hidden_size=H, output_size=2, input_size=I, head="last", num_layers=2,
                  dtype="float64", seed=6)
    batch = Batch(rng.standard_normal((T, B, I)), rng.standard_normal((B, 2)))
    norms = gradient_flow(model, batch, "mse")
    # By hand: run T-1 steps, then the last step from the perturbed top state.
    model.eval()
    _, state = model.rnn(batch.x[: T - 1])
    grad = np.zeros((B, H))
    for b, j in np.ndindex(B, H):
        vals = []
        for sign in (1, -1):
            s = state.copy()
            s[1, b, j] += sign * EPS
            out, _ = model.rnn(batch.x[T - 1:], s)
            vals.append(0.5 * ((model.head.forward(out[-1]) - batch.target) ** 2).sum())
        grad[b, j] = (vals[0] - vals[1]) / (2 * EPS)
    assert norms[T - 2] == pytest.approx(np.linalg.norm(grad, axis=1).mean(), rel=1e-6)


def test_same_seed_same_run_other_seed_other_run():
    task = make_task("adding", 6)

    def run(seed):
        model = model_for_task(task, "gru", hidden_size=8, seed=seed)
        opt = Adam(model.params, model.grads, lr=1e-2)
        fit(model, task, opt, np.random.default_rng(seed), steps=4, batch_size=5)
        return model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_fit_learns_the_short_adding_problem():
    task = make_task("adding", 5)
    model = model_for_task(task, "lstm", hidden_size=16, seed=0)
    opt = Adam(model.params, model.grads, lr=1e-2)
    history = fit(model, task, opt, np.random.default_rng(0), steps=300, batch_size=32,
                  clip_norm=1.0)
    mse = history[-1]["test"]["mse"]
    assert mse < 0.2 * task.baseline["mse"], f"test MSE {mse} after 300 steps"
    assert mse == pytest.approx(evaluate(model, task)["mse"], rel=1e-12)


def test_cuda_backend_gives_the_cpu_results(rng):
    if not SIMULATOR:
        pytest.skip("compares against the CPU in float64 under the simulator only")
    T, B, V, H, C = 3, 2, 5, 3, 4
    batch = Batch(rng.integers(0, V, size=(T, B)), rng.integers(0, C, size=(T, B)))
    results = []
    for device in ("cpu", "cuda"):
        model = Model("lstm", hidden_size=H, output_size=C, vocab_size=V, head="all",
                      device=device, dtype="float64", seed=9)
        opt = Adam(model.params, model.grads, lr=1e-2)
        y = model(batch.x)
        _, dy = model.loss(y, batch, "cross_entropy")
        model.backward(dy)
        opt.step()
        results.append(model.state_dict())
    for k in results[0]:
        np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-12, atol=1e-14)


def test_bad_input_is_refused(rng):
    with pytest.raises(ValueError, match="exactly one of input_size"):
        Model("lstm", input_size=2, vocab_size=3)
    with pytest.raises(ValueError, match="cell must be one of"):
        Model("transformer", input_size=2)
    with pytest.raises(ValueError, match="head must be one of"):
        Model("lstm", input_size=2, head="first")
    model = Model("rnn", hidden_size=3, input_size=2, head="last", seed=0)
    with pytest.raises(ValueError, match="every length >= 1"):
        model(rng.standard_normal((4, 2, 2)), lengths=np.array([4, 0]))
    with pytest.raises(TypeError, match="float inputs"):
        model(rng.integers(0, 3, size=(4, 2)))
    tokens = Model("gru", hidden_size=3, vocab_size=4, seed=0)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 4\)"):
        tokens(np.array([[0, 4]]))
    with pytest.raises(ValueError, match="loss_name must be one of"):
        model.loss(np.zeros((2, 1)), Batch(None, np.zeros((2, 1))), "hinge")
    with pytest.raises(ValueError, match="needs a forward first"):
        Model("gru", hidden_size=3, input_size=2).backward(np.zeros((1, 1, 1)))
