"""``gpurnn.from_torch(module)`` and ``layer.to_torch()``: the converted layer gives PyTorch's
outputs, and a round trip gives identical parameters."""
import numpy as np
import pytest

import gpurnn
from conftest import CELL_IDS, CELLS
from helpers import make

torch = pytest.importorskip("torch")

TOL = {"float64": dict(rtol=1e-9, atol=1e-10), "float32": dict(rtol=2e-4, atol=2e-5)}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_from_torch_lstm_3_layers_bidirectional(dtype, rng):
    torch.manual_seed(int(rng.integers(1 << 30)))
    ref = torch.nn.LSTM(4, 6, num_layers=3, bidirectional=True, dtype=getattr(torch, dtype))
    layer = gpurnn.from_torch(ref)
    assert (layer.num_layers, layer.bidirectional, layer.dtype.name) == (3, True, dtype)
    T, B = 5, 3
    x = rng.standard_normal((T, B, 4)).astype(dtype)
    h0, c0 = (rng.standard_normal((6, B, 6)).astype(dtype) for _ in range(2))
    out, (h, c) = layer(x, (h0, c0))
    with torch.no_grad():
        o, (th, tc) = ref(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    for mine, theirs in ((out, o), (h, th), (c, tc)):
        np.testing.assert_allclose(mine, theirs.numpy(), **TOL[dtype])


TORCH_CELLS = [(c, o) for c, o in CELLS if not (c == "GRU" and not o.get("reset_after"))]
TORCH_IDS = [i for i, (c, o) in zip(CELL_IDS, CELLS) if (c, o) in TORCH_CELLS]


@pytest.mark.parametrize("cell,opts", TORCH_CELLS, ids=TORCH_IDS)
def test_round_trip_identical(cell, opts, rng):
    layer = make(cell, opts, 3, 5, num_layers=2, bidirectional=True, batch_first=True,
                 dropout=0.25, seed=int(rng.integers(1 << 30)))
    module = layer.to_torch()
    assert type(module) is getattr(torch.nn, cell)
    assert (module.num_layers, module.bidirectional, module.batch_first, module.dropout) == \
        (2, True, True, 0.25)
    assert module.weight_ih_l0.dtype == torch.float64
    back = gpurnn.from_torch(module, device="cpu")
    assert repr(back) == repr(layer)
    assert (back.batch_first, back.dropout) == (True, 0.25)
    mine, theirs = layer.state_dict(), back.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        np.testing.assert_array_equal(theirs[k], mine[k], err_msg=k)

    # Same outputs as PyTorch in inference, through the module built by to_torch.
    x = rng.standard_normal((2, 4, 3))  # [B, T, I]
    out, _ = layer.eval()(x)
    with torch.no_grad():
        o, _ = module.eval()(torch.from_numpy(x))
    np.testing.assert_allclose(out, o.numpy(), **TOL["float64"])


def test_rnn_relu_and_no_bias(rng):
    ref = torch.nn.RNN(3, 4, nonlinearity="relu", bias=False, dtype=torch.float64)
    layer = gpurnn.from_torch(ref)
    assert layer.nonlinearity == "relu" and not layer.bias
    assert set(layer.params) == {"weight_ih_l0", "weight_hh_l0"}


def test_seed_form_gru_refused():
    with pytest.raises(ValueError, match="seed's form.*PyTorch has no module"):
        gpurnn.GRU(3, 4).to_torch()


def test_bad_modules_refused():
    with pytest.raises(ValueError, match="proj_size=2"):
        gpurnn.from_torch(torch.nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(TypeError, match="torch.nn.RNN, LSTM or GRU.*Linear"):
        gpurnn.from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="torch.nn.RNN, LSTM or GRU.*Linear"):
        gpurnn.from_torch(torch.nn.Linear(3, 4).half())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_modules_round_trip(dtype):
    """A torch module in 16 bits becomes a gpurnn layer of that dtype (float32 masters holding
    the module's values exactly) and back."""
    module = torch.nn.GRU(3, 4, num_layers=2).to(getattr(torch, dtype))
    layer = gpurnn.from_torch(module)
    assert layer.dtype.name == dtype and layer.param_dtype == np.float32
    for name, p in module.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[name], p.float().numpy())
    back = layer.to_torch()
    assert back.weight_hh_l1.dtype == getattr(torch, dtype)
    for name, p in module.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def test_device_argument(tmp_path, rng):
    """from_torch and from_onnx build the layer on the device asked for (CUDA: the simulator
    in CI) with the same outputs."""
    ref = torch.nn.GRU(3, 4, num_layers=2, dtype=torch.float64)
    x = rng.standard_normal((3, 2, 3))
    with torch.no_grad():
        expected = ref(torch.from_numpy(x))[0].numpy()
    layer = gpurnn.from_torch(ref, device="cuda")
    assert layer.device == "cuda"
    out, _ = layer.eval()(layer.backend.asarray(x))
    np.testing.assert_allclose(layer.backend.to_numpy(out), expected, **TOL["float64"])
    layer.to_onnx(tmp_path / "m.onnx")
    back = gpurnn.from_onnx(tmp_path / "m.onnx", device="cuda")
    assert back.device == "cuda"
    out, _ = back.eval()(back.backend.asarray(x))
    np.testing.assert_allclose(back.backend.to_numpy(out), expected, **TOL["float64"])
