"""Optimisers and gradient clipping, updating parameters in place on their own device.

``params`` and ``grads`` are dicts name -> array (NumPy, or CuPy on a GPU), the same names in
both, as ``Model.params`` / ``Model.grads`` and the layers' ``params`` / ``grads``: float32 or
float64, C-contiguous.  Every update is one pass over a parameter, its gradient and its
buffers, in place on their device (``kernels/updates.py``: a compiled loop on the CPU, one
kernel launch a parameter on a GPU): no weight, gradient or optimiser state is copied to the
host.

Elementwise updates and the global norm (a sum over a fixed order of arrays) add no
nondeterminism: given bit-identical gradients they give bit-identical weights.  The gradients
themselves are bit-identical run to run at one BLAS thread count; another thread count changes
them by float32 rounding (docs/guarantees.md, Determinism).
"""
import numpy as np

from ..engine.arrays import array_module, to_numpy
from ..engine.backend import get_backend


def _check_dicts(params, grads):
    if not isinstance(params, dict) or not isinstance(grads, dict):
        raise TypeError(f"params and grads must be dicts name -> array, got "
                        f"{type(params).__name__} and {type(grads).__name__}")
    if set(params) != set(grads):
        raise ValueError(f"params and grads must have the same names: only in params "
                         f"{sorted(set(params) - set(grads))}, only in grads "
                         f"{sorted(set(grads) - set(params))}")
    for name, p in params.items():
        g = grads[name]
        if tuple(p.shape) != tuple(g.shape):
            raise ValueError(f"grad {name} must have the shape of its parameter "
                             f"{tuple(p.shape)}, got {tuple(g.shape)}")
        if p.dtype not in _UPDATE_DTYPES or g.dtype != p.dtype:
            raise TypeError(f"param {name} and its grad must both be float32 or float64, got "
                            f"{p.dtype} and {g.dtype}")
        if not (p.flags.c_contiguous and g.flags.c_contiguous):
            raise ValueError(f"param {name} and its grad must be C-contiguous arrays (the "
                             f"update runs over their memory in one pass), got strides "
                             f"{p.strides} and {g.strides}")


_UPDATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _rows(a):
    """``a`` as a 2-D view ``[rows, cols]`` of its memory (a C-contiguous array)."""
    if a.ndim == 2:
        return a
    return a.reshape(1, -1) if a.ndim < 2 else a.reshape(a.shape[0], -1)


def global_norm(grads):
    """sqrt(sum of every squared gradient entry), as a 0-d array on the device (no host sync)."""
    arrays = list(grads.values())
    if not arrays:
        raise ValueError("global_norm needs at least one gradient")
    xp = array_module(arrays[0])
    total = sum(xp.vdot(g.ravel(), g.ravel()) for g in arrays)
    return xp.sqrt(total)


def clip_grad_norm(grads, max_norm, eps=1e-6, norm=None):
    """Scale every gradient by ``min(1, max_norm / (norm + eps))`` in place, where ``norm`` is
    the global norm over all of them (computed here unless given, as ``global_norm(grads)``).
    Returns the norm before clipping (0-d device array)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = global_norm(grads) if norm is None else norm
    xp = array_module(norm)
    scale = xp.minimum(1.0, max_norm / (norm + eps))  # stays on the device
    scales = {}  # dtype -> the scale in it, cast once (on a GPU a cast is a launch)
    for g in grads.values():
        if g.dtype not in scales:
            scales[g.dtype] = scale.astype(g.dtype)
        g *= scales[g.dtype]
    return norm


def clip_grad_value(grads, clip_value):
    """Clip every gradient entry to ``[-clip_value, clip_value]`` in place."""
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0, got {clip_value!r}")
    for g in grads.values():
        array_module(g).clip(g, -clip_value, clip_value, out=g)


class Optimizer:
    """Base: ``step()`` updates ``params`` in place from ``grads``; ``state_dict()`` /
    ``load_state_dict()`` hold the step count and per-parameter buffers as NumPy arrays."""

    #: names of the per-parameter buffers (same shape as the parameter)
    slots = ()
    #: the update of ``kernels/updates.py`` this optimiser runs: its arrays are the parameter,
    #: the gradient and the buffers of ``slots`` in order, its scalars ``_scalars()``
    kernel = None

    def __init__(self, params, grads, lr):
        _check_dicts(params, grads)
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.params, self.grads, self.lr = params, grads, float(lr)
        self.t = 0
        self.state = {slot: {name: array_module(p).zeros_like(p) for name, p in params.items()}
                      for slot in self.slots}

    def step(self):
        self.t += 1
        runs = {}  # (array type, dtype) -> (update kernel, its scalars in that dtype)
        for name, p in self.params.items():
            key = (type(p), p.dtype)
            if key not in runs:
                runs[key] = (_update_kernels(p)[self.kernel],
                             tuple(p.dtype.type(c) for c in self._scalars()))
            update, scalars = runs[key]
            arrays = [_rows(a) for a in (p, self.grads[name],
                                         *(self.state[slot][name] for slot in self.slots))]
            update(*arrays[0].shape, *arrays, *scalars)

    def _scalars(self):
        """The update's scalars at step ``self.t``, as Python floats (rounded to the
        parameter's dtype by ``step``)."""
        raise NotImplementedError

    def hyperparams(self):
        return {"lr": self.lr}

    def state_dict(self):
        """{'t': int, 'hyperparams': dict, 'buffers': {slot/name: numpy array}}."""
        buffers = {}
        for slot, arrays in self.state.items():
            for name, a in arrays.items():
                buffers[f"{slot}/{name}"] = to_numpy(a)
        return {"t": self.t, "hyperparams": self.hyperparams(), "buffers": buffers}

    def load_state_dict(self, state):
        if state.get("hyperparams") != self.hyperparams():
            raise ValueError(f"optimiser state is for hyperparameters {state.get('hyperparams')}, "
                             f"this {type(self).__name__} has {self.hyperparams()}")
        expected = {f"{slot}/{name}" for slot, arrays in self.state.items() for name in arrays}
        if set(state["buffers"]) != expected:
            raise ValueError(f"optimiser state buffers do not match: missing "
                             f"{sorted(expected - set(state['buffers']))}, unexpected "
                             f"{sorted(set(state['buffers']) - expected)}")
        for slot, arrays in self.state.items():
            for name, a in arrays.items():
                host = np.asarray(state["buffers"][f"{slot}/{name}"])
                if host.shape != tuple(a.shape):
                    raise ValueError(f"optimiser buffer {slot}/{name} must have shape "
                                     f"{tuple(a.shape)}, got {host.shape}")
                a[...] = array_module(a).asarray(host.astype(a.dtype))
        self.t = int(state["t"])


class SGD(Optimizer):
    """The seed's update ``W <- W - lr * dL/dW``."""

    kernel = "sgd_update"

    def _scalars(self):
        return (self.lr,)


class Momentum(Optimizer):
    """SGD with momentum (PyTorch's form): ``v <- mu v + g``, ``W <- W - lr v``."""

    slots = ("velocity",)
    kernel = "momentum_update"

    def __init__(self, params, grads, lr, momentum=0.9):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        super().__init__(params, grads, lr)

    def hyperparams(self):
        return {"lr": self.lr, "momentum": self.momentum}

    def _scalars(self):
        return self.momentum, self.lr


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction:
    ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``W <- W - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``."""

    slots = ("m", "v")
    kernel = "adam_update"

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must both lie in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.betas, self.eps = (float(b1), float(b2)), float(eps)
        super().__init__(params, grads, lr)

    def hyperparams(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps}

    def _scalars(self):
        b1, b2 = self.betas
        return (b1, 1 - b1, b2, 1 - b2, self.lr / (1 - b1 ** self.t), 1 - b2 ** self.t,
                self.eps)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam}


def _update_kernels(p):
    """The update kernels of the backend that holds ``p``: the CPU's for a NumPy array, the
    GPU's for a CuPy one."""
    return get_backend("cpu" if array_module(p) is np else "cuda").update_kernels(p.dtype)
