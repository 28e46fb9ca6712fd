"""The public recurrent layers: ``RNN``, ``LSTM``, ``GRU``.

Each layer stacks ``num_layers`` layers of one or two directions and runs them through the
drivers (``gpurnn/drivers.py``) on its backend.  Parameters are named and laid out as PyTorch's
(``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``; LSTM gates
i, f, g, o; GRU r, z, n), so a PyTorch state dict loads as is.
"""
import contextlib
import math
import threading

import numpy as np

from ..engine import drivers, memory
from ..engine.backend import get_backend

_grad_state = threading.local()


def is_grad_enabled():
    return getattr(_grad_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within this block, forwards keep no activations for a backward (inference mode)."""
    previous = is_grad_enabled()
    _grad_state.enabled = False
    try:
        yield
    finally:
        _grad_state.enabled = previous


_DTYPES = {"float32": np.float32, "float64": np.float64}


def _parse_dtype(dtype):
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return np.dtype(name)


def _describe(a):
    shape = getattr(a, "shape", None)
    dtype = getattr(a, "dtype", None)
    return f"{type(a).__module__}.{type(a).__name__}(shape={shape}, dtype={dtype})"


class RNNBase:
    """Shared machinery of the three recurrent layers.

    Call ``out, state = layer(x, state=None, lengths=None)`` with ``x`` [T, B, I] (``[B, T, I]``
    when ``batch_first``), then ``dx, dstate = layer.backward(dout, dstate=None)``.
    """

    _mode = None

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device="cpu", dtype="float32", seed=None,
                 *, nonlinearity="tanh", reset_after=False, forget_bias=None):
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.dtype = _parse_dtype(dtype)
        self.backend = get_backend(device)
        self.device = self.backend.name
        self.cell = drivers.CellSpec(self._mode, relu=nonlinearity == "relu",
                                     reset_after=bool(reset_after))
        self.nonlinearity = nonlinearity
        self.training = True
        self._seed = seed
        self._dropout_rng = np.random.default_rng(seed)
        self._tape = None
        self._workspaces = {}
        self._fitted_bytes = 0  # the largest call memory.check_fits found room for

        H, G = self.hidden_size, self.cell.gates
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(H)
        self.params = {}
        for name, shape in self._param_shapes():
            host = rng.uniform(-bound, bound, size=shape)
            if forget_bias is not None and self._mode == "lstm" and name.startswith("bias"):
                # Keras/Haste style: the forget gate's total bias starts at forget_bias.
                host[H:2 * H] = forget_bias if name.startswith("bias_ih") else 0.0
            self.params[name] = self.backend.asarray(host.astype(self.dtype))
        self.grads = {name: self.backend.zeros(p.shape, self.dtype) for name, p in self.params.items()}
        self._zero_bias = self.backend.zeros((G * H,), self.dtype)

    # ------------------------------------------------------------------ structure
    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def _suffix(self, layer, direction):
        return f"_l{layer}" + ("_reverse" if direction else "")

    def _param_shapes(self):
        H, G = self.hidden_size, self.cell.gates
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else H * self.num_directions
            for d in range(self.num_directions):
                s = self._suffix(layer, d)
                yield f"weight_ih{s}", (G * H, in_size)
                yield f"weight_hh{s}", (G * H, H)
                if self.bias:
                    yield f"bias_ih{s}", (G * H,)
                    yield f"bias_hh{s}", (G * H,)

    def _weights(self, arrays, layer, direction):
        s = self._suffix(layer, direction)
        return drivers.Weights(
            w_ih=arrays[f"weight_ih{s}"], w_hh=arrays[f"weight_hh{s}"],
            b_ih=arrays.get(f"bias_ih{s}", self._zero_bias),
            b_hh=arrays.get(f"bias_hh{s}", self._zero_bias))

    def _grad_weights(self, layer, direction):
        w = self._weights(self.grads, layer, direction)
        if not self.bias:  # gradients of the absent biases go to scratch, not to grads
            G, H = self.cell.gates, self.hidden_size
            w.b_ih = self._workspace(layer, direction).get("db_ih", (G * H,), self.dtype)
            w.b_hh = self._workspace(layer, direction).get("db_hh", (G * H,), self.dtype)
        return w

    def _workspace(self, layer, direction):
        key = (layer, direction)
        if key not in self._workspaces:
            self._workspaces[key] = drivers.Workspace(self.backend)
        return self._workspaces[key]

    # ------------------------------------------------------------------ modes
    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # ------------------------------------------------------------------ validation
    def _check_array(self, a, what):
        if not self.backend.is_array(a):
            raise TypeError(
                f"{what} must be a {self.backend.xp.__name__}.ndarray on device "
                f"'{self.device}', got {_describe(a)}")
        if a.dtype != self.dtype:
            raise TypeError(f"{what} must have dtype {self.dtype.name} (the layer's dtype), "
                            f"got {a.dtype}")

    def _state_shape(self, B):
        return (self.num_layers * self.num_directions, B, self.hidden_size)

    def _check_state(self, state, B, what):
        """Returns the state as a tuple of arrays (h,) or (h, c), or None."""
        if state is None:
            return None
        lstm = self.cell.has_cell_state
        if lstm:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError(f"{what} of an LSTM must be a tuple (h, c), got {_describe(state)}")
            parts = tuple(state)
        else:
            if isinstance(state, (tuple, list)):
                raise TypeError(f"{what} of a {self._mode.upper()} must be one array h, got a "
                                f"{type(state).__name__}")
            parts = (state,)
        expected = self._state_shape(B)
        for name, part in zip(("h", "c"), parts):
            self._check_array(part, f"{what} {name}")
            if tuple(part.shape) != expected:
                raise ValueError(f"{what} {name} must have shape {expected} "
                                 f"(num_layers*num_directions, batch, hidden), got {tuple(part.shape)}")
        return parts

    def _check_lengths(self, lengths, T, B):
        if lengths is None:
            return np.full(B, T, dtype=np.int32)
        if not self.backend.host_arrays and self.backend.is_array(lengths):
            lengths = self.backend.to_numpy(lengths)
        host = np.asarray(lengths)
        if host.ndim != 1 or host.shape[0] != B:
            raise ValueError(f"lengths must have one entry per sequence, shape ({B},), "
                             f"got shape {host.shape}")
        if host.dtype.kind not in "iu":
            if host.dtype.kind == "f" and np.all(np.isfinite(host)) and np.all(host == np.round(host)):
                host = host.astype(np.int64)
            else:
                raise TypeError(f"lengths must be integers, got dtype {host.dtype}")
        if host.size and (host.min() < 0 or host.max() > T):
            raise ValueError(f"lengths must lie in [0, T={T}], got min {host.min()} max {host.max()}")
        return host.astype(np.int32)

    # ------------------------------------------------------------------ forward
    def __call__(self, x, state=None, lengths=None):
        return self.forward(x, state, lengths)

    def forward(self, x, state=None, lengths=None):
        """out [T, B, D*H] (``[B, T, D*H]`` if batch_first), state h [L*D, B, H] or (h, c).

        ``lengths`` [B]: valid steps per sequence, any order.  Outputs past a sequence's end are
        zero; its final state is the state after its last valid step (the reverse direction
        starts at that step); a zero length gives zero outputs and the initial state.
        """
        self._check_array(x, "x")
        if x.ndim != 3:
            layout = "[B, T, I]" if self.batch_first else "[T, B, I]"
            raise ValueError(f"x must be 3-D {layout}, got shape {tuple(x.shape)}")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x must have input size {self.input_size} in its last axis, "
                             f"got shape {tuple(x.shape)}")
        xp = self.backend.xp
        if self.batch_first:
            x = xp.ascontiguousarray(x.transpose(1, 0, 2))
        else:
            x = xp.ascontiguousarray(x)
        T, B, _ = x.shape
        if T < 1 or B < 1:
            raise ValueError(f"x must have at least one step and one sequence, got T={T}, B={B}")
        parts = self._check_state(state, B, "state")
        lengths_host = self._check_lengths(lengths, T, B)
        lengths_dev = self.backend.asarray(lengths_host)
        training = self.training and is_grad_enabled()
        memory.check_fits(self, T, B, training)
        H, D = self.hidden_size, self.num_directions

        h_n = self.backend.empty(self._state_shape(B), self.dtype)
        c_n = self.backend.empty(self._state_shape(B), self.dtype) if self.cell.has_cell_state else None
        tapes, masks = {}, {}
        inp = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                h0 = parts[0][idx] if parts else self.backend.zeros((B, H), self.dtype)
                c0 = None
                if self.cell.has_cell_state:
                    c0 = parts[1][idx] if parts else self.backend.zeros((B, H), self.dtype)
                y, tape = drivers.forward(self.backend, self.cell, self._weights(self.params, layer, d),
                                          inp, h0, c0, lengths_dev, bool(d), training,
                                          self._workspace(layer, d))
                h_n[idx] = tape.h_last
                if c_n is not None:
                    c_n[idx] = tape.c_last
                if training:
                    tapes[(layer, d)] = tape
                outs.append(y)
            out = outs[0] if D == 1 else xp.concatenate(outs, axis=2)
            if training and self.dropout > 0 and layer < self.num_layers - 1:
                keep = self._dropout_rng.random(out.shape) >= self.dropout
                mask = self.backend.asarray((keep / (1.0 - self.dropout)).astype(self.dtype))
                masks[layer] = mask
                out = out * mask
            inp = out
        self._tape = None
        if training:
            self._tape = {"tapes": tapes, "masks": masks, "shape": (T, B), "out_shape": out.shape}
        if self.batch_first:
            out = xp.ascontiguousarray(out.transpose(1, 0, 2))
        return out, ((h_n, c_n) if c_n is not None else h_n)

    # ------------------------------------------------------------------ backward
    def backward(self, dout, dstate=None):
        """BPTT through the last training forward.

        dout like that forward's output; dstate like its final state (None: zero).  Sets
        ``self.grads`` (overwritten, not accumulated) and returns ``(dx, dstate0)``: the
        gradients of the input and of the initial state.
        """
        if self._tape is None:
            raise ValueError("backward() needs a training forward first: no forward was run, "
                             "or it ran in inference mode (eval() or no_grad()), which keeps no "
                             "activations")
        T, B = self._tape["shape"]
        self._check_array(dout, "dout")
        expected = (B, T, self.num_directions * self.hidden_size) if self.batch_first else \
            (T, B, self.num_directions * self.hidden_size)
        if tuple(dout.shape) != expected:
            raise ValueError(f"dout must have the shape of the last forward's output {expected}, "
                             f"got {tuple(dout.shape)}")
        dparts = self._check_state(dstate, B, "dstate")
        xp = self.backend.xp
        dout = dout.transpose(1, 0, 2) if self.batch_first else dout
        H, D = self.hidden_size, self.num_directions
        dh0 = self.backend.empty(self._state_shape(B), self.dtype)
        dc0 = self.backend.empty(self._state_shape(B), self.dtype) if self.cell.has_cell_state else None
        zeros = self.backend.zeros((B, H), self.dtype)
        tapes, masks = self._tape["tapes"], self._tape["masks"]
        dinp = dout
        for layer in reversed(range(self.num_layers)):
            if layer in masks:
                dinp = dinp * masks[layer]
            dx = None
            for d in range(D):
                idx = layer * D + d
                dy = xp.ascontiguousarray(dinp[:, :, d * H:(d + 1) * H])
                dh_last = dparts[0][idx] if dparts else zeros
                dc_last = None
                if self.cell.has_cell_state:
                    dc_last = dparts[1][idx] if dparts else zeros
                dxd, dh, dc = drivers.backward(self.backend, self.cell,
                                               self._weights(self.params, layer, d),
                                               tapes[(layer, d)], dy, dh_last, dc_last,
                                               self._grad_weights(layer, d),
                                               self._workspace(layer, d))
                dh0[idx] = dh
                if dc0 is not None:
                    dc0[idx] = dc
                dx = dxd if dx is None else dx + dxd
            dinp = dx
        if self.batch_first:
            dinp = xp.ascontiguousarray(dinp.transpose(1, 0, 2))
        return dinp, ((dh0, dc0) if dc0 is not None else dh0)

    # ------------------------------------------------------------------ weights
    def state_dict(self):
        """PyTorch's names and layout, as NumPy arrays (copies)."""
        return {name: np.array(self.backend.to_numpy(p)) for name, p in self.params.items()}

    def load_state_dict(self, state_dict):
        """Load arrays (NumPy, or anything ``np.asarray`` takes, e.g. torch CPU tensors) in
        PyTorch's names and layout.  Every name must be present and no other."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = sorted(set(self.params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match this layer: missing {missing}, "
                             f"unexpected {unexpected}")
        converted = {}
        for name, p in self.params.items():
            value = state_dict[name]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            host = self.backend.to_numpy(value) if self.backend.is_array(value) else np.asarray(value)
            if tuple(host.shape) != tuple(p.shape):
                raise ValueError(f"{name} must have shape {tuple(p.shape)}, got {tuple(host.shape)}")
            if host.dtype.kind != "f":
                raise TypeError(f"{name} must be floating point, got dtype {host.dtype}")
            converted[name] = host
        for name, host in converted.items():
            self.params[name][...] = self.backend.asarray(host.astype(self.dtype))

    def stream(self, chunks, state=None):
        """Inference over a sequence too long for one call, given as an iterable of chunks
        ``[t_i, B, I]`` (``[B, t_i, I]`` if batch_first): yields ``(out_i, state_i)``, carrying
        the state from chunk to chunk.  Memory depends on the chunk size, not the total length;
        the outputs equal one call over the concatenated sequence."""
        for chunk in chunks:
            # Only around the call: a generator suspended inside no_grad() would switch
            # gradients off for whatever its caller runs between chunks.
            with no_grad():
                out, state = self.forward(chunk, state)
            yield out, state

    def activation_bytes(self, T, B):
        """Bytes a training forward keeps for the backward (over all layers and directions),
        beyond the layer inputs and outputs; an inference forward keeps none of it."""
        per = drivers.activation_bytes(self.cell, T, B, self.hidden_size, self.dtype.itemsize)
        return per * self.num_layers * self.num_directions

    def to_torch(self):
        """A ``torch.nn.RNN``/``LSTM``/``GRU`` with a copy of these weights (gpurnn/interchange.py)."""
        from ..interop.interchange import to_torch
        return to_torch(self)

    def to_onnx(self, path):
        """Write this layer as an ONNX model of ONNX's RNN/LSTM/GRU operators (gpurnn/interchange.py)."""
        from ..interop.interchange import to_onnx
        to_onnx(self, path)

    def __repr__(self):
        opts = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            opts += f", num_layers={self.num_layers}"
        if self.bidirectional:
            opts += ", bidirectional=True"
        if self._mode == "gru":
            opts += f", reset_after={self.cell.reset_after}"
        if self._mode == "rnn":
            opts += f", nonlinearity={self.nonlinearity!r}"
        return f"{type(self).__name__}({opts}, device={self.device!r}, dtype={self.dtype.name!r})"


class RNN(RNNBase):
    """Elman RNN: ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` (or ReLU)."""

    _mode = "rnn"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device="cpu",
                 dtype="float32", seed=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, seed, nonlinearity=nonlinearity)


class LSTM(RNNBase):
    """LSTM, gates i, f, g, o: ``c_t = f*c_{t-1} + i*g``, ``h_t = o*tanh(c_t)``.

    ``forget_bias``: when given, the forget gate's bias starts at this value (Keras and Haste
    use 1.0); when None, every bias is initialised as PyTorch does.
    """

    _mode = "lstm"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device="cpu", dtype="float32", seed=None,
                 forget_bias=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, seed, forget_bias=forget_bias)


class GRU(RNNBase):
    """GRU, gates r, z, n.

    ``reset_after=False`` (default): the seed's cell, reset applied before the recurrent product,
    ``n = tanh(W_in x + b_in + W_hn (r*h) + b_hn)``, ``h = (1-z)*h_prev + z*n``.
    ``reset_after=True``: cuDNN/PyTorch's cell, ``n = tanh(W_in x + b_in + r*(W_hn h + b_hn))``,
    ``h = (1-z)*n + z*h_prev``; PyTorch GRU weights load unchanged and give PyTorch's outputs.
    """

    _mode = "gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device="cpu", dtype="float32", seed=None,
                 reset_after=False):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, seed, reset_after=reset_after)
