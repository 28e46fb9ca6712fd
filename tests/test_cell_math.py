"""The scalar math under every kernel: the float32 tanh is accurate to a few ulp, keeps NaN,
and saturates cleanly; the sigmoid never overflows."""
import numba
import numpy as np
import pytest

from gpurnn.kernels.cell_math import _make_tanh, make_cell_math


def _apply(fn, x):
    @numba.njit
    def run(out, x):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    out = np.empty_like(x)
    run(out, x)
    return out


def test_float32_tanh_within_six_ulp():
    x = np.concatenate([np.linspace(-12, 12, 400_001), np.geomspace(1e-8, 1, 20_000),
                        -np.geomspace(1e-8, 1, 20_000)]).astype(np.float32)
    got = _apply(_make_tanh(np.float32), x).astype(np.float64)
    exact = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(got - exact) / ulp) <= 6.0
    assert np.all(np.abs(got) <= 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_special_values(dtype):
    got = _apply(_make_tanh(dtype), np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 30.0], dtype))
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], np.array([1, -1, 0, 0, 1], dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gates_stay_finite_for_huge_pre_activations(dtype):
    """The LSTM element with pre-activations up to 1e30: the sigmoids never overflow exp."""
    math_ = make_cell_math(dtype)
    x = np.array([-1e30, -100, 0, 100, 1e30], dtype)
    H = x.size
    xg = np.tile(x, 4)[None, :]  # [1, 4H]: every gate sees every value
    y, h, c = (np.zeros((1, H), dtype) for _ in range(3))
    gates = np.zeros((1, 4 * H), dtype)
    with np.errstate(all="raise"):
        for j in range(H):
            math_.lstm_forward_elem(0, j, H, y, h, c, gates, xg, np.zeros((1, 4 * H), dtype),
                                    np.zeros(4 * H, dtype), np.zeros((1, H), dtype),
                                    np.zeros((1, H), dtype), np.array([1], np.int32), 0)
    assert np.isfinite(gates).all() and np.isfinite(h).all() and np.isfinite(c).all()
