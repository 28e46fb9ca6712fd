"""A sequence network: (embedding) -> recurrent layer -> output layer, its forward, backward,
loss and ``predict``.

Gradients flow loss -> head (``Linear``) -> ``layer.backward(dout)`` -> embedding.  Training
it is ``gpurnn.training``'s job: ``gpurnn.Model`` (``training/model.py``) is this network with
``fit`` and ``evaluate``.
"""
import math

import numpy as np

from ..engine.arrays import adopt
from . import losses, params
from .data import HEADS, SequenceData, positive_int
from .inference import no_grad
from .layers import GRU, LSTM, RNN
from .validation import is_float

CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}


def default_embed_size(hidden_size):
    """The embedding size of a token model that gives none."""
    return min(64, hidden_size)


class Linear:
    """The seed's output layer ``y = W_y h + b_y``: weight [K, H], bias [K].

    ``forward(h)`` with h [N, H] gives y [N, K]; ``backward(dy)`` sets ``grads`` and returns
    dh [N, H] for the last forward.
    """

    def __init__(self, in_size, out_size, backend, dtype, rng):
        bound = 1.0 / math.sqrt(in_size)
        self.backend = backend
        self.params = {
            "weight": backend.asarray(rng.uniform(-bound, bound, (out_size, in_size)).astype(dtype)),
            "bias": backend.asarray(rng.uniform(-bound, bound, (out_size,)).astype(dtype)),
        }
        self.grads = {k: backend.zeros(v.shape, dtype) for k, v in self.params.items()}
        self._h = None

    def forward(self, h):
        self._h = h
        return h @ self.params["weight"].T + self.params["bias"]

    def backward(self, dy):
        self.backend.matmul(dy.T, self._h, out=self.grads["weight"])
        dy.sum(axis=0, out=self.grads["bias"])
        return dy @ self.params["weight"]


class Embedding:
    """Token embedding: weight [V, E]; ``forward(tokens [T, B])`` gives [T, B, E].

    The backward scatters the gradient rows onto the table as a one-hot GEMM
    (``onehot^T @ dx``): deterministic on the GPU too, where an atomic scatter-add is not.
    """

    def __init__(self, vocab_size, embed_size, backend, dtype, rng):
        self.backend, self.dtype = backend, dtype
        self.params = {"weight": backend.asarray(
            rng.standard_normal((vocab_size, embed_size)).astype(dtype))}
        self.grads = {"weight": backend.zeros((vocab_size, embed_size), dtype)}
        self._tokens = None

    def forward(self, tokens):
        V = self.params["weight"].shape[0]
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"tokens must lie in [0, {V}), got min {lo} max {hi}")
        self._tokens = tokens
        return self.params["weight"][tokens]

    def backward(self, dx):
        xp = self.backend.xp
        V, E = self.params["weight"].shape
        flat = self._tokens.reshape(-1)
        onehot = xp.zeros((flat.shape[0], V), dtype=self.dtype)  # [T*B, V]
        onehot[xp.arange(flat.shape[0]), flat] = 1
        self.backend.matmul(onehot.T, dx.reshape(-1, E), out=self.grads["weight"])


class Network:
    """(Embedding of tokens) -> recurrent layer(s) -> ``Linear`` head.

    Give ``input_size`` for float inputs x [T, B, I], or ``vocab_size`` (and ``embed_size``)
    for int token inputs [T, B].  ``head="all"``: an output on every step, y [T, B, K];
    ``head="last"``: on each sequence's last valid step only (``lengths``), y [B, K].
    ``params`` / ``grads``: one flat dict over all parts (``embedding.weight``,
    ``rnn.weight_ih_l0``, ..., ``head.weight``, ``head.bias``) holding the parts' own arrays, so an
    optimiser built on them updates the model in place.  The same seed gives the same weights.

    ``dtype``: the recurrent layer's (``gpurnn.nn.layers.RNNBase``).  With float16 or bfloat16
    the embedding, the head and the loss compute in float32 (``compute_dtype``), as do every
    parameter and gradient; only the recurrent layer's inputs, outputs and activations are
    16-bit.
    """

    def __init__(self, cell="lstm", hidden_size=64, output_size=1, input_size=None,
                 vocab_size=None, embed_size=None, num_layers=1, head="all", device="cpu",
                 dtype="float32", seed=None, **cell_options):
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if (input_size is None) == (vocab_size is None):
            raise ValueError(f"give exactly one of input_size (float inputs) and vocab_size "
                             f"(token inputs), got input_size={input_size!r}, "
                             f"vocab_size={vocab_size!r}")
        self.config = {"cell": cell, "hidden_size": int(hidden_size),
                       "output_size": int(output_size), "input_size": input_size,
                       "vocab_size": vocab_size, "embed_size": embed_size,
                       "num_layers": int(num_layers), "head": head, "dtype": str(dtype),
                       "seed": seed, **cell_options}
        rng = np.random.default_rng(None if seed is None else [seed, 1])
        self.head_mode = head
        if vocab_size is not None:
            embed_size = embed_size or default_embed_size(hidden_size)
            self.config["embed_size"] = embed_size
            rnn_in = embed_size
        else:
            rnn_in = input_size
        self.rnn = CELLS[cell](rnn_in, hidden_size, num_layers=num_layers, device=device,
                               dtype=dtype, seed=seed, **cell_options)
        self.backend, self.dtype = self.rnn.backend, self.rnn.dtype
        self.compute_dtype = self.rnn.param_dtype
        self.embedding = None
        if vocab_size is not None:
            self.embedding = Embedding(vocab_size, embed_size, self.backend, self.compute_dtype,
                                       rng)
        self.head = Linear(hidden_size, output_size, self.backend, self.compute_dtype, rng)
        self.params, self.grads = {}, {}
        for prefix, part in self._parts():
            for name in part.params:
                self.params[f"{prefix}.{name}"] = part.params[name]
                self.grads[f"{prefix}.{name}"] = part.grads[name]
        self._cache = None

    def _parts(self):
        if self.embedding is not None:
            yield "embedding", self.embedding
        yield "rnn", self.rnn
        yield "head", self.head

    @property
    def device(self):
        return self.backend.name

    def train(self, mode=True):
        self.rnn.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def inputs(self, x):
        """Inputs of any array library (``engine.arrays.adopt``; host data is copied to the
        device) -> device array of the model's input type."""
        x = adopt(self.backend, x, "x", from_host=True)
        x = x if self.backend.is_array(x) else self.backend.asarray(x)
        if self.embedding is not None:
            if x.ndim != 2 or x.dtype.kind not in "iu":
                raise TypeError(f"a token model takes int tokens [T, B], got {x.dtype} array "
                                f"of shape {tuple(x.shape)}")
            return x.astype(np.int64)
        if x.ndim != 3 or not is_float(x.dtype):
            raise TypeError(f"this model takes float inputs [T, B, {self.rnn.input_size}], got "
                            f"{x.dtype} array of shape {tuple(x.shape)}")
        return x.astype(self.dtype, copy=False)

    def forward(self, x, lengths=None, state=None):
        """y [T, B, K] (head "all") or [B, K] (head "last"); x [T, B, I] or tokens [T, B]."""
        return self.forward_with_state(x, lengths, state)[0]

    __call__ = forward

    def forward_with_state(self, x, lengths=None, state=None):
        """``(y, final_state)``: ``forward``'s output, and the recurrent layer's state after each
        sequence's last valid step (where a next chunk of the sequences starts)."""
        x = self.inputs(x)
        T, B = x.shape[:2]
        if lengths is not None:
            lengths = np.asarray(lengths if self.backend.host_arrays
                                 else self.backend.to_numpy(lengths))
            if self.head_mode == "last" and lengths.size and lengths.min() < 1:
                raise ValueError("head='last' needs every length >= 1, got a zero length")
        xe = self.embedding.forward(x) if self.embedding is not None else x  # [T, B, I]
        out, final = self.rnn(xe.astype(self.dtype, copy=False), state, lengths=lengths)
        out = out.astype(self.compute_dtype, copy=False)  # [T, B, H]
        H = out.shape[2]
        if self.head_mode == "all":
            y = self.head.forward(out.reshape(T * B, H)).reshape(T, B, -1)  # [T, B, K]
            self._cache = (T, B, None)
            return y, final
        xp = self.backend.xp
        # the step each sequence's output is read at [B]: filled on the device when every
        # sequence is whole (nothing sent from the host, whose copies wait for the GPU)
        last = xp.full(B, T - 1) if lengths is None else self.backend.asarray(lengths - 1)
        cols = xp.arange(B)
        self._cache = (T, B, (last, cols))
        return self.head.forward(out[last, cols]), final  # [B, K]

    def predict(self, x, lengths=None, batch_size=256):
        """The outputs for N sequences, sample-major: [N, T, K] (head "all"; zero at the steps
        past each sequence's length) or [N, K] (head "last"), as an array of the backend
        (NumPy on the CPU, CuPy on a GPU).  Regression values, or class logits (``argmax`` of
        the last axis for the labels).

        ``x`` [N, T, I] float or [N, T] int tokens, or a list of sequences of different lengths
        (padded, ``lengths`` made from it), in any array library (``gpurnn/nn/data.py``);
        ``lengths`` [N]; run ``batch_size`` sequences at a time in inference mode (no
        activations kept), the training mode restored afterwards."""
        batch_size = positive_int(batch_size, "batch_size")
        data = SequenceData(self, x, lengths)
        K = self.head.params["weight"].shape[0]
        N, T = data.N, data.seqs.T
        shape = (N, T, K) if self.head_mode == "all" else (N, K)
        out = self.backend.zeros(shape, self.compute_dtype)  # [N, T, K] or [N, K]
        xp = self.backend.xp
        was_training = self.rnn.training
        self.eval()
        try:
            with no_grad():
                for rows, batch in data.batches(batch_size):
                    y = self.forward(batch.x, batch.lengths)  # [T_b, B, K] or [B, K]
                    if self.head_mode == "last":
                        out[rows] = y
                        continue
                    if batch.mask is not None:
                        y *= batch.mask[:, :, None]
                    out[rows, :y.shape[0]] = xp.swapaxes(y, 0, 1)
        finally:
            self.train(was_training)
        return out

    def backward(self, dy):
        """Backward of the last training forward; fills ``grads`` (overwritten)."""
        if self._cache is None:
            raise ValueError("backward() needs a forward first")
        T, B, picked = self._cache
        H = self.rnn.hidden_size
        if picked is None:
            dout = self.head.backward(dy.reshape(T * B, -1)).reshape(T, B, H)
        else:
            dout = self.backend.zeros((T, B, H), self.compute_dtype)  # [T, B, H]
            dout[picked] = self.head.backward(dy)
        dx, _ = self.rnn.backward(dout.astype(self.dtype, copy=False))
        if self.embedding is not None:
            self.embedding.backward(dx)

    def loss(self, y, batch, loss_name, reduction="mean"):
        """(loss, dy) of outputs y against a Batch's target and mask; ``loss_name`` a key of
        ``gpurnn.nn.losses.LOSSES`` ("mse" or "cross_entropy")."""
        if loss_name not in losses.LOSSES:
            raise ValueError(f"loss_name must be one of {sorted(losses.LOSSES)}, got {loss_name!r}")
        loss_fn = losses.LOSSES[loss_name]
        target = self.backend.asarray(batch.target)
        if loss_name == "mse":
            target = target.astype(self.compute_dtype)
        mask = None if batch.mask is None else self.backend.asarray(batch.mask)
        return loss_fn(y, target, mask, reduction)

    def state_dict(self):
        """NumPy copies of every parameter, by the names of ``params``."""
        return params.state_dict(self.params, self.backend)

    def load_state_dict(self, state_dict):
        """Load arrays by the names of ``params``; every name must be present and no other."""
        params.load_arrays(self.params, state_dict, self.backend, self.compute_dtype,
                           "this model")

    def num_params(self):
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def __repr__(self):
        emb = f"Embedding({self.embedding.params['weight'].shape}) -> " if self.embedding else ""
        K = self.head.params["weight"].shape[0]
        return (f"{type(self).__name__}({emb}{self.rnn!r} -> Linear({self.rnn.hidden_size}, {K}), "
                f"head={self.head_mode!r})")
