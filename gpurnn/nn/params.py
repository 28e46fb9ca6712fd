"""Parameters of the recurrent layers: PyTorch's names and layout, and loading a state dict.

Layer ``l``, direction ``d`` (1: reverse) has ``weight_ih{s}`` [G*H, I_l], ``weight_hh{s}``
[G*H, H] and, with bias, ``bias_ih{s}``, ``bias_hh{s}`` [G*H], where ``s`` is
``param_suffix(l, d)``, G the cell's gate count and ``I_l`` the input size of layer ``l``
(``D*H`` above the first).  Gate blocks in PyTorch's order: LSTM i, f, g, o; GRU r, z, n.
"""
import numpy as np


def param_suffix(layer, direction):
    """``_l{layer}``, with ``_reverse`` for the reverse direction."""
    return f"_l{layer}" + ("_reverse" if direction else "")


def param_shapes(input_size, hidden_size, gates, num_layers, num_directions, bias):
    """Yields ``(name, shape)`` of every parameter, in PyTorch's order."""
    H, G = hidden_size, gates
    for layer in range(num_layers):
        in_size = input_size if layer == 0 else H * num_directions
        for d in range(num_directions):
            s = param_suffix(layer, d)
            yield f"weight_ih{s}", (G * H, in_size)
            yield f"weight_hh{s}", (G * H, H)
            if bias:
                yield f"bias_ih{s}", (G * H,)
                yield f"bias_hh{s}", (G * H,)


def load_arrays(params, state_dict, backend, dtype, what):
    """Copy ``state_dict`` into ``params`` (name -> device array), in place.

    Every name of ``params`` must be present and no other, each value of its parameter's
    shape and floating point (NumPy, anything ``np.asarray`` takes, a torch tensor or an array
    of ``backend``); all are checked before any is copied.  ``what`` names the receiver in
    the errors ("this layer", "this model")."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise ValueError(f"state_dict does not match {what}: missing {missing}, "
                         f"unexpected {unexpected}")
    converted = {}
    for name, p in params.items():
        value = state_dict[name]
        if hasattr(value, "detach"):  # a torch tensor; NumPy has no bfloat16, so via float32
            value = value.detach().cpu()
            value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
        host = backend.to_numpy(value) if backend.is_array(value) else np.asarray(value)
        if tuple(host.shape) != tuple(p.shape):
            raise ValueError(f"{name} must have shape {tuple(p.shape)}, got {tuple(host.shape)}")
        if host.dtype.kind != "f" and host.dtype.name != "bfloat16":
            raise TypeError(f"{name} must be floating point, got dtype {host.dtype}")
        converted[name] = host
    for name, host in converted.items():
        params[name][...] = backend.asarray(host.astype(dtype))


def state_dict(params, backend):
    """NumPy copies of ``params`` (name -> device array)."""
    return {name: np.array(backend.to_numpy(p)) for name, p in params.items()}
