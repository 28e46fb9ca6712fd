"""A trainable sequence model: (embedding) -> recurrent layer -> output layer, and the helpers
that train and evaluate it on a task (``fit``, ``evaluate``) and measure its gradient flow.

Gradients flow loss -> head (``Linear``) -> ``layer.backward(dout)`` -> embedding.
"""
import math
import time

import numpy as np

from . import losses
from .layers import GRU, LSTM, RNN, no_grad
from ..training.nonfinite import NonFiniteGuard
from .optim import clip_grad_norm, clip_grad_value
from ..training.tbptt import train_batch

CELLS = {"rnn": RNN, "lstm": LSTM, "gru": GRU}
HEADS = ("all", "last")


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


class Model:
    """(Embedding of tokens) -> recurrent layer(s) -> ``Linear`` head.

    Give ``input_size`` for float inputs x [T, B, I], or ``vocab_size`` (and ``embed_size``)
    for int token inputs [T, B].  ``head="all"``: an output on every step, y [T, B, K];
    ``head="last"``: on each sequence's last valid step only (``lengths``), y [B, K].
    ``params`` / ``grads``: one flat dict over all parts (``embedding.weight``,
    ``rnn.weight_ih_l0``, ..., ``head.weight``, ``head.bias``) holding the parts' own arrays, so an
    optimiser built on them updates the model in place.  The same seed gives the same weights.
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
        layer_seed = None if seed is None else seed
        self.head_mode = head
        if vocab_size is not None:
            embed_size = embed_size or min(64, hidden_size)
            self.config["embed_size"] = embed_size
            rnn_in = embed_size
        else:
            rnn_in = input_size
        self.rnn = CELLS[cell](rnn_in, hidden_size, num_layers=num_layers, device=device,
                               dtype=dtype, seed=layer_seed, **cell_options)
        self.backend, self.dtype = self.rnn.backend, self.rnn.dtype
        self.embedding = None
        if vocab_size is not None:
            self.embedding = Embedding(vocab_size, embed_size, self.backend, self.dtype, rng)
        self.head = Linear(hidden_size, output_size, self.backend, self.dtype, rng)
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
        """Host or device inputs -> device array of the model's input type."""
        x = self.backend.asarray(x)
        if self.embedding is not None:
            if x.ndim != 2 or x.dtype.kind not in "iu":
                raise TypeError(f"a token model takes int tokens [T, B], got {x.dtype} array "
                                f"of shape {tuple(x.shape)}")
            return x.astype(np.int64)
        if x.ndim != 3 or x.dtype.kind != "f":
            raise TypeError(f"this model takes float inputs [T, B, {self.rnn.input_size}], got "
                            f"{x.dtype} array of shape {tuple(x.shape)}")
        return x.astype(self.dtype)

    def forward(self, x, lengths=None, state=None):
        """y [T, B, K] (head "all") or [B, K] (head "last"); x [T, B, I] or tokens [T, B]."""
        x = self.inputs(x)
        T, B = x.shape[:2]
        if lengths is not None:
            lengths = np.asarray(lengths if self.backend.host_arrays
                                 else self.backend.to_numpy(lengths))
            if self.head_mode == "last" and lengths.size and lengths.min() < 1:
                raise ValueError("head='last' needs every length >= 1, got a zero length")
        xe = self.embedding.forward(x) if self.embedding is not None else x  # [T, B, I]
        out, final = self.rnn(xe, state, lengths=lengths)  # out [T, B, H]
        self.final_state = final  # where a next chunk starts (truncated BPTT)
        H = out.shape[2]
        if self.head_mode == "all":
            y = self.head.forward(out.reshape(T * B, H)).reshape(T, B, -1)
            self._cache = (T, B, None)
            return y
        xp = self.backend.xp
        last = self.backend.asarray(np.full(B, T - 1) if lengths is None else lengths - 1)
        cols = xp.arange(B)
        self._cache = (T, B, (last, cols))
        return self.head.forward(out[last, cols])  # [B, K]

    __call__ = forward

    def backward(self, dy):
        """Backward of the last training forward; fills ``grads`` (overwritten)."""
        if self._cache is None:
            raise ValueError("backward() needs a forward first")
        T, B, picked = self._cache
        H = self.rnn.hidden_size
        if picked is None:
            dout = self.head.backward(dy.reshape(T * B, -1)).reshape(T, B, H)
        else:
            dout = self.backend.zeros((T, B, H), self.dtype)  # [T, B, H]
            dout[picked] = self.head.backward(dy)
        dx, _ = self.rnn.backward(dout)
        if self.embedding is not None:
            self.embedding.backward(dx)

    def loss(self, y, batch, loss_name, reduction="mean"):
        """(loss, dy) of outputs y against a Batch's target and mask; ``loss_name`` a key of
        ``gpurnn.losses.LOSSES`` ("mse" or "cross_entropy")."""
        if loss_name not in losses.LOSSES:
            raise ValueError(f"loss_name must be one of {sorted(losses.LOSSES)}, got {loss_name!r}")
        loss_fn = losses.LOSSES[loss_name]
        target = self.backend.asarray(batch.target)
        if loss_name == "mse":
            target = target.astype(self.dtype)
        mask = None if batch.mask is None else self.backend.asarray(batch.mask)
        return loss_fn(y, target, mask, reduction)

    def state_dict(self):
        """NumPy copies of every parameter, by the names of ``params``."""
        return {name: np.array(self.backend.to_numpy(p)) for name, p in self.params.items()}

    def load_state_dict(self, state):
        missing = sorted(set(self.params) - set(state))
        unexpected = sorted(set(state) - set(self.params))
        if missing or unexpected:
            raise ValueError(f"state does not match this model: missing {missing}, "
                             f"unexpected {unexpected}")
        for name, p in self.params.items():
            host = np.asarray(state[name])
            if host.shape != tuple(p.shape):
                raise ValueError(f"{name} must have shape {tuple(p.shape)}, got {host.shape}")
            p[...] = self.backend.asarray(host.astype(self.dtype))

    def num_params(self):
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def __repr__(self):
        emb = f"Embedding({self.embedding.params['weight'].shape}) -> " if self.embedding else ""
        K = self.head.params["weight"].shape[0]
        return f"Model({emb}{self.rnn!r} -> Linear({self.rnn.hidden_size}, {K}), head={self.head_mode!r})"


def model_for_task(task, cell="lstm", hidden_size=64, **kwargs):
    """A Model shaped for ``task`` (inputs, outputs, head)."""
    return Model(cell=cell, hidden_size=hidden_size, **task.model_kwargs(), **kwargs)


def train_step(model, task, optimizer, batch, reduction="mean", clip_norm=None, clip_value=None,
               data_parallel=None, state=None, guard=None):
    """One step: forward, loss, backward, clipping, update.  Returns (loss, grad norm before
    clipping as a float, or None when no norm clipping).  ``data_parallel``: a
    ``distributed.DataParallel``; then ``batch`` is this rank's shard, and the gradients and
    the loss returned are the whole global batch's.  ``state``: the initial state (None:
    zeros).  ``guard`` (a ``nonfinite.NonFiniteGuard``) checks the loss and gradients before
    clipping; when they are not finite the update is not applied (``guard.report`` says why)."""
    model.train()
    y = model(batch.x, batch.lengths, state)
    loss, dy = model.loss(y, batch, task.loss, reduction)
    model.backward(dy)
    if data_parallel is not None:  # before clipping: the global norm is the summed gradients'
        loss = data_parallel.allreduce_grads(model.grads, loss, batch, reduction)
    checked = None  # the guard's global gradient norm, reused by the norm clipping
    if guard is not None:
        checked = guard.check(loss)
        if checked is None:
            return loss, None
    norm = None
    if clip_value is not None:
        clip_grad_value(model.grads, clip_value)
        checked = None  # no longer the norm of the gradients
    if clip_norm is not None:
        norm = float(clip_grad_norm(model.grads, clip_norm, norm=checked))
    optimizer.step()
    return loss, norm


def evaluate(model, task):
    """The task's metrics on its fixed test set: {name: value}."""
    was_training = model.rnn.training
    model.eval()
    sums = {}
    try:
        with no_grad():
            for batch in task.test_batches():
                y = model.backend.to_numpy(model(batch.x, batch.lengths))
                for name, (s, n) in task.score(np.asarray(y), batch).items():
                    total, count = sums.get(name, (0.0, 0))
                    sums[name] = (total + s, count + n)
    finally:
        model.train(was_training)
    return {name: s / max(n, 1) for name, (s, n) in sums.items()}


def _reached(task, metrics, stop_at):
    value = metrics[task.metric]
    return value >= stop_at if task.higher_is_better else value <= stop_at


def fit(model, task, optimizer, rng, steps, batch_size, start_step=0, reduction="mean",
        clip_norm=None, clip_value=None, eval_every=0, stop_at=None, on_step=None,
        data_parallel=None, tbptt=None, on_nonfinite="raise"):
    """Train from ``start_step`` up to ``steps`` with batches drawn from ``rng``.

    ``on_step(record)`` is called after every step with a dict (step, loss, grad_norm,
    seq_per_s, and the test metrics under ``test`` every ``eval_every`` steps and at the last).
    ``stop_at``: stop early at the first evaluation whose ``task.metric`` reaches this value
    (that record gets ``"stopped": True``).  ``data_parallel``: a ``distributed.DataParallel``;
    ``batch_size`` is then the global batch, of which this rank trains on its shard.
    ``tbptt``: truncated BPTT in chunks of this many steps, an update per chunk (gpurnn/tbptt.py).
    ``on_nonfinite``: what a NaN or Inf in the loss or gradients does (the update is never
    applied): "raise" a ``nonfinite.NonFiniteError``; "skip" the batch (its record gets
    ``nonfinite`` and ``skipped``); "stop" training at the last good weights (the record also
    gets ``halted`` and the test metrics).  Returns the list of records.
    """
    guard = NonFiniteGuard(model, on_nonfinite)
    history = []
    for step in range(start_step + 1, steps + 1):
        t0 = time.perf_counter()
        batch = task.batch(rng, batch_size)
        if data_parallel is not None:
            batch = data_parallel.shard(batch, model.head_mode)
        loss, norm = train_batch(model, task, optimizer, batch, tbptt, reduction, clip_norm,
                                 clip_value, guard=guard, data_parallel=data_parallel)
        record = {"step": step, "loss": loss, "grad_norm": norm,
                  "seq_per_s": batch_size / max(time.perf_counter() - t0, 1e-9)}
        halted = guard.resolve(step, record)
        if halted or step == steps or (eval_every and step % eval_every == 0):
            record["test"] = evaluate(model, task)
            if stop_at is not None and _reached(task, record["test"], stop_at):
                record["stopped"] = True
        history.append(record)
        if on_step is not None:
            on_step(record)
        if halted or record.get("stopped"):
            break
    return history


def gradient_flow(model, batch, loss_name):
    """``||dL/dh_t||`` for t = 0..T-1, where ``L`` is the loss on the last step only and
    ``h_t`` the top recurrent layer's hidden state after step t: [T] NumPy, the mean over the
    batch of each sequence's norm (loss summed over sequences, so each is its own loss's).

    Exact, through the layers' own backward: the state after step t is the initial state of
    the rest of the sequence, and a layer's backward returns the gradient of its initial
    state.  So (1) one inference forward of T copies of the batch with lengths 1..T gives the
    states after every step t (all layers; h and c); (2) one training forward of the T
    suffixes x[t+1:], started from those states (lengths T-1-t), and its backward with
    ``dstate = dL/dh_{T-1}`` from the head and no output gradient, give ``dL/dh_t`` (for the
    LSTM: with c_t held, c_t being a state of its own) as the initial-state gradients.
    Needs full-length sequences (``batch.lengths`` None) and a single-direction model.
    """
    if batch.lengths is not None:
        raise ValueError("gradient_flow needs full-length sequences (batch.lengths None)")
    if model.rnn.bidirectional:
        raise ValueError("gradient_flow needs a single-direction model")
    be, xp = model.backend, model.backend.xp
    x = model.inputs(batch.x)
    xe = model.embedding.forward(x) if model.embedding is not None else x  # [T, B, I]
    T, B, I = xe.shape
    lstm = model.rnn.cell.has_cell_state
    # (1) states after each step: column block t holds the batch run for t+1 steps.
    tiled = xp.tile(xe, (1, T, 1))  # [T, T*B, I]
    prefix = np.repeat(np.arange(1, T + 1), B)  # [T*B]
    with no_grad():
        _, states = model.rnn(tiled, lengths=prefix)  # h [L, T*B, H] (and c)
    h_top = states[0][-1] if lstm else states[-1]  # [T*B, H]
    # dL/dh_{T-1} from the head on the last step (sum over sequences).
    h_last = h_top[(T - 1) * B:]  # [B, H]
    y = model.head.forward(h_last)
    target = batch.target[-1] if model.head_mode == "all" else batch.target
    last = type(batch)(x=None, target=target)
    _, dy = model.loss(y, last, loss_name, "sum")
    g = model.head.backward(dy)  # [B, H]
    # (2) suffixes x[t+1:] from the state after step t.
    steps = np.arange(T)[:, None] + 1 + np.arange(T)[None, :]  # [T(t), T(k)] source step
    valid = steps < T
    src = be.asarray(np.where(valid, steps, 0).T)  # [T(k), T(t)]
    suffix = xe[src]  # [T(k), T(t), B, I]
    suffix *= be.asarray(valid.T[:, :, None, None].astype(model.dtype))
    suffix = xp.ascontiguousarray(suffix.reshape(T, T * B, I))
    lengths = np.repeat(T - 1 - np.arange(T), B)  # [T*B]
    model.rnn.train()
    out, _ = model.rnn(suffix, states, lengths=lengths)
    dh_final = be.zeros(states[0].shape if lstm else states.shape, model.dtype)  # [L, T*B, H]
    dh_final[-1] = xp.tile(g, (T, 1))
    dstate = (dh_final, be.zeros(dh_final.shape, model.dtype)) if lstm else dh_final
    _, dstate0 = model.rnn.backward(be.zeros(out.shape, model.dtype), dstate)
    dh = (dstate0[0] if lstm else dstate0)[-1].reshape(T, B, -1)  # [T, B, H]
    norms = xp.sqrt((dh.astype(np.float64) ** 2).sum(axis=2)).mean(axis=1)  # [T]
    return np.asarray(be.to_numpy(norms))
