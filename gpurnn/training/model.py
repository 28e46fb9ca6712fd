"""``gpurnn.Model``: the sequence network (``nn.model.Network``) that trains on the user's
arrays, as Keras's ``Model`` does: ``fit``, ``evaluate``, and ``predict`` (the network's).
``load_model`` reads one back from a checkpoint.

Why a subclass here: ``fit`` is a training loop, and the training loop lives in this layer
(``loop.py``); ``nn`` runs the network and must not import ``training``.  The network's own
methods (forward, backward, loss, ``predict``) stay in ``nn``.
"""
import math
import os
import sys
import time

import numpy as np

from ..kernels.storage import HALF_DTYPES
from ..nn.data import positive_int
from ..nn.losses import REDUCTIONS
from ..nn.model import Network
from ..nn.optim import OPTIMIZERS, Optimizer
from . import checkpoint, loop
from .checkpoint_checks import check_architecture_matches
from .data import ArrayTask, split_validation
from .loss_scale import scaler_for
from .nonfinite import POLICIES

#: The learning rate of an optimiser given by name without ``lr``: Keras's for Adam, the
#: embedded tasks' for the plain and momentum SGD.
DEFAULT_LR = {"adam": 1e-3, "momentum": 1e-2, "sgd": 1e-2}
#: The file a run directory (``checkpoint_dir``, ``gpurnn train --out``) keeps its checkpoint in.
CHECKPOINT = "checkpoint.npz"
#: Sequences per forward when evaluating.
EVAL_BATCH = 256


class History:
    """What ``Model.fit`` did.

    * ``epochs``: one dict per epoch (the last may be partial when ``steps`` ends mid-epoch):
      ``epoch``, ``step`` (the last step of it), ``loss`` (the mean training loss of its
      batches, weighted by their sequences; NaN when every batch was skipped), the validation
      metrics as ``val_loss``, ``val_accuracy`` or ``val_mse``, and ``seconds``;
    * ``history``: Keras's form of the same, name -> one value per epoch;
    * ``steps``: one record per step (``step``, ``loss``, ``grad_norm``, ``seq_per_s``, and
      what the NaN/Inf guard reported);
    * ``params``: the run's settings, among them the ``loss`` and ``head`` taken from y;
    * ``stopped``: ``stop_at`` was reached; ``halted``: a NaN/Inf stopped it
      (``on_nonfinite="stop"``).
    """

    def __init__(self, params):
        self.params = params
        self.epochs = []
        self.steps = []
        self.stopped = False
        self.halted = False

    @property
    def history(self):
        names = [k for k in (self.epochs[-1] if self.epochs else {})
                 if k not in ("epoch", "step", "seconds")]
        return {k: [e.get(k, math.nan) for e in self.epochs] for k in names}

    def __repr__(self):
        last = self.epochs[-1] if self.epochs else {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                          if k not in ("epoch", "step", "seconds"))
        return (f"History({len(self.epochs)} epochs, {len(self.steps)} steps"
                + (f"; last: {shown}" if shown else "") + ")")


def _epoch_line(entry, epochs):
    parts = [f"{k} {v:.4g}" for k, v in entry.items() if k not in ("epoch", "step", "seconds")]
    return f"epoch {entry['epoch']}/{epochs}: " + ", ".join(parts) + \
        f" ({entry['seconds']:.1f} s)"


class Model(Network):
    """(Embedding of tokens) -> recurrent layer(s) -> ``Linear`` head, trainable on arrays.

    The constructor is ``Network``'s (``gpurnn/nn/model.py``): ``Model(cell, hidden_size,
    output_size, input_size=I | vocab_size=V, head="all"|"last", num_layers, device, dtype,
    seed, **cell_options)``.  ``fit`` / ``evaluate`` / ``predict`` take the user's data,
    sample-major (``gpurnn/nn/data.py``): x [N, T, I] float or [N, T] int tokens, or a list of
    sequences of different lengths; y per step [N, T, K] / [N, T] or per sequence [N, K] / [N].
    ``optimizer``: the optimiser of the last ``fit``.
    """

    optimizer = None

    def fit(self, x, y, lengths=None, *, batch_size=32, epochs=None, steps=None,
            validation_data=None, validation_split=None, loss=None, optimizer="adam", lr=None,
            clip=1.0, clip_value=None, reduction="mean", tbptt=None, shuffle=True, seed=0,
            stop_at=None, checkpoint_dir=None, on_nonfinite="raise", progress=True):
        """Train on ``x``, ``y`` (``lengths``: each sequence's valid steps); returns a
        ``History``.

        * ``epochs`` passes over the data (1 when neither is given), or ``steps`` batches of
          ``batch_size`` sequences; each epoch in a new order when ``shuffle``, drawn from
          ``seed`` (which, as the data order, is apart from the weights' seed).
        * ``validation_data=(x, y[, lengths])`` or ``validation_split`` (the last fraction of
          the sequences, before shuffling): scored after every epoch (``History``).
        * ``loss``: "mse" or "cross_entropy"; None takes it from y's dtype (integer class
          labels: cross_entropy; floats: mse).  The head ("all": y per step, "last": y per
          sequence) follows from y's shape and must be the model's.  Both are stated when
          ``progress`` is on, and kept in ``History.params``.
        * ``optimizer``: "adam", "momentum", "sgd" (a fresh one, learning rate ``lr``,
          default ``DEFAULT_LR``), or an optimiser built on this model's ``params``/``grads``
          (which keeps its state across calls; then no ``lr``).
        * ``clip``: global gradient-norm clipping (None: off); ``clip_value``: per entry.
          ``reduction``: the loss's "mean" over valid positions or "sum"; ``tbptt``: truncated
          BPTT in chunks of this many steps.
        * ``stop_at``: stop after the first epoch whose validation accuracy (classification)
          reaches it, or whose validation MSE (regression) falls to it.
        * ``checkpoint_dir``: write ``checkpoint.npz`` there after every epoch (atomically,
          replacing the previous one): ``gpurnn evaluate``/``predict`` and ``load_model`` read it.
        * ``on_nonfinite``: a NaN/Inf loss or gradient is never applied; "raise" (default) a
          ``NonFiniteError``, "skip" the batch, or "stop" at the last good weights.
        * ``progress``: a progress bar, the inferred task and one line per epoch on stderr.
        """
        batch_size = positive_int(batch_size, "batch_size")
        if epochs is not None and steps is not None:
            raise ValueError(f"give epochs or steps, not both (got epochs={epochs!r}, "
                             f"steps={steps!r})")
        if steps is None:
            epochs = positive_int(1 if epochs is None else epochs, "epochs")
        else:
            steps = positive_int(steps, "steps")
        if validation_data is not None and validation_split is not None:
            raise ValueError("give validation_data or validation_split, not both")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        if stop_at is not None and validation_data is None and validation_split is None:
            raise ValueError("stop_at is checked on the validation metric: give validation_data "
                             "or validation_split")
        opt = self._optimizer(optimizer, lr)
        if validation_split is not None:
            train, validation = split_validation(self, x, y, lengths, loss, validation_split)
        else:
            train, validation = (x, y, lengths), validation_data
        task = ArrayTask(self, train, validation, loss, shuffle, EVAL_BATCH)
        per_epoch = task.steps_per_epoch(batch_size)
        total = steps if steps is not None else epochs * per_epoch
        n_epochs = math.ceil(total / per_epoch)
        params = {"loss": task.loss, "head": self.head_mode, "optimizer": type(opt).__name__,
                  "lr": opt.lr, "batch_size": batch_size, "epochs": n_epochs, "steps": total,
                  "steps_per_epoch": per_epoch, "seed": seed, "shuffle": task.shuffle,
                  "clip": clip, "clip_value": clip_value, "reduction": reduction,
                  "tbptt": tbptt, "task": task.describe()}
        history = History(params)
        config = {**{k: v for k, v in params.items() if k != "task"}, "dtype": self.dtype.name}
        ckpt = None
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            ckpt = os.path.join(checkpoint_dir, CHECKPOINT)
        rng = np.random.default_rng([seed, 2])  # the data order, apart from the weights'
        scaler = scaler_for(self)  # float16: dynamic loss scaling (loss_scale.py)
        from tqdm import tqdm

        if progress:
            print(f"gpurnn fit: {task.describe()}; {n_epochs} epoch(s) of {per_epoch} steps",
                  file=sys.stderr)
        bar = tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True,
                   file=sys.stderr)
        epoch = {"sum": 0.0, "count": 0, "start": time.perf_counter()}
        N = task.train.N

        def on_step(record):
            history.steps.append(record)
            step = record["step"]
            index, within = divmod(step - 1, per_epoch)
            if not record.get("skipped"):
                size = min(batch_size, N - within * batch_size)
                epoch["sum"] += record["loss"] * size
                epoch["count"] += size
            bar.set_description(f"epoch {index + 1}/{n_epochs}", refresh=False)
            bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
            bar.update(1)
            if step % per_epoch and "test" not in record:
                return
            entry = {"epoch": index + 1, "step": step,
                     "loss": epoch["sum"] / epoch["count"] if epoch["count"] else math.nan,
                     **{f"val_{k}": v for k, v in record.get("test", {}).items()},
                     "seconds": time.perf_counter() - epoch["start"]}
            history.epochs.append(entry)
            if progress:
                bar.write(_epoch_line(entry, n_epochs), file=sys.stderr)
            if ckpt is not None:
                checkpoint.save_checkpoint(ckpt, self, opt, step, rng, config, scaler)
            epoch.update(sum=0.0, count=0, start=time.perf_counter())

        try:
            records = loop.fit(self, task, opt, rng, total, batch_size, reduction=reduction,
                               clip_norm=clip, clip_value=clip_value,
                               eval_every=per_epoch if task.validation is not None else 0,
                               stop_at=stop_at, on_step=on_step, tbptt=tbptt,
                               on_nonfinite=on_nonfinite, scaler=scaler)
        finally:
            bar.close()
        self.optimizer = opt
        history.stopped = bool(records[-1].get("stopped"))
        history.halted = bool(records[-1].get("halted"))
        return history

    def _optimizer(self, optimizer, lr):
        if isinstance(optimizer, Optimizer):
            if optimizer.params is not self.params:
                raise ValueError("the optimizer was built on other parameters: build it on this "
                                 "model's, e.g. gpurnn.Adam(model.params, model.grads, lr=1e-3)")
            if lr is not None:
                raise ValueError(f"lr applies to an optimizer given by name; this "
                                 f"{type(optimizer).__name__} has lr {optimizer.lr}")
            return optimizer
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or an optimiser "
                             f"object, got {optimizer!r}")
        return OPTIMIZERS[optimizer](self.params, self.grads,
                                     lr=DEFAULT_LR[optimizer] if lr is None else lr)

    def evaluate(self, x, y, lengths=None, *, loss=None, batch_size=EVAL_BATCH):
        """The metrics of the model on ``x``, ``y`` (as ``fit`` takes them): {"loss",
        "accuracy"} for class labels, {"loss", "mse"} for regression targets.  "loss" is the
        training loss (mean over the valid positions: nats, or 1/2 the squared error summed
        over the outputs), "mse" the mean squared error per output value.  ``loss`` None: from
        y's dtype, as in ``fit``."""
        task = ArrayTask(self, validation=(x, y, lengths), loss=loss,
                         eval_batch=positive_int(batch_size, "batch_size"))
        return loop.evaluate(self, task)


def run_file(path):
    """The checkpoint file of ``path``: ``path/checkpoint.npz`` for a run directory."""
    return os.path.join(path, CHECKPOINT) if os.path.isdir(path) else os.fspath(path)


def model_from_checkpoint(loaded, device="cpu"):
    """The ``Model`` of a loaded checkpoint (``checkpoint.load_checkpoint``): its recorded
    architecture, the dtype of its weights (or the run's 16-bit dtype, whose weights are
    float32 masters), the weights.  ``CheckpointError`` when it has no architecture record or
    one its weights contradict."""
    weights = loaded["model"]
    arch = loaded.get("architecture")
    if arch is None:
        raise checkpoint.CheckpointError(
            "this checkpoint records no architecture (written before gpurnn kept one): resume "
            "it with gpurnn train --resume, whose options rebuild the model")
    try:
        check_architecture_matches(arch, weights)
        dtype = weights["head.weight"].dtype.name
        run_dtype = loaded.get("config", {}).get("dtype")
        if run_dtype in HALF_DTYPES and dtype == "float32":
            dtype = run_dtype
        model = Model(**arch, dtype=dtype, device=device)
        model.load_state_dict(weights)
    except (TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"the checkpoint's model cannot be rebuilt: "
                                         f"{exc}") from exc
    return model


def load_model(path, device="cpu"):
    """The trained ``Model`` saved in a checkpoint: a ``checkpoint.npz`` file or a run
    directory holding one (``fit(checkpoint_dir=...)``, ``gpurnn train --out``), on
    ``device``."""
    return model_from_checkpoint(checkpoint.load_checkpoint(run_file(path)), device)
