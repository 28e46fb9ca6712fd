"""The public recurrent layers: ``RNN``, ``LSTM``, ``GRU``.

Each layer stacks ``num_layers`` layers of one or two directions and runs each direction
through the engine's drivers (``gpurnn/engine/drivers.py``) on its backend.  Parameters are
named and laid out as PyTorch's (``params.py``), so a PyTorch state dict loads as is.  The
parts of a layer live in their own modules: input checks in ``validation.py``, initial
values in ``init.py``, inference and streaming in ``inference.py``, export in ``export.py``.
"""
import math
from dataclasses import dataclass

import numpy as np

from ..engine import drivers, memory
from ..engine.backend import get_backend
from ..kernels.storage import compute_dtype
from . import export, inference, init, params, validation

#: Shapes (T, B) whose all-T lengths a layer keeps on its device (``_lengths_of_full_sequences``)
FULL_LENGTHS_KEPT = 4


@dataclass
class LayerTape:
    """What a training forward of a whole layer keeps for its backward.

    ``directions``: (layer, direction) -> the drivers' ``Tape`` of that direction;
    ``weights``: (layer, direction) -> the ``drivers.Weights`` its GEMMs used (for a 16-bit
    layer, the 16-bit copies of the weights made by that forward);
    ``masks``: layer -> the dropout mask [T, B, D*H] applied to that layer's output;
    ``out_shape``: the time-major output's shape [T, B, D*H]; ``workspaces``: the buffers
    the tapes' arrays live in, which the backward also uses ((layer, direction) ->
    ``drivers.Workspace``)."""

    directions: dict
    weights: dict
    masks: dict
    out_shape: tuple
    workspaces: dict

    @property
    def batch(self):
        return self.out_shape[1]

    @property
    def steps(self):
        return self.out_shape[0]


class RNNBase:
    """Shared machinery of the three recurrent layers.

    Call ``out, state = layer(x, state=None, lengths=None)`` with ``x`` [T, B, I] (``[B, T, I]``
    when ``batch_first``), then ``dx, dstate = layer.backward(dout, dstate=None)``.

    Buffers: a forward writes its activations into a workspace set, a dict (layer, direction)
    -> ``drivers.Workspace`` whose buffers later calls of the same shape reuse.  By default
    that is the layer's own set; ``forward_with_tape`` takes another one, so that several
    forwards can wait for their backwards (``gpurnn.torch`` does this).

    Precision (docs/precision.md).  ``dtype`` is the dtype of the inputs, outputs, states and
    activations.  float32 and float64 layers compute in it and keep their parameters in it.
    float16 and bfloat16 layers are mixed precision, like Keras's ``mixed_bfloat16`` policy:
    parameters and gradients in float32 (``param_dtype``), cast to the layer's dtype for the
    GEMMs at each forward; GEMMs accumulating in float32; the gate math, the LSTM cell state
    and the gradients carried between steps in float32; states, outputs, saved activations
    and pre-activation gradients stored in 16 bits.
    """

    _mode = None

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device="cpu", dtype="float32", seed=None,
                 *, nonlinearity="tanh", reset_after=False, forget_bias=None):
        validation.check_options(input_size, hidden_size, num_layers, dropout, nonlinearity)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.dtype = validation.parse_dtype(dtype)
        self.param_dtype = compute_dtype(self.dtype)
        self.backend = get_backend(device)
        self.device = self.backend.name
        self.cell = drivers.CellSpec(self._mode, relu=nonlinearity == "relu",
                                     reset_after=bool(reset_after))
        self.nonlinearity = nonlinearity
        self.training = True
        # dropout masks: draws of the counter-based generator this seed starts, numbered in
        # the order the layer made them (``kernels/cell_math.py``, ``dropout``)
        self._dropout_seed = int(np.random.default_rng(seed).integers(2 ** 63))
        self._dropout_drawn = 0
        self._tape = None  # the last training forward's LayerTape, for backward()
        self._workspaces = {}  # the layer's own workspace set
        self._full_lengths = {}  # (T, B) -> lengths [B] on the device, all T (lengths=None)
        self._fit_check = memory.FitCheck(self.backend)

        shapes = params.param_shapes(self.input_size, self.hidden_size, self.cell.gates,
                                     self.num_layers, self.num_directions, self.bias)
        self.params = init.uniform_params(
            shapes, self.hidden_size, self.param_dtype, self.backend,
            np.random.default_rng(seed), forget_bias if self.cell.has_cell_state else None)
        self.grads = {name: self.backend.zeros(p.shape, self.param_dtype)
                      for name, p in self.params.items()}
        self._zero_bias = self.backend.zeros((self.cell.gates * self.hidden_size,),
                                             self.param_dtype)

    # ------------------------------------------------------------------ structure
    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def state_shape(self, batch):
        """The shape of a state ``h`` (and ``c``): [num_layers * num_directions, batch, H]."""
        return (self.num_layers * self.num_directions, batch, self.hidden_size)

    def _weights(self, arrays, layer, direction):
        s = params.param_suffix(layer, direction)
        return drivers.Weights(
            w_ih=arrays[f"weight_ih{s}"], w_hh=arrays[f"weight_hh{s}"],
            b_ih=arrays.get(f"bias_ih{s}", self._zero_bias),
            b_hh=arrays.get(f"bias_hh{s}", self._zero_bias))

    def _gemm_weights(self, workspaces, layer, direction):
        """The weights as the GEMMs take them: the parameters, or for a 16-bit layer their
        16-bit copies, made now in the workspace, and the biases in float32.  (The parameters
        of a 16-bit layer are float32, or 16-bit where ``params`` were rebound to 16-bit
        arrays, as ``gpurnn.torch`` does for a module in 16 bits.)"""
        w = self._weights(self.params, layer, direction)
        if self.dtype == self.param_dtype:
            return w
        ws = self._workspace(workspaces, layer, direction)
        w_ih = ws.get("w_ih", w.w_ih.shape, self.dtype)  # [G*H, I]
        w_hh = ws.get("w_hh", w.w_hh.shape, self.dtype)  # [G*H, H]
        w_ih[...] = w.w_ih
        w_hh[...] = w.w_hh
        return drivers.Weights(w_ih=w_ih, w_hh=w_hh,
                               b_ih=w.b_ih.astype(self.param_dtype, copy=False),
                               b_hh=w.b_hh.astype(self.param_dtype, copy=False))

    def _dropout_mask(self, shape):
        """A dropout mask of ``shape``: ``1 / (1 - dropout)`` where kept, zero where dropped,
        drawn where it is used (a step kernel on the layer's device: nothing made on the
        host); the next draws of this layer's stream, so a seed gives the same masks on every
        device, call after call."""
        mask = self.backend.empty(shape, self.dtype)
        rows = math.prod(shape[:-1])
        f = np.dtype(self.param_dtype).type  # the kernels' compute dtype
        self.backend.kernels(self.dtype)["dropout_mask"](
            rows, shape[-1], mask.reshape(rows, shape[-1]), self._dropout_seed,
            self._dropout_drawn, f(self.dropout), f(1.0 / (1.0 - self.dropout)))
        self._dropout_drawn += rows * shape[-1]
        return mask

    def _lengths_of_full_sequences(self, T, B):
        """lengths [B] int32, all ``T``, on the device: made once per shape and kept (the last
        ``FULL_LENGTHS_KEPT`` shapes), so a call without lengths sends nothing to a GPU (a copy
        from pageable host memory waits for the stream first).  Only read, by every call."""
        lengths = self._full_lengths.pop((T, B), None)
        if lengths is None:
            lengths = self.backend.asarray(validation.check_lengths(self.backend, None, T, B))
            while len(self._full_lengths) >= FULL_LENGTHS_KEPT:
                self._full_lengths.pop(next(iter(self._full_lengths)))
        self._full_lengths[T, B] = lengths  # the most recently used last
        return lengths

    def _grad_weights(self, workspaces, layer, direction):
        w = self._weights(self.grads, layer, direction)
        if not self.bias:  # gradients of the absent biases go to scratch, not to grads
            G, H = self.cell.gates, self.hidden_size
            ws = self._workspace(workspaces, layer, direction)
            w.b_ih = ws.get("db_ih", (G * H,), self.param_dtype)
            w.b_hh = ws.get("db_hh", (G * H,), self.param_dtype)
        return w

    def _workspace(self, workspaces, layer, direction):
        key = (layer, direction)
        if key not in workspaces:
            workspaces[key] = drivers.Workspace(self.backend)
        return workspaces[key]

    # ------------------------------------------------------------------ modes
    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # ------------------------------------------------------------------ forward
    def __call__(self, x, state=None, lengths=None):
        return self.forward(x, state, lengths)

    def forward(self, x, state=None, lengths=None):
        """out [T, B, D*H] (``[B, T, D*H]`` if batch_first), state h [L*D, B, H] or (h, c).

        ``lengths`` [B]: valid steps per sequence, any order.  Outputs past a sequence's end are
        zero; its final state is the state after its last valid step (the reverse direction
        starts at that step); a zero length gives zero outputs and the initial state.  A
        training forward keeps its tape for ``backward``.
        """
        out, final, self._tape = self.forward_with_tape(x, state, lengths)
        return out, final

    def forward_with_tape(self, x, state=None, lengths=None, workspaces=None):
        """``forward``, returning ``(out, state, tape)`` instead of keeping the tape: a
        ``LayerTape`` for ``backward_through`` (None in inference).  ``workspaces``: the
        workspace set to write into (default: the layer's own)."""
        workspaces = self._workspaces if workspaces is None else workspaces
        x = validation.check_input(self.backend, self.dtype, x, self.input_size, self.batch_first)
        xp = self.backend.xp
        if self.batch_first:
            x = xp.ascontiguousarray(x.transpose(1, 0, 2))
        else:
            x = xp.ascontiguousarray(x)
        T, B, _ = x.shape
        if T < 1 or B < 1:
            raise ValueError(f"x must have at least one step and one sequence, got T={T}, B={B}")
        parts = validation.check_state(self.backend, self.dtype, self.cell, state,
                                       self.state_shape(B), "state")
        if lengths is None:
            lengths_dev = self._lengths_of_full_sequences(T, B)
        else:
            lengths_dev = self.backend.asarray(
                validation.check_lengths(self.backend, lengths, T, B))
        training = self.training and inference.is_grad_enabled()
        self._check_fits(T, B, training, workspaces)
        H, D = self.hidden_size, self.num_directions

        h_n = self.backend.empty(self.state_shape(B), self.dtype)  # [L*D, B, H]
        c_n = self.backend.empty(self.state_shape(B), self.dtype) if self.cell.has_cell_state else None
        tapes, weights, masks = {}, {}, {}
        inp = x  # [T, B, I], then [T, B, D*H]
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                idx = layer * D + d
                h0 = parts[0][idx] if parts else self.backend.zeros((B, H), self.dtype)
                c0 = None
                if self.cell.has_cell_state:
                    c0 = parts[1][idx] if parts else self.backend.zeros((B, H), self.dtype)
                w = self._gemm_weights(workspaces, layer, d)
                y, tape = drivers.forward(self.backend, self.cell, w, inp, h0, c0, lengths_dev,
                                          bool(d), training,
                                          self._workspace(workspaces, layer, d))
                h_n[idx] = tape.h_last
                if c_n is not None:
                    c_n[idx] = tape.c_last  # float32 to the layer's dtype, if 16-bit
                if training:
                    tapes[(layer, d)] = tape
                    weights[(layer, d)] = w
                outs.append(y)  # [T, B, H]
            out = outs[0] if D == 1 else xp.concatenate(outs, axis=2)  # [T, B, D*H]
            if training and self.dropout > 0 and layer < self.num_layers - 1:
                masks[layer] = mask = self._dropout_mask(out.shape)  # [T, B, D*H]
                out = out * mask
            inp = out
        tape = LayerTape(tapes, weights, masks, out.shape, workspaces) if training else None
        if self.batch_first:
            out = xp.ascontiguousarray(out.transpose(1, 0, 2))
        return out, ((h_n, c_n) if c_n is not None else h_n), tape

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
        return self.backward_through(self._tape, dout, dstate)

    def backward_through(self, tape, dout, dstate=None):
        """``backward`` through the training forward that returned ``tape``
        (``forward_with_tape``); the tape's workspaces must not have been written since."""
        T, B = tape.steps, tape.batch
        dout = validation.check_array(self.backend, self.dtype, dout, "dout")
        expected = (B, T, self.num_directions * self.hidden_size) if self.batch_first else \
            (T, B, self.num_directions * self.hidden_size)
        if tuple(dout.shape) != expected:
            raise ValueError(f"dout must have the shape of the last forward's output {expected}, "
                             f"got {tuple(dout.shape)}")
        dparts = validation.check_state(self.backend, self.dtype, self.cell, dstate,
                                        self.state_shape(B), "dstate")
        xp = self.backend.xp
        dout = dout.transpose(1, 0, 2) if self.batch_first else dout  # [T, B, D*H]
        H, D = self.hidden_size, self.num_directions
        dh0 = self.backend.empty(self.state_shape(B), self.dtype)  # [L*D, B, H]
        dc0 = self.backend.empty(self.state_shape(B), self.dtype) if self.cell.has_cell_state else None
        zeros = self.backend.zeros((B, H), self.dtype)
        dinp = dout
        for layer in reversed(range(self.num_layers)):
            if layer in tape.masks:
                dinp = dinp * tape.masks[layer]
            dx = None
            for d in range(D):
                idx = layer * D + d
                dy = xp.ascontiguousarray(dinp[:, :, d * H:(d + 1) * H])  # [T, B, H]
                dh_last = dparts[0][idx] if dparts else zeros
                dc_last = None
                if self.cell.has_cell_state:
                    dc_last = dparts[1][idx] if dparts else zeros
                dxd, dh, dc = drivers.backward(self.backend, self.cell, tape.weights[(layer, d)],
                                               tape.directions[(layer, d)], dy, dh_last, dc_last,
                                               self._grad_weights(tape.workspaces, layer, d),
                                               self._workspace(tape.workspaces, layer, d))
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
        return params.state_dict(self.params, self.backend)

    def load_state_dict(self, state_dict):
        """Load arrays (NumPy, or anything ``np.asarray`` takes, e.g. torch CPU tensors) in
        PyTorch's names and layout.  Every name must be present and no other."""
        params.load_arrays(self.params, state_dict, self.backend, self.param_dtype,
                           "this layer")

    # ------------------------------------------------------------------ inference
    def stream(self, chunks, state=None):
        """Inference over a sequence too long for one call, given as an iterable of chunks
        ``[t_i, B, I]`` (``[B, t_i, I]`` if batch_first): yields ``(out_i, state_i)``, carrying
        the state from chunk to chunk.  Memory depends on the chunk size, not the total length;
        the outputs equal one call over the concatenated sequence."""
        return inference.stream(self, chunks, state)

    # ------------------------------------------------------------------ memory
    def activation_bytes(self, T, B):
        """Bytes a training forward keeps for the backward (over all layers and directions),
        beyond the layer inputs and outputs; an inference forward keeps none of it."""
        per = drivers.activation_bytes(self.cell, T, B, self.hidden_size, self.dtype)
        return per * self.num_layers * self.num_directions

    def call_bytes(self, T, B, training):
        """Bytes one forward (and, when training, its backward) holds at its peak."""
        H, G, I = self.hidden_size, self.cell.gates, self.input_size
        L, D = self.num_layers, self.num_directions
        item, fitem = self.dtype.itemsize, self.param_dtype.itemsize  # stored, computed
        lstm = self.cell.has_cell_state
        # once for the whole stack: the scratch buffers every layer and direction uses in turn
        scratch = sum(math.prod(shape) * dtype.itemsize for shape, dtype in
                      drivers.scratch_buffers(self.cell, T, B, H, self.dtype, training).values())
        # per direction, in bytes: y, hg, W_hh^T
        per_direction = T * B * H * item + B * G * H * fitem + H * G * H * item
        if self.dtype != self.param_dtype:                 # the weights' 16-bit copies
            per_direction += G * H * (max(I, D * H) + H) * item
            per_direction += 2 * B * H * fitem if lstm else 0   # the running c, float32
        if training:
            per_direction += self.activation_bytes(T, B) // (L * D)  # the tape
            per_direction += (3 if lstm else 2) * B * H * fitem     # dh_carry, dh_rec (and dc)
        else:                                              # two state slots, one gate slot
            per_direction += 2 * B * H * item * (2 if lstm else 1)
            per_direction += B * self.cell.saved_gates * H * item
        if self.backend.graphs_active():  # staged for CUDA graphs (drivers.py): y, lengths, dy
            per_direction += T * B * H * item * (2 if training else 1) + B * 4
        outputs = L * T * B * D * H * (2 if self.dropout and training else 1) * item
        return L * D * per_direction + scratch + outputs

    def _check_fits(self, T, B, training, workspaces):
        def held():  # reused or replaced by the call
            scratch = drivers.scratch_buffers(self.cell, T, B, self.hidden_size, self.dtype,
                                              training)
            return (sum(ws.nbytes() for ws in workspaces.values())
                    + sum(self.backend.scratch_nbytes(name, *spec)
                          for name, spec in scratch.items()))

        def describe():
            mode = "a training step" if training else "an inference forward"
            return (f"{mode} of {self!r} at T={T}, B={B}",
                    "Lower the batch size, split the sequence (truncated BPTT for training; "
                    "layer.stream() for inference), or run inference (eval() or "
                    "gpurnn.no_grad()), which keeps no activations.")

        self._fit_check.require(self.call_bytes(T, B, training), held, describe)

    # ------------------------------------------------------------------ export
    def to_torch(self):
        """A ``torch.nn.RNN``/``LSTM``/``GRU`` with a copy of these weights
        (``gpurnn/interop/interchange.py``)."""
        return export.export("torch", self)

    def to_onnx(self, path, sequence_lens=False, initial_states=False):
        """Write this layer as an ONNX model of ONNX's RNN/LSTM/GRU operators, atomically
        (``gpurnn/interop/interchange.py``).  Its one input is ``X`` unless asked for more:
        ``sequence_lens`` (the lengths) and ``initial_states`` (``initial_h``, and
        ``initial_c`` of an LSTM) as further inputs; without them every sequence is full
        length and starts from zeros."""
        export.export("onnx", self, path, sequence_lens=sequence_lens,
                      initial_states=initial_states)

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

    ``reset_after=False`` (default): the reset-before cell, the reset gate applied before the
    recurrent product, ``n = tanh(W_in x + b_in + W_hn (r*h) + b_hn)``, ``h = (1-z)*h_prev + z*n``.
    ``reset_after=True``: cuDNN/PyTorch's cell, ``n = tanh(W_in x + b_in + r*(W_hn h + b_hn))``,
    ``h = (1-z)*n + z*h_prev``; PyTorch GRU weights load unchanged and give PyTorch's outputs.
    """

    _mode = "gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device="cpu", dtype="float32", seed=None,
                 reset_after=False):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, seed, reset_after=reset_after)
