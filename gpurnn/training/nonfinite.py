"""Non-finite values (NaN, Inf) in training: caught at the step they appear, before the update.

The check costs one fused reduction per step on the device: the global gradient norm, which
norm clipping needs anyway (``train_step`` hands it on to the clipping), is non-finite when
any gradient entry is, and one scalar comes back to the host.  The loss is already a host float.
Only when the check fails are the tensors examined one by one to name them in the report.

Policies (``fit(on_nonfinite=...)``, ``gpurnn train --on-nonfinite``): ``"raise"`` raises
``NonFiniteError``; ``"stop"`` ends the run at the last good weights; ``"skip"`` drops the
batch and goes on.  In every case the step's update is not applied, and checkpoints refuse
non-finite arrays (``require_finite``).
"""
import logging
import math

import numpy as np

from ..engine.arrays import array_module
from ..nn.optim import global_norm

POLICIES = ("stop", "skip", "raise")
_log = logging.getLogger("gpurnn")


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN or Inf in a loss, a gradient or an array about to be saved."""


def _count(array):
    """(NaN count, Inf count) of a device or host array, as ints."""
    xp = array_module(array)
    return int(xp.isnan(array).sum()), int(xp.isinf(array).sum())


def _describe(arrays):
    """'name (n NaN, m Inf), ...' over the arrays holding non-finite entries; '' if none."""
    parts = []
    for name, a in arrays.items():
        nan, inf = _count(a)
        if nan or inf:
            parts.append(f"{name} ({nan} NaN, {inf} Inf)")
    return ", ".join(parts)


def require_finite(arrays, what):
    """Raise NonFiniteError naming every array of ``arrays`` (name -> host array) with a NaN or
    Inf entry; ``what`` says what they are for (e.g. the checkpoint's path)."""
    bad = _describe({k: a for k, a in arrays.items() if np.asarray(a).dtype.kind in "fc"})
    if bad:
        raise NonFiniteError(f"refusing to save non-finite values to {what}: {bad}")


class NonFiniteGuard:
    """Checks a training step of ``model`` before its update and applies ``policy``.

    ``check(loss, where, norm=None)``, called after the backward: the global gradient norm
    (0-d device array; ``norm`` when the caller has it already) when the loss and every
    gradient are finite, else None with the finding in ``report`` (``failed`` is then True);
    ``where`` locates the step within a batch, e.g. a tbptt chunk.  ``resolve(step, record)`` applies the policy to a step whose check failed.
    The guard's state changes in these two methods only.
    """

    def __init__(self, model, policy="raise"):
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {policy!r}")
        self.model, self.policy = model, policy
        self.report = None
        self.skipped = []  # steps whose update was not applied

    @property
    def failed(self):
        """Whether the last check found a NaN or Inf that ``resolve`` has not handled yet."""
        return self.report is not None

    def check(self, loss, where="", norm=None):
        norm = global_norm(self.model.grads) if norm is None else norm
        norm_host = float(norm)  # the one scalar brought to the host per step
        if math.isfinite(loss) and math.isfinite(norm_host):
            self.report = None
            return norm
        grads = _describe(self.model.grads)
        if not grads:  # every entry finite, their sum of squares is not
            grads = (f"all finite, but their global norm overflows {self.model.dtype.name} "
                     f"({norm_host})")
        report = f"loss {loss}; gradients: {grads}"
        weights = _describe(self.model.params)
        if weights:
            report += (f"; the weights themselves are non-finite ({weights}): an earlier update "
                       f"overflowed")
        self.report = report + (f" [{where}]" if where else "")
        return None

    def resolve(self, step, record):
        """For a step whose check failed: put the report in ``record`` (``nonfinite``,
        ``skipped``; ``halted`` under "stop"), log it, and raise under "raise".  Returns True
        when training must stop.  A step whose check passed returns False, untouched."""
        if self.report is None:
            return False
        message = (f"non-finite values at step {step}: {self.report}; the update was not "
                   f"applied (on_nonfinite={self.policy!r})")
        self.report = None
        self.skipped.append(step)
        if self.policy == "raise":
            raise NonFiniteError(message + "; try a smaller learning rate or gradient clipping, "
                                 "and check the data")
        _log.warning("%s", message)
        record.update(nonfinite=message, skipped=True)
        if self.policy == "stop":
            record["halted"] = True
            return True
        return False
