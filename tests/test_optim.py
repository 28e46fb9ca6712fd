"""Optimisers and clipping: hand-computed steps, PyTorch's Adam, in-place updates, state
round-trips, and the optimisers minimising a model's loss through its finite-difference-checked
gradients."""
import numpy as np
import pytest
import torch

from gpurnn.nn.optim import SGD, Adam, Momentum, clip_grad_norm, clip_grad_value, global_norm


def _pair(rng, dtype=np.float64):
    params = {"a": rng.standard_normal((3, 4)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in params.items()}
    return params, grads


def test_sgd_is_the_seed_update(rng):
    params, grads = _pair(rng)
    before = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in params.items()}
    SGD(params, grads, lr=0.1).step()
    for k in params:
        assert id(params[k]) == ids[k]  # updated in place
        np.testing.assert_allclose(params[k], before[k] - 0.1 * grads[k], rtol=0, atol=1e-15)


def test_momentum_two_steps_by_hand(rng):
    params, grads = _pair(rng)
    p0 = {k: v.copy() for k, v in params.items()}
    g1 = {k: v.copy() for k, v in grads.items()}
    opt = Momentum(params, grads, lr=0.1, momentum=0.9)
    opt.step()
    for k in grads:
        grads[k][...] = rng.standard_normal(grads[k].shape)
    opt.step()
    for k in params:
        v1 = g1[k]
        v2 = 0.9 * v1 + grads[k]
        np.testing.assert_allclose(params[k], p0[k] - 0.1 * v1 - 0.1 * v2, rtol=1e-14)


def test_adam_first_step_by_hand():
    p = {"w": np.array([1.0, -2.0, 0.5])}
    g = {"w": np.array([0.1, -0.3, 2.0])}
    Adam(p, g, lr=0.01, betas=(0.9, 0.999), eps=1e-8).step()
    # t=1: m = 0.1 g, v = 0.001 g^2; mhat = g, vhat = g^2: the step is lr * g / (|g| + eps)
    expected = np.array([1.0, -2.0, 0.5]) - 0.01 * np.array([0.1, -0.3, 2.0]) / (
        np.abs([0.1, -0.3, 2.0]) + 1e-8)
    np.testing.assert_allclose(p["w"], expected, rtol=0, atol=1e-15)


def test_adam_matches_torch_over_steps(rng):
    params, grads = _pair(rng)
    tparams = [torch.tensor(params[k].copy(), requires_grad=True) for k in params]
    topt = torch.optim.Adam(tparams, lr=3e-3, betas=(0.8, 0.99), eps=1e-7)
    opt = Adam(params, grads, lr=3e-3, betas=(0.8, 0.99), eps=1e-7)
    for _ in range(5):
        for k, tp in zip(params, tparams):
            g = rng.standard_normal(params[k].shape)
            grads[k][...] = g
            tp.grad = torch.tensor(g)
        opt.step()
        topt.step()
    for k, tp in zip(params, tparams):
        np.testing.assert_allclose(params[k], tp.detach().numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [SGD, Momentum, Adam])
def test_float32_updates_stay_float32_and_in_place(cls, rng):
    params, grads = _pair(rng, np.float32)
    ids = {k: id(v) for k, v in params.items()}
    opt = cls(params, grads, lr=1e-2)
    opt.step()
    for k, v in params.items():
        assert v.dtype == np.float32 and id(v) == ids[k]
    for slot in opt.state.values():
        assert all(a.dtype == np.float32 for a in slot.values())


@pytest.mark.parametrize("cls", [Momentum, Adam])
def test_state_round_trip_continues_identically(cls, rng):
    params, grads = _pair(rng)
    twin = {k: v.copy() for k, v in params.items()}
    twin_grads = {k: v.copy() for k, v in grads.items()}
    opt = cls(params, grads, lr=1e-2)
    opt.step()
    opt.step()
    other = cls(twin, twin_grads, lr=1e-2)
    other.load_state_dict(opt.state_dict())
    for k in twin:
        twin[k][...] = params[k]
    opt.step()
    other.step()
    for k in params:
        assert np.array_equal(params[k], twin[k])
    with pytest.raises(ValueError, match="hyperparameters"):
        cls(twin, twin_grads, lr=0.5).load_state_dict(opt.state_dict())


def _by_array_expressions(cls, params, grads, state, t, opt):
    """One step of ``cls`` as NumPy array expressions, in place: the formulas of
    ``kernels/updates.py`` in their order, each operation rounded to the arrays' dtype."""
    for name, p in params.items():
        f, g = p.dtype.type, grads[name]
        if cls is SGD:
            p -= f(opt.lr) * g
        elif cls is Momentum:
            v = state["velocity"][name]
            v *= f(opt.momentum)
            v += g
            p -= f(opt.lr) * v
        else:
            (b1, b2), m, v = opt.betas, state["m"][name], state["v"][name]
            m *= f(b1)
            m += f(1 - b1) * g
            v *= f(b2)
            v += f(1 - b2) * (g * g)
            denom = np.sqrt(v / f(1 - b2 ** t))
            denom += f(opt.eps)
            p -= f(opt.lr / (1 - b1 ** t)) * (m / denom)


@pytest.mark.parametrize("cls", [SGD, Momentum, Adam])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_updates_round_as_the_array_expressions(cls, dtype, rng):
    """The compiled CPU loops (one pass a parameter) give the array expressions' results to
    the bit, step after step, for 2-D and 1-D parameters."""
    params, grads = _pair(rng, dtype)
    twin = {k: v.copy() for k, v in params.items()}
    opt = cls(params, grads, lr=3e-2)
    state = {slot: {k: np.zeros_like(v) for k, v in params.items()} for slot in cls.slots}
    for t in range(1, 5):
        for k in grads:
            grads[k][...] = rng.standard_normal(grads[k].shape)
        opt.step()
        _by_array_expressions(cls, twin, grads, state, t, opt)
        for k in params:
            np.testing.assert_array_equal(params[k], twin[k], err_msg=f"{k}, step {t}")
            for slot in cls.slots:
                np.testing.assert_array_equal(opt.state[slot][k], state[slot][k])


@pytest.mark.parametrize("cls", [SGD, Momentum, Adam])
def test_cuda_update_kernels_match_the_cpu_loops(cls, rng):
    """The CUDA kernels of the updates (the simulator here, a GPU where present) against the CPU
    loops, on a parameter wider than one block of threads and over several rows."""
    from gpurnn.engine.backend import get_backend

    be = get_backend("cuda")
    for dtype in (np.float32, np.float64):
        p = rng.standard_normal((3, 130)).astype(dtype)
        g = rng.standard_normal(p.shape).astype(dtype)
        buffers = [rng.random(p.shape).astype(dtype) for _ in cls.slots]
        opt = cls({"p": p.copy()}, {"p": g}, lr=1e-2)
        opt.t = 3
        scalars = [dtype(c) for c in opt._scalars()]
        want = [a.copy() for a in (p, g, *buffers)]
        get_backend("cpu").update_kernels(dtype)[cls.kernel](3, 130, *want, *scalars)
        got = [be.asarray(a) for a in (p, g, *buffers)]
        be.update_kernels(dtype)[cls.kernel](3, 130, *got, *scalars)
        for name, a, b in zip(("p", "g", *cls.slots), got, want):
            np.testing.assert_allclose(be.to_numpy(a), b, rtol=4 * np.finfo(dtype).eps,
                                       atol=0, err_msg=f"{dtype.__name__} {name}")


def test_clip_grad_norm(rng):
    _, grads = _pair(rng)
    total = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    before = {k: v.copy() for k, v in grads.items()}
    norm = clip_grad_norm(grads, max_norm=0.5, eps=0.0)
    assert float(norm) == pytest.approx(total, rel=1e-12)
    assert float(global_norm(grads)) == pytest.approx(0.5, rel=1e-12)
    for k in grads:  # same direction
        np.testing.assert_allclose(grads[k], before[k] * 0.5 / total, rtol=1e-12)
    # below the threshold: untouched
    clip_grad_norm(grads, max_norm=10.0)
    assert float(global_norm(grads)) == pytest.approx(0.5, rel=1e-12)


def test_clip_grad_value(rng):
    _, grads = _pair(rng)
    before = {k: v.copy() for k, v in grads.items()}
    clip_grad_value(grads, 0.3)
    for k in grads:
        np.testing.assert_array_equal(grads[k], np.clip(before[k], -0.3, 0.3))


def test_bad_arguments(rng):
    params, grads = _pair(rng)
    with pytest.raises(ValueError, match="lr must be > 0"):
        SGD(params, grads, lr=0)
    with pytest.raises(ValueError, match="same names"):
        SGD(params, {"a": grads["a"]}, lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        Adam(params, grads, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0)
    with pytest.raises(TypeError, match="param a and its grad must both be float32 or float64, "
                                        "got float16 and float64"):
        SGD({**params, "a": params["a"].astype(np.float16)}, grads, lr=0.1)
    with pytest.raises(ValueError, match="param a and its grad must be C-contiguous"):
        SGD({**params, "a": np.asfortranarray(params["a"])}, grads, lr=0.1)


@pytest.mark.parametrize("cls,lr", [(SGD, 0.05), (Momentum, 0.02), (Adam, 0.02)])
def test_optimisers_minimise_a_model(cls, lr):
    """The model's gradients (finite-difference checked in test_model.py) driven by each
    optimiser lower the loss of a fixed batch."""
    from gpurnn import Model
    from gpurnn.training.tasks import Batch

    rng = np.random.default_rng(7)
    model = Model("gru", hidden_size=6, output_size=2, input_size=3, head="last",
                  dtype="float64", seed=1)
    x = rng.standard_normal((5, 8, 3))
    batch = Batch(x, x[-1, :, :2] * 0.5)  # learnable: a part of the last input
    opt = cls(model.params, model.grads, lr=lr)

    def loss_and_backward():
        y = model(batch.x)
        loss, dy = model.loss(y, batch, "mse")
        model.backward(dy)
        return loss

    first = loss_and_backward()
    for _ in range(60):
        opt.step()
        last = loss_and_backward()
    assert last < 0.5 * first
