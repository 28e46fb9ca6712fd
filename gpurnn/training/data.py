"""The user's arrays as a task: ``ArrayTask`` trains ``Model.fit`` and ``gpurnn train --data``
through the same loop as the embedded tasks.

An epoch is one pass over the training sequences in ``ceil(N / batch_size)`` steps, the last
batch the remainder; with ``shuffle`` each epoch takes them in a new order, drawn from the run's
generator.  That generator's state is kept at the state the epoch's order was drawn from until
its last batch, so a checkpoint taken at any step resumes on the same batches (``batches``).

The inferred task (``describe_arrays``), stated before training: the loss from y's dtype
(integers: classification, ``cross_entropy``; floats: regression, ``mse``), the head from y's
shape (per step: ``all``; per sequence: ``last``), the model's sizes from x and y.
"""
import math

import numpy as np

from ..nn.data import SequenceData, Sequences, targets
from . import metrics
from .task import Task


def describe_arrays(x, y, lengths=None, loss=None, head=None, validation=None):
    """What a model for the arrays needs, read from the data (host side, before any model
    exists): ``(model_kwargs, description)``, model_kwargs the ``Model`` arguments that follow
    from the data (``input_size`` or ``vocab_size``, ``output_size``, ``head``) plus the
    ``loss``.  ``loss``/``head`` None: inferred from y; given: checked against it.
    ``validation``: ``(x, y[, lengths])`` whose tokens and classes count too."""
    seqs = Sequences(x, lengths)
    found = targets(y, seqs, loss, head, head_from="the options ask for")
    parts = [(seqs, found)]
    if validation is not None:
        xv, yv, lv = unpack_data(validation, "validation_data")
        seqs_v = Sequences(xv, lv, "x_val")
        parts.append((seqs_v, targets(yv, seqs_v, found.loss, found.head,
                                      head_from="the training targets ask for")))
    kwargs = {"output_size": found.size, "head": found.head, "loss": found.loss}
    if found.loss == "cross_entropy":
        kwargs["output_size"] = max(t.size for _, t in parts)
    if seqs.tokens:
        kwargs["vocab_size"] = max(int(s.x.max()) for s, _ in parts) + 1
    else:
        kwargs["input_size"] = int(seqs.x.shape[2])
    for s, _ in parts[1:]:
        if s.tokens != seqs.tokens or (not s.tokens and s.x.shape[2] != seqs.x.shape[2]):
            raise ValueError(f"x_val must be like x: x is {seqs.describe()}; x_val is "
                             f"{s.describe()}")
    text = f"x: {seqs.describe()}; y: {found.describe()}"
    if validation is not None:
        text += f"; validation: {parts[1][0].N} sequences"
    return kwargs, text


def unpack_data(data, what):
    """``(x, y)`` or ``(x, y, lengths)`` -> (x, y, lengths or None)."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise ValueError(f"{what} must be (x, y) or (x, y, lengths), got {type(data).__name__}"
                         + (f" of {len(data)} items" if isinstance(data, (tuple, list)) else ""))
    return data[0], data[1], data[2] if len(data) == 3 else None


def split_validation(model, x, y, lengths, loss, fraction):
    """``validation_split``: the last ``fraction`` of the sequences (before any shuffling, as
    Keras does) held out.  Returns ((x, y, lengths) of training, the same of validation)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (float, int)) \
            or not 0 < fraction < 1:
        raise ValueError(f"validation_split must be a fraction in (0, 1), got {fraction!r}")
    seqs = Sequences(x, lengths, backend=model.backend)
    found = targets(y, seqs, loss, model.head_mode)
    n_val = int(round(seqs.N * fraction))
    if not 1 <= n_val < seqs.N:
        raise ValueError(f"validation_split={fraction} of {seqs.N} sequences leaves "
                         f"{seqs.N - n_val} to train on and {n_val} to validate on: both need "
                         f"at least one")
    cut = seqs.N - n_val
    lens = seqs.lengths
    return ((seqs.x[:cut], found.y[:cut], None if lens is None else lens[:cut]),
            (seqs.x[cut:], found.y[cut:], None if lens is None else lens[cut:]))


class ArrayTask(Task):
    """Training (and validation) sequences of arrays, staged for ``model``
    (``nn.data.SequenceData``), as a ``Task``.

    ``train``/``validation``: ``(x, y[, lengths])`` or None (``evaluate`` needs no training
    data, ``fit`` no validation).  ``loss``: None to infer it from y.  ``shuffle``: a new order
    each epoch.  ``eval_batch``: sequences per forward of the evaluation."""

    name = "arrays"

    def __init__(self, model, train=None, validation=None, loss=None, shuffle=True,
                 eval_batch=256):
        self.model_config = model.config
        self.head = model.head_mode
        self.backend = model.backend
        self.train = None
        if train is not None:
            x, y, lengths = unpack_data(train, "the training data")
            self.train = SequenceData(model, x, lengths, y, loss)
            loss = self.train.targets.loss
        self.validation = None
        if validation is not None:
            xv, yv, lv = unpack_data(validation, "validation_data")
            self.validation = SequenceData(model, xv, lv, yv, loss, what="x_val")
            loss = self.validation.targets.loss
        self.loss = loss
        self.metric = "accuracy" if loss == "cross_entropy" else "mse"
        self.higher_is_better = loss == "cross_entropy"
        self.shuffle = bool(shuffle)
        self.eval_batch = eval_batch
        super().__init__((self.train or self.validation).seqs.T)

    def model_kwargs(self):
        c = self.model_config
        sizes = {k: c[k] for k in ("input_size", "vocab_size") if c[k] is not None}
        return {**sizes, "output_size": c["output_size"], "head": c["head"]}

    def steps_per_epoch(self, batch_size):
        return math.ceil(self.train.N / batch_size)

    def batch(self, rng, batch_size):
        """``batch_size`` training sequences drawn with replacement."""
        return self.train.batch(rng.integers(0, self.train.N, size=batch_size))

    def batches(self, rng, batch_size, start_step=0):
        """Epoch after epoch of the training sequences, ``batch_size`` a step (the epoch's
        last batch the remainder), from step ``start_step`` on.  With ``shuffle``, each epoch's
        order is ``rng.permutation(N)``, and ``rng`` keeps the state it was drawn from until
        the epoch's last batch is handed out: a run resumed at any step (that state restored)
        draws the same order again and skips the steps already done."""
        N, per_epoch = self.train.N, self.steps_per_epoch(batch_size)
        done = start_step % per_epoch
        while True:
            order = None
            if self.shuffle:
                before = rng.bit_generator.state
                order = rng.permutation(N)
                after = rng.bit_generator.state
                rng.bit_generator.state = before
            for i in range(done, per_epoch):
                rows = slice(i * batch_size, min(N, (i + 1) * batch_size))
                if order is not None:
                    rows = order[rows]
                    if i == per_epoch - 1:
                        rng.bit_generator.state = after
                yield self.train.batch(rows)
            done = 0

    def test_batches(self):
        if self.validation is None:
            return iter(())
        return (batch for _, batch in self.validation.batches(self.eval_batch))

    def score(self, y, batch):
        target = self.backend.to_numpy(batch.target)
        mask = None if batch.mask is None else self.backend.to_numpy(batch.mask)
        if self.loss == "cross_entropy":
            return metrics.classification(y, target, mask)
        return metrics.regression(y, target, mask)

    @property
    def baseline(self):
        """What a model that ignores x scores on the validation set: the training targets'
        mean (regression, "mse") or most frequent class (classification, "accuracy");
        {} without validation data."""
        if self.validation is None or self.train is None:
            return {}
        train, val = self.train, self.validation
        tv, vv = train.seqs.valid(), val.seqs.valid()
        ty, vy = train.targets.y, val.targets.y
        if self.head == "last":
            tv = vv = None
        if self.loss == "cross_entropy":
            seen = ty if tv is None else ty[tv]
            common = np.bincount(seen.ravel()).argmax()
            scored = vy if vv is None else vy[vv]
            return {"accuracy": float(np.mean(scored == common))}
        mean = (ty if tv is None else ty[tv]).reshape(-1, ty.shape[-1]).mean(axis=0)
        scored = (vy if vv is None else vy[vv]).reshape(-1, vy.shape[-1])
        return {"mse": float(np.mean((scored - mean) ** 2))}

    def describe(self):
        data = self.train or self.validation
        text = f"arrays: {data.seqs.describe()}; y: {data.targets.describe()}"
        if self.train is not None and self.validation is not None:
            text += f"; validation: {self.validation.N} sequences"
        return text
