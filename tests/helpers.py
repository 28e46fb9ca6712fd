"""Shared helpers of the tests: building layers, random inputs, a scalar loss and its gradient."""
import numpy as np

import gpurnn


def make(cell, opts, I, H, device="cpu", dtype="float64", seed=0, **kw):
    return getattr(gpurnn, cell)(I, H, device=device, dtype=dtype, seed=seed, **opts, **kw)


def to_device(layer, a):
    return layer.backend.asarray(a)


def random_state(layer, B, rng):
    shape = (layer.num_layers * layer.num_directions, B, layer.hidden_size)
    h = rng.standard_normal(shape).astype(layer.dtype) * 0.5
    if layer.cell.has_cell_state:
        c = rng.standard_normal(shape).astype(layer.dtype) * 0.5
        return (to_device(layer, h), to_device(layer, c))
    return to_device(layer, h)


def state_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def central_difference(loss, array, index, eps=1e-6):
    """``(loss() at array[index] + eps - loss() at array[index] - eps) / 2 eps``, with
    ``array[index]`` restored afterwards."""
    old = array[index]
    array[index] = old + eps
    up = loss()
    array[index] = old - eps
    down = loss()
    array[index] = old
    return (up - down) / (2 * eps)


def host(layer, a):
    return np.asarray(layer.backend.to_numpy(a), dtype=np.float64)
