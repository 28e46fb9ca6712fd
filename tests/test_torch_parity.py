"""Agreement with PyTorch's nn.RNN / nn.LSTM / nn.GRU on the same weights: outputs, final
states and every gradient, in float64 and float32, at odd sizes."""
import numpy as np
import pytest

from helpers import host, make, state_tuple

torch = pytest.importorskip("torch")

# PyTorch's GRU is the reset-after form; the seed-form GRU is checked in test_gru_seed_reference.
TORCH_CELLS = [("RNN", {}, "RNN"), ("RNN", {"nonlinearity": "relu"}, "RNN"),
               ("LSTM", {}, "LSTM"), ("GRU", {"reset_after": True}, "GRU")]
TOL = {"float64": dict(rtol=1e-9, atol=1e-10), "float32": dict(rtol=2e-4, atol=2e-5)}


def _torch_twin(layer, torch_cls, opts):
    kw = dict(num_layers=layer.num_layers, bias=layer.bias, bidirectional=layer.bidirectional,
              batch_first=layer.batch_first)
    if "nonlinearity" in opts:
        kw["nonlinearity"] = opts["nonlinearity"]
    ref = getattr(torch.nn, torch_cls)(layer.input_size, layer.hidden_size, **kw)
    ref = ref.to(torch.float64 if layer.dtype == np.float64 else torch.float32)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    return ref


def run_both(layer, ref, x, state, lengths, rng):
    """Forward and backward through both; returns dicts of gpurnn and torch results."""
    dev_state = tuple(layer.backend.asarray(s) for s in state_tuple(state))
    out, final = layer(layer.backend.asarray(x), dev_state if len(dev_state) == 2 else dev_state[0],
                       lengths=lengths)
    R = rng.standard_normal(out.shape).astype(layer.dtype)
    Rs = tuple(rng.standard_normal(s.shape).astype(layer.dtype) for s in state_tuple(final))
    dx, dstate = layer.backward(layer.backend.asarray(R),
                                Rs if len(Rs) == 2 else Rs[0])
    mine = {"out": out, "dx": dx}
    for i, (s, d) in enumerate(zip(state_tuple(final), state_tuple(dstate))):
        mine[f"state{i}"], mine[f"dstate{i}"] = s, d
    for k, g in layer.grads.items():
        mine[k] = g

    xt = torch.tensor(x, requires_grad=True)
    st = tuple(torch.tensor(s, requires_grad=True) for s in state_tuple(state))
    st_arg = st if len(st) == 2 else st[0]
    if lengths is not None:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=layer.batch_first,
                                      enforce_sorted=False)
        o, f = ref(packed, st_arg)
        o, _ = pad_packed_sequence(o, batch_first=layer.batch_first, total_length=x.shape[1 if layer.batch_first else 0])
    else:
        o, f = ref(xt, st_arg)
    ft = f if isinstance(f, tuple) else (f,)
    loss = (o * torch.from_numpy(R)).sum() + sum((a * torch.from_numpy(r)).sum() for a, r in zip(ft, Rs))
    loss.backward()
    theirs = {"out": o.detach().numpy(), "dx": xt.grad.numpy()}
    for i, (a, s) in enumerate(zip(ft, st)):
        theirs[f"state{i}"], theirs[f"dstate{i}"] = a.detach().numpy(), s.grad.numpy()
    for k, p in ref.named_parameters():
        theirs[k] = p.grad.numpy()
    return {k: host(layer, v) for k, v in mine.items()}, theirs


def assert_match(mine, theirs, dtype):
    assert set(mine) == set(theirs)
    for k in mine:
        np.testing.assert_allclose(mine[k], theirs[k], err_msg=k, **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell,opts,torch_cls", TORCH_CELLS, ids=["rnn_tanh", "rnn_relu", "lstm", "gru"])
@pytest.mark.parametrize("T,B,I,H", [(7, 3, 5, 37), (1, 1, 3, 4), (9, 1, 2, 5)])
def test_single_layer(cell, opts, torch_cls, T, B, I, H, dtype, rng):
    layer = make(cell, opts, I, H, dtype=dtype, seed=int(rng.integers(1 << 30)))
    ref = _torch_twin(layer, torch_cls, opts)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    n = 2 if cell == "LSTM" else 1
    state = tuple(rng.standard_normal((1, B, H)).astype(dtype) * 0.5 for _ in range(n))
    mine, theirs = run_both(layer, ref, x, state if n == 2 else state[0], None, rng)
    assert_match(mine, theirs, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell,opts,torch_cls", TORCH_CELLS, ids=["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_three_layers_bidirectional_lengths_random_order(cell, opts, torch_cls, dtype, rng):
    T, B, I, H = 8, 5, 4, 6
    layer = make(cell, opts, I, H, dtype=dtype, num_layers=3, bidirectional=True,
                 seed=int(rng.integers(1 << 30)))
    ref = _torch_twin(layer, torch_cls, opts)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    n = 2 if cell == "LSTM" else 1
    state = tuple(rng.standard_normal((6, B, H)).astype(dtype) * 0.5 for _ in range(n))
    lengths = np.array([3, 8, 1, 6, 5])
    mine, theirs = run_both(layer, ref, x, state if n == 2 else state[0], lengths, rng)
    assert_match(mine, theirs, dtype)


@pytest.mark.parametrize("cell,opts,torch_cls", TORCH_CELLS[2:], ids=["lstm", "gru"])
def test_batch_first_two_layers(cell, opts, torch_cls, rng):
    T, B, I, H = 5, 4, 3, 7
    layer = make(cell, opts, I, H, num_layers=2, batch_first=True, seed=11)
    ref = _torch_twin(layer, torch_cls, opts)
    x = rng.standard_normal((B, T, I))
    n = 2 if cell == "LSTM" else 1
    state = tuple(rng.standard_normal((2, B, H)) * 0.5 for _ in range(n))
    mine, theirs = run_both(layer, ref, x, state if n == 2 else state[0], np.array([5, 2, 4, 1]), rng)
    assert_match(mine, theirs, "float64")
