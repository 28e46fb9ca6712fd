"""One training step of a ``Model``: the forward and backward of a batch, then the update (the
gradients all-reduced under data parallelism, unscaled under loss scaling, checked for NaN and
Inf, clipped, applied).

``train_step`` is the two halves in a row; truncated BPTT (``tbptt.py``) runs them per chunk,
carrying the state from one chunk's forward to the next.
"""
import math

import numpy as np

from ..nn.optim import clip_grad_norm, clip_grad_value


def forward_backward(model, task, batch, state=None, reduction="mean", scaler=None):
    """A training forward of ``batch`` from the initial ``state`` (None: zeros), the loss
    ``task.loss`` and its backward, which fills ``model.grads`` (multiplied by
    ``scaler.scale`` when a ``loss_scale.LossScaler`` is given).  Returns ``(loss, final
    state)``: the state after each sequence's last valid step."""
    model.train()
    y, final = model.forward_with_state(batch.x, batch.lengths, state)
    loss, dy = model.loss(y, batch, task.loss, reduction)
    if scaler is None:
        model.backward(dy)
        return loss, final
    # An overflow of the scaled gradients is expected now and then: the scaler finds it in
    # update() and skips the step, so NumPy's warnings about it are noise.
    with np.errstate(over="ignore", invalid="ignore"):
        model.backward(dy * dy.dtype.type(scaler.scale))
    return loss, final


def update(model, optimizer, loss, batch, reduction="mean", clip_norm=None, clip_value=None,
           data_parallel=None, guard=None, where="", scaler=None):
    """Apply ``model.grads`` (from the backward of ``loss`` on ``batch``) through ``optimizer``.

    ``data_parallel`` (a ``distributed.DataParallel``): first sum the ranks' gradients and
    losses into those of the global batch.  ``scaler`` (the ``loss_scale.LossScaler`` of the
    backward): divide the gradients by its scale; when the scaled backward overflowed, skip
    the update (the scaler counts it).  ``guard`` (a ``nonfinite.NonFiniteGuard``): check
    the loss and gradients before clipping (``where`` locates the step in its batch, for the
    report); when they are not finite the update is not applied.  Returns ``(loss, grad norm
    before clipping as a float, or None when no norm clipping or the update was skipped)``;
    the loss is the global batch's under data parallelism.
    """
    if data_parallel is not None:  # before clipping: the global norm is the summed gradients'
        loss = data_parallel.allreduce_grads(model.grads, loss, batch, reduction)
    checked = None  # the global gradient norm, found once, reused by the guard and clipping
    # A non-finite loss is the guard's to report: no scale would have helped.
    if scaler is not None and math.isfinite(loss):
        checked = scaler.unscale(model.grads)
        if checked is None:
            return loss, None
    if guard is not None:
        checked = guard.check(loss, where, norm=checked)
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


def train_step(model, task, optimizer, batch, reduction="mean", clip_norm=None, clip_value=None,
               data_parallel=None, state=None, guard=None, scaler=None):
    """One step: forward, loss, backward, clipping, update.  Returns (loss, grad norm before
    clipping as a float, or None when no norm clipping).  ``data_parallel``: a
    ``distributed.DataParallel``; then ``batch`` is this rank's shard, and the gradients and
    the loss returned are the whole global batch's.  ``state``: the initial state (None:
    zeros).  ``guard`` (a ``nonfinite.NonFiniteGuard``) checks the loss and gradients before
    clipping; when they are not finite the update is not applied (``guard.report`` says why).
    ``scaler``: a ``loss_scale.LossScaler`` (float16 models)."""
    loss, _ = forward_backward(model, task, batch, state, reduction, scaler)
    return update(model, optimizer, loss, batch, reduction, clip_norm, clip_value, data_parallel,
                  guard, scaler=scaler)
