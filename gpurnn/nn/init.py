"""Initial values of the recurrent layers' parameters."""
import math


def uniform_params(shapes, hidden_size, dtype, backend, rng, forget_bias=None):
    """PyTorch's initialisation: every parameter drawn from U(-1/sqrt(H), 1/sqrt(H)) with
    ``rng`` in the order of ``shapes`` (``(name, shape)`` pairs), as device arrays of ``dtype``.

    ``forget_bias`` (LSTM): the forget gate's total bias (block 1 of ``bias_ih`` plus that of
    ``bias_hh``) starts at this value instead, as in Keras and Haste."""
    H = hidden_size
    bound = 1.0 / math.sqrt(H)
    params = {}
    for name, shape in shapes:
        host = rng.uniform(-bound, bound, size=shape)
        if forget_bias is not None and name.startswith("bias"):
            host[H:2 * H] = forget_bias if name.startswith("bias_ih") else 0.0
        params[name] = backend.buffer(shape, dtype)
        params[name][...] = backend.asarray(host.astype(dtype))
    return params
