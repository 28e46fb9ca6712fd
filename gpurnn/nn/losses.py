"""Losses with their gradients, on the arrays' own device (NumPy or CuPy).

Every loss returns ``(loss, grad)``: ``loss`` a Python float, ``grad`` the gradient of ``loss``
with respect to the prediction, same shape and dtype, on the same device.

Positions are the leading axes of the prediction (``[T, B]`` per step, ``[B]`` per sequence);
the last axis holds the outputs (``K`` regression outputs, ``C`` class logits).  ``mask``
(same shape as the positions, 0/1 or bool) leaves out padded positions: they add nothing to the
loss and get a zero gradient.

``reduction="sum"`` is the seed's ``L = sum_t L_t``, summed over every valid position (time
steps and sequences); ``"mean"`` divides that sum by the number of valid positions.
"""
import numpy as np

from ..engine.arrays import array_module

REDUCTIONS = ("sum", "mean")


def _check(pred, mask, reduction, what):
    if not hasattr(pred, "ndim") or pred.ndim < 2:
        raise ValueError(f"{what} must be an array with at least 2 axes (positions..., outputs), "
                         f"got {getattr(pred, 'shape', type(pred).__name__)}")
    if pred.dtype.kind != "f":
        raise TypeError(f"{what} must be floating point, got dtype {pred.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None and tuple(mask.shape) != tuple(pred.shape[:-1]):
        raise ValueError(f"mask must have the shape of the positions {tuple(pred.shape[:-1])}, "
                         f"got {tuple(mask.shape)}")


def _weights(xp, pred, mask, reduction):
    """(per-position weight [positions..., 1] or None, scale of the summed loss)."""
    w = None if mask is None else xp.asarray(mask).astype(pred.dtype)[..., None]
    if reduction == "sum":
        return w, 1.0
    count = float(np.prod(pred.shape[:-1])) if w is None else float(w.sum())
    return w, 1.0 / max(count, 1.0)


def mse(pred, target, mask=None, reduction="sum"):
    """``L = sum over positions of 1/2 ||pred - target||^2`` (the seed's MSE), optionally masked.

    pred, target [..., K] (same shape); mask [...].  grad = (pred - target) * mask * scale.
    """
    _check(pred, mask, reduction, "pred")
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"target must have the shape of pred {tuple(pred.shape)}, "
                         f"got {tuple(target.shape)}")
    xp = array_module(pred)
    w, scale = _weights(xp, pred, mask, reduction)
    diff = pred - xp.asarray(target, dtype=pred.dtype)  # [..., K]
    if w is not None:
        diff *= w
    loss = 0.5 * float((diff * diff).sum()) * scale
    diff *= pred.dtype.type(scale)
    return loss, diff


def softmax_cross_entropy(logits, targets, mask=None, reduction="sum"):
    """``L = sum over positions of -log softmax(logits)[target]``, optionally masked.

    logits [..., C]; targets [...] integer class indices in [0, C) (any value at masked
    positions); mask [...].  Computed with a stable log-sum-exp; grad = (softmax - onehot) *
    mask * scale.
    """
    _check(logits, mask, reduction, "logits")
    xp = array_module(logits)
    targets = xp.asarray(targets)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have the shape of the positions "
                         f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    C = logits.shape[-1]
    w, scale = _weights(xp, logits, mask, reduction)
    # Padded positions may hold any target; point them at class 0 so indexing stays valid.
    safe = targets if mask is None else xp.where(xp.asarray(mask).astype(bool), targets, 0)
    if safe.size and (int(safe.min()) < 0 or int(safe.max()) >= C):
        raise ValueError(f"targets must lie in [0, {C}), got min {int(safe.min())} "
                         f"max {int(safe.max())}")
    z = logits - logits.max(axis=-1, keepdims=True)  # [..., C], max 0: exp cannot overflow
    e = xp.exp(z)
    sum_e = e.sum(axis=-1, keepdims=True)  # [..., 1]
    z_target = xp.take_along_axis(z, safe[..., None].astype(np.int64), axis=-1)  # [..., 1]
    nll = xp.log(sum_e) - z_target  # [..., 1]
    grad = e / sum_e  # [..., C] softmax
    flat = grad.reshape(-1, C)
    flat[xp.arange(flat.shape[0]), safe.reshape(-1)] -= 1
    if w is not None:
        nll *= w
        grad *= w
    loss = float(nll.sum()) * scale
    grad *= logits.dtype.type(scale)
    return loss, grad


LOSSES = {"mse": mse, "cross_entropy": softmax_cross_entropy}
