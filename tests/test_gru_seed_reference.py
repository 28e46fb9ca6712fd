"""The default GRU is the seed's cell exactly, checked against a direct NumPy transcription of
the seed's equations (with PyTorch's two bias vectors, which add up in every gate):

    r_t = s(W_r [h_{t-1}, x_t] + b_r)          z_t = s(W_z [h_{t-1}, x_t] + b_z)
    h~_t = tanh(W_h [r_t * h_{t-1}, x_t] + b_h)  h_t = (1 - z_t) * h_{t-1} + z_t * h~_t
"""
import numpy as np
import pytest

from helpers import make


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def seed_gru_reference(p, x, h0):
    """x [T, B, I], h0 [B, H] -> outputs [T, B, H]."""
    H = h0.shape[1]
    W_ih, W_hh = p["weight_ih_l0"], p["weight_hh_l0"]
    b = p["bias_ih_l0"] + p["bias_hh_l0"]
    # The seed's W_r acting on [h, x] is [W_hr, W_ir] side by side.
    W_r = np.hstack([W_hh[:H], W_ih[:H]])
    W_z = np.hstack([W_hh[H:2 * H], W_ih[H:2 * H]])
    W_h = np.hstack([W_hh[2 * H:], W_ih[2 * H:]])
    h, outs = h0, []
    for x_t in x:
        hx = np.concatenate([h, x_t], axis=1)
        r = sigmoid(hx @ W_r.T + b[:H])
        z = sigmoid(hx @ W_z.T + b[H:2 * H])
        h_tilde = np.tanh(np.concatenate([r * h, x_t], axis=1) @ W_h.T + b[2 * H:])
        h = (1 - z) * h + z * h_tilde
        outs.append(h)
    return np.stack(outs)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("T,B,I,H", [(6, 3, 4, 5), (1, 1, 2, 3)])
def test_seed_form_matches_the_equations(device, T, B, I, H, rng):
    layer = make("GRU", {}, I, H, device=device, seed=int(rng.integers(1 << 30)))
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((1, B, H))
    out, h_n = layer(layer.backend.asarray(x), layer.backend.asarray(h0))
    want = seed_gru_reference(layer.state_dict(), x, h0[0])
    np.testing.assert_allclose(layer.backend.to_numpy(out), want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(layer.backend.to_numpy(h_n)[0], want[-1], rtol=1e-12, atol=1e-13)


def test_the_two_forms_differ():
    """reset_after is a different cell, not a relabelling: same weights, different outputs."""
    rng = np.random.default_rng(0)
    seed_form = make("GRU", {}, 3, 4, seed=1)
    torch_form = make("GRU", {"reset_after": True}, 3, 4, seed=1)
    x = rng.standard_normal((5, 2, 3))
    assert not np.allclose(seed_form(x)[0], torch_form(x)[0])
