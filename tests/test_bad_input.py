"""Bad input gets a ValueError or TypeError that names what was expected and what came,
before any kernel runs."""
import numpy as np
import pytest

import gpurnn
from helpers import make


@pytest.fixture
def lstm():
    return gpurnn.LSTM(3, 4, seed=0)


def x_of(T=5, B=2, I=3, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)


@pytest.mark.parametrize("bad,error,words", [
    (np.zeros((5, 3), np.float32), ValueError, "3-D"),
    (np.zeros((5, 2, 4), np.float32), ValueError, "input size 3"),
    (np.zeros((5, 2, 3), np.float64), TypeError, "float32"),
    (np.zeros((5, 2, 3), np.int32), TypeError, "float32"),
    ([[[0.0] * 3]], TypeError, "numpy.ndarray"),
    (np.zeros((0, 2, 3), np.float32), ValueError, "at least one step"),
    (np.zeros((5, 0, 3), np.float32), ValueError, "at least one step"),
])
def test_bad_x(lstm, bad, error, words):
    with pytest.raises(error, match=words):
        lstm(bad)


def test_bad_state(lstm):
    x = x_of()
    h = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(TypeError, match=r"tuple \(h, c\)"):
        lstm(x, h)
    with pytest.raises(ValueError, match=r"\(1, 2, 4\)"):
        lstm(x, (h, np.zeros((1, 3, 4), np.float32)))
    with pytest.raises(ValueError, match=r"\(1, 2, 4\)"):
        lstm(x, (np.zeros((2, 2, 4), np.float32), h))  # wrong layer count
    with pytest.raises(TypeError, match="float32"):
        lstm(x, (h, h.astype(np.float64)))
    gru = gpurnn.GRU(3, 4)
    with pytest.raises(TypeError, match="one array"):
        gru(x, (h, h))


def test_backward_needs_a_training_forward(lstm):
    with pytest.raises(ValueError, match="training forward"):
        lstm.backward(np.zeros((5, 2, 4), np.float32))
    lstm.eval()
    out, _ = lstm(x_of())
    with pytest.raises(ValueError, match="inference mode"):
        lstm.backward(out)
    lstm.train()
    with gpurnn.no_grad():
        lstm(x_of())
    with pytest.raises(ValueError, match="inference mode"):
        lstm.backward(out)


def test_dout_must_match_the_last_forward(lstm):
    lstm(x_of(T=5))
    with pytest.raises(ValueError, match=r"\(5, 2, 4\)"):
        lstm.backward(np.zeros((4, 2, 4), np.float32))
    with pytest.raises(TypeError, match="float32"):
        lstm.backward(np.zeros((5, 2, 4), np.float64))
    with pytest.raises(ValueError, match=r"\(1, 2, 4\)"):
        lstm.backward(np.zeros((5, 2, 4), np.float32), (np.zeros((1, 1, 4), np.float32),) * 2)


@pytest.mark.parametrize("lengths,error,words", [
    ([5], ValueError, r"shape \(2,\)"),
    ([5, 6], ValueError, r"\[0, T=5\]"),
    ([-1, 2], ValueError, r"\[0, T=5\]"),
    ([1.5, 2], TypeError, "integers"),
    (np.array([[1, 2]]), ValueError, r"shape \(2,\)"),
])
def test_bad_lengths(lstm, lengths, error, words):
    with pytest.raises(error, match=words):
        lstm(x_of(), lengths=lengths)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(input_size=0, hidden_size=3), ValueError, "input_size"),
    (dict(input_size=3, hidden_size=2.5), ValueError, "hidden_size"),
    (dict(input_size=3, hidden_size=2, num_layers=0), ValueError, "num_layers"),
    (dict(input_size=3, hidden_size=2, dtype="int8"), ValueError, "float32.*bfloat16"),
    (dict(input_size=3, hidden_size=2, device="tpu"), ValueError, "'cpu', 'cuda' or 'auto'"),
    (dict(input_size=3, hidden_size=2, dropout=1.0), ValueError, "dropout"),
])
def test_bad_constructor(kwargs, error, words):
    with pytest.raises(error, match=words):
        gpurnn.LSTM(**kwargs)


def test_bad_nonlinearity():
    with pytest.raises(ValueError, match="'tanh' or 'relu'"):
        gpurnn.RNN(3, 2, nonlinearity="sigmoid")


def test_bad_state_dict(lstm):
    sd = lstm.state_dict()
    with pytest.raises(ValueError, match="missing"):
        lstm.load_state_dict({k: v for k, v in sd.items() if k != "bias_hh_l0"})
    with pytest.raises(ValueError, match="unexpected"):
        lstm.load_state_dict({**sd, "weight_ih_l1": sd["weight_ih_l0"]})
    with pytest.raises(ValueError, match=r"weight_hh_l0 must have shape \(16, 4\)"):
        lstm.load_state_dict({**sd, "weight_hh_l0": np.zeros((16, 5))})
    before = lstm.state_dict()
    with pytest.raises(ValueError):  # a bad entry leaves the layer untouched
        lstm.load_state_dict({**sd, "weight_ih_l0": sd["weight_ih_l0"] + 1, "bias_ih_l0": np.zeros(3)})
    for k, v in lstm.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_non_finite_input_does_not_crash(lstm):
    x = x_of()
    x[2, 1, 0] = np.nan
    x[3, 0, 1] = np.inf
    out, (h, c) = lstm(x)
    assert np.isnan(out[2:, 1]).all()  # NaN propagates to its own sequence only
    assert np.isfinite(out[:3, 0]).all()
    dx, _ = lstm.backward(np.ones_like(out))
    assert dx.shape == x.shape


def test_wrong_device_array_is_refused():
    layer = make("GRU", {}, 3, 4, device="cuda", dtype="float32")
    if layer.backend.host_arrays:
        pytest.skip("under the CUDA simulator device arrays are NumPy arrays")
    with pytest.raises(TypeError, match="cupy.ndarray"):
        layer(x_of())
