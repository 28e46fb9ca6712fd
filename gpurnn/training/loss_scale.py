"""Dynamic loss scaling, for training float16 layers.

A float16 layer stores its pre-activation gradients in float16 (docs/precision.md), whose
smallest normal number is 2^-14 (6.1e-5) and smallest subnormal 2^-24 (6.0e-8): the small
gradients of a long sequence would round to zero there.  So the gradient of the loss is
multiplied by ``scale`` before the backward, and every parameter gradient (float32) divided by
it after.  A scale too large overflows float16 (above 65504) into Inf: that step's update is
skipped (never applied to the weights), counted, and the scale halved; after
``growth_interval`` steps in a row without overflow it is doubled.  The constants are
``torch.amp.GradScaler``'s.  bfloat16 has float32's exponent range and needs none.
"""
import math

from ..nn.optim import global_norm


class LossScaler:
    """``scale``: the current factor; ``skipped``: how many updates an overflow skipped."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1
                and growth_interval >= 1):
            raise ValueError(f"loss scaling needs init_scale > 0, growth_factor > 1, "
                             f"0 < backoff_factor < 1, growth_interval >= 1; got {init_scale}, "
                             f"{growth_factor}, {backoff_factor}, {growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.skipped = 0
        self._good_steps = 0

    def unscale(self, grads):
        """Divide every gradient by ``scale`` in place and update the scale.  Returns the
        global gradient norm (0-d device array) when every gradient is finite; None when the
        scaled backward overflowed, and the update must be skipped."""
        inverse = 1.0 / self.scale
        for g in grads.values():
            g *= g.dtype.type(inverse)
        norm = global_norm(grads)
        if not math.isfinite(float(norm)):
            self.scale *= self.backoff_factor
            self._good_steps = 0
            self.skipped += 1
            return None
        self._good_steps += 1
        if self._good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self._good_steps = 0
        return norm

    def state_dict(self):
        return {"scale": self.scale, "skipped": self.skipped, "good_steps": self._good_steps}

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.skipped = int(state["skipped"])
        self._good_steps = int(state["good_steps"])


def scaler_for(model):
    """A ``LossScaler`` for a model of float16, else None."""
    return LossScaler() if model.dtype.name == "float16" else None
