"""Layers of dtype float16 and bfloat16: 16-bit storage, float32 compute (docs/precision.md).

The bound against float32.  With unit roundoff ``u`` (2^-8 for bfloat16's 8 significant bits,
2^-11 for float16's 11), a 16-bit layer differs from the float32 layer on the same weights by
rounding: the input and the weights once (relative ``u`` each), and at every step the stored
state, saved gates and gradients (``u`` each).  Each step's gate math takes those rounded
values through derivatives of at most 1 (tanh) and 1/4 (sigmoid), and with weights drawn
from U(-1/sqrt(H), 1/sqrt(H)) the recurrence contracts, so errors of earlier steps fade
instead of adding up.  Measured over three input draws (T=30, H=32, both directions): at most
2.2 u in bfloat16 (the LSTM and the reset-before GRU) and 1.8 u in float16.  The tests allow
4 u, on the outputs (absolute; |h| is near 1 or below here) and on each gradient relative to its largest entry.
Rounding toward zero instead of to nearest, a bias of half an ulp at every rounding, measured
3.0-4.3 u in bfloat16 (over 4 u for the LSTM).

The ReLU RNN's gradients are the exception: its derivative jumps where a pre-activation
crosses zero, and a 16-bit forward puts some pre-activations near zero on the other side, so
whole terms of the gradient sums change (measured: up to 56 u on the weight gradients).  Its
outputs, which are continuous, keep the bound.
"""
import ml_dtypes
import numpy as np
import pytest

import gpurnn
from gpurnn.engine import drivers

from conftest import SIMULATOR, cell_params
from helpers import make

HALF = {"bfloat16": (np.dtype(ml_dtypes.bfloat16), 2.0 ** -8),
        "float16": (np.dtype(np.float16), 2.0 ** -11)}


def _pair(cell, opts, dtype, I=8, H=32, device="cpu", **kw):
    """(float32 layer, 16-bit layer) with the same (float32) weights."""
    ref = make(cell, opts, I, H, device="cpu", dtype="float32", seed=3, **kw)
    half = make(cell, opts, I, H, device=device, dtype=dtype, seed=3, **kw)
    half.load_state_dict(ref.state_dict())
    return ref, half


@cell_params()
@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        SIMULATOR, reason="a real GPU only: the simulator's kernels are the CPU's to the ulp "
                          "(test_simulated_cuda_kernels_match_the_cpu_kernels)"))])
def test_follows_float32_within_four_unit_roundoffs(cell, opts, dtype, device, rng):
    storage, u = HALF[dtype]
    ref, half = _pair(cell, opts, dtype, device=device, bidirectional=True)
    be = half.backend
    T, B = 30, 4
    x = rng.standard_normal((T, B, 8)).astype(np.float32)
    lengths = [T, T - 3, 5, 1]
    dy = rng.standard_normal((T, B, 2 * 32)).astype(np.float32)
    y32, _ = ref(x, lengths=lengths)
    dx32, _ = ref.backward(dy)
    y16, state = half(be.asarray(x.astype(storage)), lengths=lengths)
    dx16, dstate = half.backward(be.asarray(dy.astype(storage)))
    y16, dx16 = be.to_numpy(y16), be.to_numpy(dx16)

    assert y16.dtype == dx16.dtype == storage
    for part in (state if isinstance(state, tuple) else (state,)):
        assert part.dtype == storage
    assert np.abs(y16.astype(np.float32) - y32).max() <= 4 * u
    smooth = opts.get("nonlinearity") != "relu"
    if smooth:
        assert np.abs(dx16.astype(np.float32) - dx32).max() <= 4 * u * np.abs(dx32).max()
    for name, g32 in ref.grads.items():
        g16 = be.to_numpy(half.grads[name])
        assert g16.dtype == half.params[name].dtype == np.float32, name
        if smooth:
            assert np.abs(g16 - g32).max() <= 4 * u * np.abs(g32).max(), name


@pytest.mark.skipif(not SIMULATOR, reason="on a GPU cuBLAS's tensor cores sum the 16-bit "
                    "products in their own order, not NumPy's: the float32 bound above holds there")
@cell_params()
@pytest.mark.parametrize("dtype", list(HALF))
def test_simulated_cuda_kernels_match_the_cpu_kernels(cell, opts, dtype, rng):
    """The same rounding points on both backends: equal up to one 16-bit ulp, which a float32
    result on a rounding boundary can cross (the CPU kernels fuse multiply-adds, the simulated
    ones do not)."""
    storage, _ = HALF[dtype]
    cpu = make(cell, opts, 5, 8, device="cpu", dtype=dtype, seed=4)
    sim = make(cell, opts, 5, 8, device="cuda", dtype=dtype, seed=4)
    T, B = 6, 3
    x = rng.standard_normal((T, B, 5)).astype(storage)
    dy = rng.standard_normal((T, B, 8)).astype(storage)
    outs = []
    for layer in (cpu, sim):
        y, _ = layer(layer.backend.asarray(x), lengths=[T, 4, 0])
        dx, _ = layer.backward(layer.backend.asarray(dy))
        outs.append((layer.backend.to_numpy(y), layer.backend.to_numpy(dx), layer.grads))
    for a, b in zip(outs[0][:2], outs[1][:2]):
        steps = np.abs(a.view(np.int16).astype(np.int32) - b.view(np.int16).astype(np.int32))
        assert steps.max() <= 1
        assert (steps == 0).mean() >= 0.95
    for name, g in outs[0][2].items():
        np.testing.assert_allclose(outs[1][2][name], g, rtol=0, atol=2 * HALF[dtype][1]
                                   * max(np.abs(g).max(), 1e-30), err_msg=name)


@pytest.mark.parametrize("dtype", list(HALF))
def test_padding_keeps_the_state_exactly_and_outputs_zero(dtype, rng):
    storage, _ = HALF[dtype]
    layer = gpurnn.LSTM(3, 6, dtype=dtype, seed=0)
    h0 = rng.standard_normal((1, 2, 6)).astype(storage)
    c0 = rng.standard_normal((1, 2, 6)).astype(storage)
    x = rng.standard_normal((4, 2, 3)).astype(storage)
    y, (h, c) = layer(x, (h0, c0), lengths=[4, 0])
    assert (y[:, 1].astype(np.float32) == 0).all()
    assert (h[0, 1].view(np.uint16) == h0[0, 1].view(np.uint16)).all()
    assert (c[0, 1].view(np.uint16) == c0[0, 1].view(np.uint16)).all()


def tape_nbytes(direction):
    """Bytes of the arrays a direction's tape holds beside its input and final states."""
    kept = (direction.hs, direction.h0, direction.cs, direction.gates)
    return sum(a.nbytes for a in kept if a is not None)


@cell_params()
def test_activation_memory_is_half_of_float32s(cell, opts):
    T, B, H = 50, 8, 16
    f32 = make(cell, opts, 4, H, dtype="float32")
    bf16 = make(cell, opts, 4, H, dtype="bfloat16")
    assert bf16.activation_bytes(T, B) * 2 == f32.activation_bytes(T, B)
    x = np.zeros((T, B, 4), ml_dtypes.bfloat16)
    _, _, tape = bf16.forward_with_tape(x)
    (d_tape,) = tape.directions.values()
    assert tape_nbytes(d_tape) == bf16.activation_bytes(T, B)
    bf16.backward_through(tape, np.zeros((T, B, H), ml_dtypes.bfloat16))
    held = sum(ws.nbytes() for ws in bf16._workspaces.values())
    assert held <= bf16.call_bytes(T, B, True)


def test_parameters_are_float32_masters_and_load_from_any_float():
    layer = gpurnn.GRU(4, 8, dtype="bfloat16", seed=0)
    sd = layer.state_dict()
    assert {a.dtype for a in sd.values()} == {np.dtype(np.float32)}
    as_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    layer.load_state_dict(as_bf16)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, as_bf16[k].astype(np.float32))
    assert "dtype='bfloat16'" in repr(layer)


def test_wrong_dtypes_are_refused_with_the_expected_one():
    layer = gpurnn.LSTM(3, 4, dtype="float16")
    with pytest.raises(TypeError, match="x must have dtype float16 .*got float32"):
        layer(np.zeros((2, 1, 3), np.float32))
    with pytest.raises(ValueError, match="'float32', 'float64', 'float16', 'bfloat16', got 'int8'"):
        gpurnn.RNN(3, 4, dtype="int8")
    assert gpurnn.RNN(3, 4, dtype=ml_dtypes.bfloat16).dtype.name == "bfloat16"


def test_drivers_keep_gemm_operands_in_16_bits_and_the_rest_in_float32(rng):
    """What the tape holds and in which dtype (drivers.py's precision paragraph)."""
    layer = gpurnn.LSTM(3, 4, dtype="bfloat16", seed=0)
    x = rng.standard_normal((5, 2, 3)).astype(ml_dtypes.bfloat16)
    _, _, tape = layer.forward_with_tape(x)
    t = tape.directions[(0, 0)]
    w = tape.weights[(0, 0)]
    assert t.hs is None  # the LSTM's backward rebuilds the states, from h0
    assert t.h0.dtype == t.cs.dtype == t.gates.dtype == w.w_ih.dtype == w.w_hh.dtype == \
        layer.dtype
    assert w.b_ih.dtype == np.float32
    np.testing.assert_array_equal(w.w_hh.astype(np.float32),
                                  layer.params["weight_hh_l0"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))
    assert drivers.activation_bytes(layer.cell, 5, 2, 4, layer.dtype) == tape_nbytes(t)
