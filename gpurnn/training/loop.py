"""The training loop: ``fit`` a model to a task, ``evaluate`` it on the task's test set.

A task is an embedded one (``tasks.py``) or the user's arrays (``data.ArrayTask``, behind
``Model.fit``): both run through this one loop."""
import time

import numpy as np

from ..nn.inference import no_grad
from .loss_scale import scaler_for
from .nonfinite import NonFiniteGuard
from .tbptt import train_batch


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
        data_parallel=None, tbptt=None, on_nonfinite="raise", scaler=None):
    """Train from ``start_step`` up to ``steps`` with the batches of
    ``task.batches(rng, batch_size, start_step)``.

    ``on_step(record)`` is called after every step with a dict (step, loss, grad_norm,
    seq_per_s, and the test metrics under ``test`` every ``eval_every`` steps and at the last).
    A float16 model trains with dynamic loss scaling (``loss_scale.py``) by ``scaler`` (default:
    a fresh ``LossScaler``): its records add ``loss_scale`` (after the step) and
    ``overflow_skipped``, the updates of this step that an overflow skipped (never applied).
    ``stop_at``: stop early at the first evaluation whose ``task.metric`` reaches this value
    (that record gets ``"stopped": True``).  ``data_parallel``: a ``distributed.DataParallel``;
    ``batch_size`` is then the global batch, of which this rank trains on its shard.
    ``tbptt``: truncated BPTT in chunks of this many steps, an update per chunk (``tbptt.py``).
    ``on_nonfinite``: what a NaN or Inf in the loss or gradients does (the update is never
    applied): "raise" a ``nonfinite.NonFiniteError``; "skip" the batch (its record gets
    ``nonfinite`` and ``skipped``); "stop" training at the last good weights (the record also
    gets ``halted`` and the test metrics).  Returns the list of records.
    """
    guard = NonFiniteGuard(model, on_nonfinite)
    scaler = scaler_for(model) if scaler is None else scaler
    history = []
    batches = task.batches(rng, batch_size, start_step)
    for step in range(start_step + 1, steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        sequences = batch.x.shape[1]  # the global batch; the last of an epoch may be smaller
        if data_parallel is not None:
            batch = data_parallel.shard(batch, model.head_mode)
        skipped_before = scaler.skipped if scaler is not None else 0
        loss, norm = train_batch(model, task, optimizer, batch, tbptt, reduction, clip_norm,
                                 clip_value, guard=guard, data_parallel=data_parallel,
                                 scaler=scaler)
        record = {"step": step, "loss": loss, "grad_norm": norm,
                  "seq_per_s": sequences / max(time.perf_counter() - t0, 1e-9)}
        if scaler is not None:
            record.update(loss_scale=scaler.scale,
                          overflow_skipped=scaler.skipped - skipped_before)
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
