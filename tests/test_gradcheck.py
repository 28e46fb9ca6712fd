"""float64 gradients against central finite differences: every cell and form, every weight,
bias, the input and the initial state, through layers, directions and lengths."""
import numpy as np
import pytest

from conftest import cell_params
from helpers import central_difference, make, random_state, state_tuple

EPS = 1e-6


def _loss_and_seeds(layer, x, state, lengths, rng):
    out, final = layer(x, state, lengths=lengths)
    R = rng.standard_normal(out.shape)
    Rs = tuple(rng.standard_normal(s.shape) for s in state_tuple(final))

    def loss():
        o, f = layer(x, state, lengths=lengths)
        return float((o * R).sum() + sum((s * r).sum() for s, r in zip(state_tuple(f), Rs)))

    return loss, R, Rs


def _check(layer, x, state, lengths, rng, max_entries=40):
    loss, R, Rs = _loss_and_seeds(layer, x, state, lengths, rng)
    layer(x, state, lengths=lengths)
    dstate = Rs if len(Rs) == 2 else Rs[0]
    dx, dstate0 = layer.backward(R, dstate)

    def compare(name, array, analytic):
        flat = list(np.ndindex(array.shape))
        picks = rng.choice(len(flat), size=min(max_entries, len(flat)), replace=False)
        for p in picks:
            idx = flat[p]
            num = central_difference(loss, array, idx, EPS)
            assert abs(num - analytic[idx]) <= 1e-6 + 1e-5 * abs(num), \
                f"{name}{idx}: finite difference {num}, backward {analytic[idx]}"

    grads = {k: v.copy() for k, v in layer.grads.items()}
    for name, p in layer.params.items():
        compare(name, p, grads[name])
    compare("x", x, dx)
    for i, (s, ds) in enumerate(zip(state_tuple(state), state_tuple(dstate0))):
        compare(f"state[{i}]", s, ds)


@cell_params()
@pytest.mark.parametrize("T,B,I,H", [(5, 3, 4, 3), (1, 1, 2, 2)])
def test_single_layer(cell, opts, T, B, I, H, rng):
    layer = make(cell, opts, I, H, seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((T, B, I))
    _check(layer, x, random_state(layer, B, rng), None, rng)


@cell_params()
def test_stacked_bidirectional_with_lengths(cell, opts, rng):
    T, B, I, H = 6, 4, 3, 3
    layer = make(cell, opts, I, H, num_layers=2, bidirectional=True,
                 seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((T, B, I))
    lengths = np.array([6, 2, 0, 4])
    _check(layer, x, random_state(layer, B, rng), lengths, rng, max_entries=25)


@cell_params()
def test_no_bias_batch_first(cell, opts, rng):
    T, B, I, H = 4, 2, 3, 2
    layer = make(cell, opts, I, H, bias=False, batch_first=True, seed=3)
    x = rng.standard_normal((B, T, I))
    _check(layer, x, random_state(layer, B, rng), np.array([3, 4]), rng)
