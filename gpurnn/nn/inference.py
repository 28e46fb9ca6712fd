"""Inference: the switch that turns off what forwards keep for a backward, and streaming a
sequence through a layer chunk by chunk."""
import contextlib
import threading

_grad_state = threading.local()


def is_grad_enabled():
    """Whether forwards of layers in training mode keep activations for a backward (per thread)."""
    return getattr(_grad_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within this block, forwards keep no activations for a backward (inference mode)."""
    previous = is_grad_enabled()
    _grad_state.enabled = False
    try:
        yield
    finally:
        _grad_state.enabled = previous


def stream(layer, chunks, state=None):
    """Inference of ``layer`` over an iterable of chunks of one long sequence: yields
    ``(out_i, state_i)``, each chunk starting from the state the previous one ended in.
    A bidirectional layer is refused at once: its reverse direction starts from the end of the
    whole sequence, which no chunk but the last holds, so chunk by chunk its outputs would not
    be those of one call."""
    if layer.bidirectional:
        raise ValueError(f"stream() needs a unidirectional layer: the reverse direction of "
                         f"{layer!r} reads the sequence from its end, so chunk by chunk its "
                         f"outputs would differ from one call; run one call over the whole "
                         f"sequence instead")
    return _stream(layer, chunks, state)


def _stream(layer, chunks, state):
    for chunk in chunks:
        # Only around the call: a generator suspended inside no_grad() would switch
        # gradients off for whatever its caller runs between chunks.
        with no_grad():
            out, state = layer.forward(chunk, state)
        yield out, state
