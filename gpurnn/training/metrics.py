"""Metrics of a model's outputs against targets, as (sum, count) pairs that add up over
batches: ``loop.evaluate`` divides the totals.  Computed on the host in float64."""
import numpy as np


def _weights(shape, mask):
    return np.ones(shape) if mask is None else np.asarray(mask).astype(np.float64)


def classification(logits, targets, mask=None):
    """Accuracy and the mean cross-entropy in nats ("loss", the training loss) of class logits
    [..., C] against int targets [...], over the positions of ``mask`` [...] (None: all)."""
    logits = logits.astype(np.float64)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    safe = targets.astype(np.int64) if mask is None else \
        np.where(np.asarray(mask).astype(bool), targets, 0).astype(np.int64)
    nll = -np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    correct = (logits.argmax(axis=-1) == safe).astype(np.float64)
    w = _weights(safe.shape, mask)
    n = float(w.sum())
    return {"accuracy": (float((correct * w).sum()), n), "loss": (float((nll * w).sum()), n)}


def regression(pred, target, mask=None):
    """The training loss ("loss": the mean over positions of 1/2 ||pred - target||^2, the
    seed's MSE) and the mean squared error per output value ("mse") of pred [..., K] against
    target [..., K], over the positions of ``mask`` [...] (None: all)."""
    err = (pred.astype(np.float64) - target) ** 2  # [..., K]
    w = _weights(err.shape[:-1], mask)
    per_position = err.sum(axis=-1) * w
    n = float(w.sum())
    return {"loss": (0.5 * float(per_position.sum()), n),
            "mse": (float(per_position.sum()), n * err.shape[-1])}
