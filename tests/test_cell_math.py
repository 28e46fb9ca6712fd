"""The scalar math under every kernel: the float32 tanh and sigmoid are accurate to a few ulp
over the whole float32 range, keep NaN and saturate cleanly; the gates never overflow."""
import numba
import numpy as np
import pytest

from gpurnn.kernels.cell_math import make_cell_math
from gpurnn.kernels.cpu import KERNEL_OPTIONS


def _apply(fn, x):
    @numba.njit(**KERNEL_OPTIONS)  # as the CPU kernels compile it
    def run(out, x):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    out = np.empty_like(x)
    run(out, x)
    return out


def _float32_sweep():
    """Every 257th float32 bit pattern (all signs, exponents, subnormals; no NaN or inf),
    plus a dense grid where the functions bend."""
    bits = np.arange(0, 2**32, 257, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    return np.concatenate([x, np.linspace(-20, 20, 400_001, dtype=np.float32)])


def _ulp_error(got, exact):
    """|got - exact| in units of the float32 spacing at |exact| (subnormal spacing below the
    least normal)."""
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / ulp


def test_float32_tanh_within_six_ulp():
    x = np.concatenate([_float32_sweep(), np.geomspace(1e-8, 1, 20_000, dtype=np.float32),
                        -np.geomspace(1e-8, 1, 20_000, dtype=np.float32)])
    got = _apply(make_cell_math(np.float32).tanh, x)
    assert np.max(_ulp_error(got, np.tanh(x.astype(np.float64)))) <= 6.0
    assert np.all(np.abs(got) <= 1.0)


def _sigmoid64(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def test_float32_sigmoid_within_three_ulp_over_the_whole_range():
    x = _float32_sweep()
    got = _apply(make_cell_math(np.float32).sigmoid, x)
    err = _ulp_error(got, _sigmoid64(x.astype(np.float64)))
    assert np.max(err) <= 3.0, f"{np.max(err):.2f} ulp at x={x[np.argmax(err)]!r}"
    assert np.all((got >= 0) & (got <= 1))
    # The lower tail keeps its relative accuracy down to the least normal float32 (no
    # cancellation as in 0.5 + 0.5 tanh(x/2), which is 0 there).
    tails = np.array([-20, -50, -87, 20], np.float32)
    np.testing.assert_allclose(_apply(make_cell_math(np.float32).sigmoid, tails),
                               _sigmoid64(tails.astype(np.float64)), rtol=3e-7, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values(dtype):
    m = make_cell_math(dtype)
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 100.0, -800.0], dtype)
    tanh, sigmoid = _apply(m.tanh, x), _apply(m.sigmoid, x)
    assert np.isnan(tanh[0]) and np.isnan(sigmoid[0])
    assert np.isnan(m.rnn_forward(dtype(np.nan), 1))  # ReLU
    np.testing.assert_array_equal(tanh[1:], np.array([1, -1, 0, 0, 1, -1], dtype))
    np.testing.assert_array_equal(sigmoid[1:], np.array([1, 0, 0.5, 0.5, 1, 0], dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gates_stay_finite_for_huge_pre_activations(dtype):
    """The LSTM and GRU math with pre-activations up to 1e30: nothing overflows."""
    m = make_cell_math(dtype)
    values = np.array([-1e30, -100, 0, 100, 1e30], dtype)
    one = dtype(1)
    with np.errstate(all="raise"):
        for a in values:
            for b in values:
                assert np.isfinite(m.lstm_forward(a, b, a, b, one)).all()
                assert np.isfinite(m.gru_reset_after_forward(a, b, a, b, one)).all()
                assert np.isfinite(m.gru_reset_before_gates(a, b, one)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_flushes_subnormal_gradients_to_zero(dtype):
    m = make_cell_math(dtype)
    tiny = np.finfo(dtype).tiny  # the smallest normal number
    half = dtype(0.5)
    calls = {  # each backward function with dL/dh = d and gate values of 0.5
        "rnn": lambda d: (m.rnn_backward(d, half, False), m.rnn_backward(d, half, True)),
        # (the LSTM's sixth value is the state it rebuilds, not a gradient)
        "lstm": lambda d: m.lstm_backward(d, d, half, half, half, half, half, half)[:5],
        "gru_reset_after": lambda d: m.gru_reset_after_backward(d, half, half, half, half, one),
        "gru_reset_before_candidate": lambda d: m.gru_reset_before_candidate_backward(
            d, half, half, one),
        "gru_reset_before_gates": lambda d: m.gru_reset_before_gates_backward(d, half, half),
    }
    one = dtype(1)
    for name, call in calls.items():
        normal = np.array(call(dtype(1)), dtype)
        assert np.all(np.abs(normal) >= tiny), name            # untouched above the threshold
        sinking = np.array(call(dtype(tiny / 4)), dtype)       # a subnormal dL/dh
        assert np.all(sinking == 0), f"{name}: {sinking}"
        if name != "rnn":  # a normal dL/dh whose products with the gates fall below tiny
            near = np.abs(np.array(call(dtype(tiny * 4)), dtype))
            assert np.any(near == 0) and np.all((near == 0) | (near >= tiny)), f"{name}: {near}"
        assert np.all(np.isnan(np.array(call(dtype(np.nan)), dtype))), name


def test_a_vanishing_gradient_reaches_zero_not_the_subnormals(rng):
    """A float32 LSTM whose loss is on the last of 400 steps: the gradient falls by about a
    third per step back in time, through float32's subnormal range (below 1.2e-38), where x86
    arithmetic is slow (cell_math's docstring); the step kernels leave zeros instead."""
    from gpurnn.engine import drivers
    from gpurnn.engine.backend import CPUBackend

    T, B, I, H = 400, 4, 1, 16
    cell = drivers.CellSpec("lstm")
    w = drivers.Weights(*(rng.uniform(-0.25, 0.25, s).astype(np.float32)
                          for s in [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]))
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = np.zeros((B, H), np.float32)
    cpu = CPUBackend()
    ws = drivers.Workspace(cpu)
    lengths = np.full(B, T, np.int32)
    _, tape = drivers.forward(cpu, cell, w, x, h0, h0.copy(), lengths, False, True, ws)
    dy = np.zeros((T, B, H), np.float32)
    dy[-1] = 1
    grads = drivers.Weights(*(np.empty_like(a) for a in (w.w_ih, w.w_hh, w.b_ih, w.b_hh)))
    drivers.backward(cpu, cell, w, tape, dy, np.zeros_like(h0), np.zeros_like(h0), grads, ws)
    dg = cpu.scratch("preact", (T, B, 4 * H), np.float32)
    magnitude = np.abs(dg).max(axis=(1, 2))  # [T] the largest pre-activation gradient per step
    assert magnitude[-1] > 1e-2 and magnitude[0] == 0  # it did vanish on the way back
    assert np.all((dg == 0) | (np.abs(dg) >= np.finfo(np.float32).tiny))


def _splitmix64_reference(seed, count):
    """The first ``count`` outputs of SplitMix64 seeded with ``seed``, as Vigna's
    ``splitmix64.c`` steps it, in Python integers."""
    mask, state, out = 2 ** 64 - 1, seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_dropout_draws_are_splitmix64_outputs():
    """Each draw is SplitMix64's output at its position, computed on its own; the first output
    for seed 0 is the generator's published first value."""
    from gpurnn.kernels.cell_math import splitmix64

    assert int(splitmix64(0, 0)) == 0xE220A8397B1DCDAF
    for seed in (0, 1, 2 ** 63 - 1):
        want = _splitmix64_reference(seed, 50)
        assert [int(splitmix64(seed, k)) for k in range(50)] == want
