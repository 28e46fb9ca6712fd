"""Property-based tests (hypothesis) over random cells, forms, sizes (including 1), layer
counts, directions, lengths and dtypes: every backend agrees with an independent float64
NumPy reference of the equations, and gradients agree with finite differences.  The CUDA
backend is drawn too (the simulator without a GPU), with the same seeds."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import host, make, random_state, state_tuple


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def reference_step(mode, opts, p, s, x_t, h, c):
    """One step of one direction in float64, straight from the equations."""
    H = h.shape[1]
    W, U = p[f"weight_ih{s}"], p[f"weight_hh{s}"]
    bi = p.get(f"bias_ih{s}", np.zeros(W.shape[0]))
    bh = p.get(f"bias_hh{s}", np.zeros(W.shape[0]))
    a_x, a_h = x_t @ W.T + bi, h @ U.T + bh
    if mode == "RNN":
        a = a_x + a_h
        return (np.maximum(a, 0) if opts.get("nonlinearity") == "relu" else np.tanh(a)), None
    if mode == "LSTM":
        a = a_x + a_h
        i, f, g, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), sigmoid(a[:, 3 * H:])
        c = f * c + i * g
        return o * np.tanh(c), c
    r = sigmoid(a_x[:, :H] + a_h[:, :H])
    z = sigmoid(a_x[:, H:2 * H] + a_h[:, H:2 * H])
    if opts.get("reset_after"):
        n = np.tanh(a_x[:, 2 * H:] + r * a_h[:, 2 * H:])
        return (1 - z) * n + z * h, None
    n = np.tanh(a_x[:, 2 * H:] + (r * h) @ U[2 * H:].T + bh[2 * H:])
    return (1 - z) * h + z * n, None


def reference(mode, opts, layer, p, x, state, lengths):
    """Whole stacked, optionally bidirectional layer with lengths, float64 NumPy."""
    T, B, _ = x.shape
    D = layer.num_directions
    h0 = state_tuple(state)
    inp, finals = x, [[], []]
    for layer_i in range(layer.num_layers):
        outs = []
        for d in range(D):
            s = f"_l{layer_i}" + ("_reverse" if d else "")
            h = h0[0][layer_i * D + d].copy()
            c = h0[1][layer_i * D + d].copy() if mode == "LSTM" else None
            y = np.zeros((T, B, layer.hidden_size))
            for t in (reversed(range(T)) if d else range(T)):
                hn, cn = reference_step(mode, opts, p, s, inp[t], h, c)
                valid = (t < lengths)[:, None]
                h = np.where(valid, hn, h)
                if c is not None:
                    c = np.where(valid, cn, c)
                y[t] = np.where(valid, hn, 0.0)
            outs.append(y)
            finals[0].append(h)
            finals[1].append(c)
        inp = np.concatenate(outs, axis=2)
    return inp, np.stack(finals[0]), (np.stack(finals[1]) if mode == "LSTM" else None)


CELLS = [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}), ("GRU", {}),
         ("GRU", {"reset_after": True})]


@st.composite
def configs(draw):
    cell, opts = draw(st.sampled_from(CELLS))
    T = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    return dict(cell=cell, opts=opts, T=T, B=B, I=draw(st.integers(1, 4)), H=draw(st.integers(1, 5)),
                layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                lengths=draw(st.one_of(st.none(), st.lists(st.integers(0, T), min_size=B, max_size=B))),
                dtype=draw(st.sampled_from(["float64", "float32"])),
                device=draw(st.sampled_from(["cpu", "cpu", "cuda"])),
                seed=draw(st.integers(0, 2**31 - 1)))


TOL = {"float64": dict(rtol=1e-10, atol=1e-11), "float32": dict(rtol=1e-4, atol=1e-5)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_forward_matches_reference(cfg):
    layer = make(cfg["cell"], cfg["opts"], cfg["I"], cfg["H"], device=cfg["device"],
                 dtype=cfg["dtype"], seed=cfg["seed"], num_layers=cfg["layers"],
                 bidirectional=cfg["bidirectional"])
    rng = np.random.default_rng(cfg["seed"])
    x = rng.standard_normal((cfg["T"], cfg["B"], cfg["I"])).astype(cfg["dtype"])
    state = random_state(layer, cfg["B"], rng)
    lengths = None if cfg["lengths"] is None else np.array(cfg["lengths"])
    out, final = layer(layer.backend.asarray(x), state, lengths=lengths)
    p = {k: v.astype(np.float64) for k, v in layer.state_dict().items()}
    ref_lengths = np.full(cfg["B"], cfg["T"]) if lengths is None else lengths
    want_out, want_h, want_c = reference(cfg["cell"], cfg["opts"], layer, p, x.astype(np.float64),
                                         tuple(host(layer, s) for s in state_tuple(state)), ref_lengths)
    np.testing.assert_allclose(host(layer, out), want_out, **TOL[cfg["dtype"]])
    np.testing.assert_allclose(host(layer, state_tuple(final)[0]), want_h, **TOL[cfg["dtype"]])
    if want_c is not None:
        np.testing.assert_allclose(host(layer, final[1]), want_c, **TOL[cfg["dtype"]])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_gradients_match_finite_differences(cfg):
    """Directional derivative: for a random direction V over all parameters and the input,
    (L(w + eV) - L(w - eV)) / 2e equals <grad, V> (float64)."""
    layer = make(cfg["cell"], cfg["opts"], cfg["I"], cfg["H"], device=cfg["device"], dtype="float64",
                 seed=cfg["seed"], num_layers=cfg["layers"], bidirectional=cfg["bidirectional"])
    rng = np.random.default_rng(cfg["seed"])
    be = layer.backend
    x = be.asarray(rng.standard_normal((cfg["T"], cfg["B"], cfg["I"])))
    state = random_state(layer, cfg["B"], rng)
    lengths = None if cfg["lengths"] is None else np.array(cfg["lengths"])
    out, final = layer(x, state, lengths=lengths)
    R = be.asarray(rng.standard_normal(out.shape))
    Rs = tuple(be.asarray(rng.standard_normal(f.shape)) for f in state_tuple(final))

    def loss():
        o, f = layer(x, state, lengths=lengths)
        return float((o * R).sum() + sum((a * r).sum() for a, r in zip(state_tuple(f), Rs)))

    loss()
    dx, _ = layer.backward(R, Rs if len(Rs) == 2 else Rs[0])
    tensors = [x] + list(layer.params.values())
    grads = [dx] + [layer.grads[k] for k in layer.params]
    V = [be.asarray(rng.standard_normal(t.shape)) for t in tensors]
    predicted = sum(float((g * v).sum()) for g, v in zip(grads, V))
    eps = 1e-6
    for t, v in zip(tensors, V):
        t += eps * v
    up = loss()
    for t, v in zip(tensors, V):
        t -= 2 * eps * v
    down = loss()
    for t, v in zip(tensors, V):
        t += eps * v
    numeric = (up - down) / (2 * eps)
    assert abs(numeric - predicted) <= 1e-6 + 1e-6 * abs(numeric), (numeric, predicted)
