"""ONNX export and import: onnxruntime runs ``layer.to_onnx(path)`` and gives gpurnn's outputs
(an independent implementation, also of the seed-form GRU), in the default form fed ``X`` alone
and in the forms that also take the lengths and the initial states, and ``from_onnx`` reads
every form back with identical parameters.

onnxruntime's CPU RNN/LSTM/GRU kernels run float32 only ("does not support double yet"), so
the runtime comparisons are float32; float64 models are checked by the exact round trip.
"""
import os

import numpy as np
import pytest

import gpurnn
from conftest import CELL_IDS, CELLS, cell_params
from helpers import make

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# float32 through two different kernels (gpurnn's, onnxruntime's MLAS), as in test_torch_parity.
TOL32 = dict(rtol=2e-4, atol=2e-5)


#: the full form: X, sequence_lens and the initial states as inputs
FULL = dict(sequence_lens=True, initial_states=True)


def run_ort(path, x, lengths=None, state=None):
    """Y, Y_h (, Y_c) of the ONNX model at ``path``, fed ``x`` and what else is given; the
    model must have exactly those inputs."""
    feeds = {"X": x}
    if lengths is not None:
        feeds["sequence_lens"] = lengths.astype(np.int32)
    if state is not None:
        parts = state if isinstance(state, tuple) else (state,)
        feeds["initial_h"] = parts[0]
        if len(parts) == 2:
            feeds["initial_c"] = parts[1]
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(feeds)
    return session.run(None, feeds)


def random_inputs(layer, T, B, rng, lengths=None):
    shape = (B, T, layer.input_size) if layer.batch_first else (T, B, layer.input_size)
    x = rng.standard_normal(shape).astype(layer.dtype)
    sshape = (layer.num_layers * layer.num_directions, B, layer.hidden_size)
    parts = tuple(rng.standard_normal(sshape).astype(layer.dtype) * 0.5
                  for _ in range(2 if layer.cell.has_cell_state else 1))
    if lengths is None:  # random, in neither ascending nor descending order (B >= 3, T >= 3)
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0], lengths[B // 2], lengths[-1] = rng.integers(2, T), T, 1
    return x, np.asarray(lengths, np.int32), parts if len(parts) == 2 else parts[0]


def assert_runtime_matches(layer, path, x, lengths=None, state=None):
    out, final = layer(x, state, lengths=lengths)
    got = run_ort(path, x, lengths, state)
    finals = final if isinstance(final, tuple) else (final,)
    assert len(got) == 1 + len(finals)
    np.testing.assert_allclose(got[0], out, err_msg="Y", **TOL32)
    for name, mine, theirs in zip(("Y_h", "Y_c"), finals, got[1:]):
        np.testing.assert_allclose(theirs, mine, err_msg=name, **TOL32)
    return out, got


@cell_params()
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_onnxruntime_gives_gpurnn_outputs(cell, opts, bidirectional, tmp_path, rng):
    layer = make(cell, opts, 3, 7, dtype="float32", num_layers=2, bidirectional=bidirectional,
                 seed=int(rng.integers(1 << 30)))
    path = tmp_path / "m.onnx"
    layer.to_onnx(path, **FULL)
    T, B = 6, 5
    x, lengths, state = random_inputs(layer, T, B, rng)
    out, got = assert_runtime_matches(layer, path, x, lengths, state)
    # Both zero the outputs of padded steps (a check that the comparison above covers them).
    for b, n in enumerate(lengths):
        assert np.all(got[0][n:, b] == 0) and np.all(out[n:, b] == 0)


@pytest.mark.parametrize("cell,opts", [CELLS[2], CELLS[3]], ids=[CELL_IDS[2], CELL_IDS[3]])
def test_batch_first_and_no_bias(cell, opts, tmp_path, rng):
    for kw in (dict(batch_first=True), dict(bias=False)):
        layer = make(cell, opts, 4, 5, dtype="float32", num_layers=2, bidirectional=True,
                     seed=int(rng.integers(1 << 30)), **kw)
        path = tmp_path / "m.onnx"
        layer.to_onnx(path, **FULL)
        x, lengths, state = random_inputs(layer, 5, 3, rng)
        assert_runtime_matches(layer, path, x, lengths, state)
        back = gpurnn.from_onnx(path)
        assert (back.batch_first, back.bias) == (layer.batch_first, layer.bias)


def test_zero_length_sequence_final_state_differs(tmp_path, rng):
    """A zero-length sequence: both give zero outputs; gpurnn's final state is the initial
    state (documented in RNNBase.forward), onnxruntime's is zero."""
    layer = make("LSTM", {}, 3, 4, dtype="float32", seed=3)
    path = tmp_path / "m.onnx"
    layer.to_onnx(path, **FULL)
    x, _, state = random_inputs(layer, 4, 3, rng)
    lengths = np.array([4, 0, 2], np.int32)
    out, (h, c) = layer(x, state, lengths=lengths)
    Y, Y_h, Y_c = run_ort(path, x, lengths, state)
    np.testing.assert_allclose(Y, out, **TOL32)
    keep = [0, 2]
    np.testing.assert_allclose(Y_h[:, keep], h[:, keep], **TOL32)
    np.testing.assert_allclose(Y_c[:, keep], c[:, keep], **TOL32)
    np.testing.assert_array_equal(h[:, 1], state[0][:, 1])
    assert np.all(Y_h[:, 1] == 0) and np.all(Y_c[:, 1] == 0)


@cell_params()
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_onnxruntime_fed_x_alone(cell, opts, bidirectional, tmp_path, rng):
    """The default export takes X alone: full lengths and zero initial states, as a layer
    called with no lengths and no state."""
    layer = make(cell, opts, 3, 7, dtype="float32", num_layers=2, bidirectional=bidirectional,
                 seed=int(rng.integers(1 << 30)))
    path = tmp_path / "m.onnx"
    layer.to_onnx(path)
    x = rng.standard_normal((6, 5, 3)).astype(np.float32)
    assert_runtime_matches(layer, path, x)


@pytest.mark.parametrize("cell,opts", [CELLS[2], CELLS[4]], ids=[CELL_IDS[2], CELL_IDS[4]])
def test_onnxruntime_fed_x_and_lengths(cell, opts, tmp_path, rng):
    layer = make(cell, opts, 3, 4, dtype="float32", num_layers=2, bidirectional=True,
                 seed=int(rng.integers(1 << 30)))
    path = tmp_path / "m.onnx"
    layer.to_onnx(path, sequence_lens=True)
    x, lengths, _ = random_inputs(layer, 6, 4, rng)
    assert_runtime_matches(layer, path, x, lengths)


@cell_params()
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("form", [{}, dict(sequence_lens=True), dict(initial_states=True), FULL],
                         ids=["x", "x_lengths", "x_states", "full"])
def test_round_trip_identical(cell, opts, dtype, form, tmp_path):
    layer = make(cell, opts, 3, 5, dtype=dtype, num_layers=2, bidirectional=True, seed=11)
    path = tmp_path / "m.onnx"
    layer.to_onnx(path, **form)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    back = gpurnn.from_onnx(path)
    assert repr(back) == repr(layer)
    mine, theirs = layer.state_dict(), back.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert theirs[k].dtype == mine[k].dtype
        np.testing.assert_array_equal(theirs[k], mine[k], err_msg=k)


def test_seed_gru_z_rows_are_negated(tmp_path):
    """The seed-form GRU's z block is stored negated (ONNX's z is 1 - gpurnn's), the
    reset-after form's unchanged; blocks in ONNX's z, r, h order."""
    H = 4
    for reset_after, sign in ((False, -1), (True, 1)):
        layer = gpurnn.GRU(3, H, reset_after=reset_after, seed=5)
        path = tmp_path / f"gru{int(reset_after)}.onnx"
        layer.to_onnx(path)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
        W, R, Bias = inits["W_l0"][0], inits["R_l0"][0], inits["B_l0"][0]
        p = layer.params
        np.testing.assert_array_equal(W[:H], sign * p["weight_ih_l0"][H:2 * H])  # z
        np.testing.assert_array_equal(W[H:2 * H], p["weight_ih_l0"][:H])  # r
        np.testing.assert_array_equal(R[2 * H:], p["weight_hh_l0"][2 * H:])  # h
        np.testing.assert_array_equal(Bias[:H], sign * p["bias_ih_l0"][H:2 * H])
        np.testing.assert_array_equal(Bias[3 * H:4 * H], sign * p["bias_hh_l0"][H:2 * H])


def test_from_onnx_refuses_other_graphs(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])
    other = helper.make_model(helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                                                [x], [y]))
    path = tmp_path / "other.onnx"
    onnx.save(other, path)
    with pytest.raises(ValueError, match="not a model written by gpurnn's to_onnx.*RNN, LSTM or GRU"):
        gpurnn.from_onnx(path)

    # Our own model with one node changed is refused too, naming the node.
    gpurnn.LSTM(3, 4, num_layers=2).to_onnx(path)
    model = onnx.load(path)
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose")
    transpose.attribute[0].ints[:] = [0, 1, 2, 3]
    onnx.save(model, path)
    with pytest.raises(ValueError, match="graph differs at node"):
        gpurnn.from_onnx(path)

    # An input the nodes do not read is refused too.
    gpurnn.GRU(3, 4).to_onnx(path)
    model = onnx.load(path)
    model.graph.input.append(onnx.helper.make_tensor_value_info("sequence_lens",
                                                                onnx.TensorProto.INT32, [2]))
    onnx.save(model, path)
    with pytest.raises(ValueError, match="graph differs at node"):
        gpurnn.from_onnx(path)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    gpurnn.RNN(2, 3, seed=1).to_onnx(path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        gpurnn.RNN(2, 3, seed=2).to_onnx(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary file left behind


@cell_params()
def test_float16_layers_export_float16_models_and_read_back(cell, opts, tmp_path):
    """A float16 layer's model holds its weights in float16, as its GEMMs see them; reading it
    back gives a float16 layer with those values.  (onnxruntime's CPU kernels have no float16
    RNN to run it with.)"""
    layer = make(cell, opts, 3, 4, dtype="float16", num_layers=2)
    path = tmp_path / "half.onnx"
    layer.to_onnx(path, **FULL)
    model = onnx.load(path)
    assert {t.data_type for t in model.graph.initializer if t.name.startswith("W")} == \
        {onnx.TensorProto.FLOAT16}
    back = gpurnn.from_onnx(path)
    assert back.dtype == np.float16
    for name, value in layer.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name],
                                      value.astype(np.float16).astype(np.float32), name)


def test_bfloat16_layers_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="takes float16, float32 or float64, not bfloat16"):
        gpurnn.LSTM(3, 4, dtype="bfloat16").to_onnx(tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
