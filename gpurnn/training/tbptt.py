"""Truncated BPTT: training over sequences longer than one training forward can hold.

``train_batch(..., tbptt=k)`` cuts a batch along time into chunks of ``k`` steps (the last
may be shorter) and trains on them in order, each chunk starting from the state the previous
one ended in.  That state is carried as a plain array: the backward of a chunk stops at its
first step (the gradient of its initial state is dropped), so no gradient crosses a chunk
boundary and the activations held are those of ``k`` steps, whatever the total length.

The choice made here (Williams & Peng's TBPTT(k, k), as in PyTorch's word language model):
one optimiser step per chunk that has a loss, right after that chunk's backward, so later
chunks run with the updated weights.  A chunk with no loss in it (a ``head="last"`` model
before its last chunk, or a chunk whose mask counts no position) only runs forward to carry
the state.  With ``k >= T`` the batch is one chunk: exactly ``train_step``.
"""
import numpy as np

from ..nn.data import Batch
from ..nn.inference import no_grad
from .step import forward_backward, train_step, update


def chunks(batch, k, head):
    """Split ``batch`` along time into chunks of ``k`` steps: yields (start, chunk Batch,
    has_loss).  ``head`` is the model's head ("all": targets and mask are per step and are
    cut too; "last": the target belongs to the last chunk).  Lengths are cut to each chunk
    (a sequence that ended before a chunk has length 0 in it)."""
    T = batch.x.shape[0]
    lengths = None if batch.lengths is None else np.asarray(batch.lengths)
    if head == "last" and lengths is not None and (lengths < T).any():
        raise ValueError("tbptt with head='last' needs full-length sequences (the output is "
                         "read at the last step); got lengths below T="
                         f"{T}: min {int(lengths.min())}")
    for start in range(0, T, k):
        end = min(start + k, T)
        cut = None if lengths is None else np.clip(lengths - start, 0, end - start)
        if head == "all":
            mask = None if batch.mask is None else batch.mask[start:end]
            chunk = Batch(batch.x[start:end], batch.target[start:end], cut, mask)
            has_loss = mask is None or bool(np.asarray(mask).any())
        else:
            chunk = Batch(batch.x[start:end], batch.target, cut, batch.mask)
            has_loss = end == T
        yield start, chunk, has_loss


def train_batch(model, task, optimizer, batch, tbptt=None, reduction="mean", clip_norm=None,
                clip_value=None, guard=None, data_parallel=None, scaler=None):
    """Train on one batch, in chunks of ``tbptt`` steps when given (None: the whole batch).
    The options are ``step.train_step``'s.

    Returns (loss, grad norm of the last update or None).  The loss is the mean of the
    chunks' losses (their sum with ``reduction="sum"``).  ``guard`` (a
    ``nonfinite.NonFiniteGuard``) checks every chunk before its update; at the first chunk
    that fails, the rest of the batch is dropped (its state may carry the fault).
    """
    T = batch.x.shape[0]
    if tbptt is not None and (isinstance(tbptt, bool) or not isinstance(tbptt, (int, np.integer))
                              or tbptt < 1):
        raise ValueError(f"tbptt must be a positive int (steps per chunk), got {tbptt!r}")
    options = dict(reduction=reduction, clip_norm=clip_norm, clip_value=clip_value,
                   data_parallel=data_parallel, guard=guard, scaler=scaler)
    if tbptt is None or tbptt >= T:
        return train_step(model, task, optimizer, batch, **options)
    n = -(-T // tbptt)
    state, losses, norm = None, [], None
    for i, (start, chunk, has_loss) in enumerate(chunks(batch, tbptt, model.head_mode)):
        if data_parallel is not None:
            # update() all-reduces, so every rank must take the same branch even when only
            # some shards have loss positions in this chunk (the others add weight 0).
            has_loss = data_parallel.any(has_loss)
        if has_loss:
            end = start + chunk.x.shape[0] - 1
            where = f"tbptt chunk {i + 1} of {n}, time steps {start}..{end}"
            loss, state = forward_backward(model, task, chunk, state, reduction, scaler)
            loss, norm = update(model, optimizer, loss, chunk, where=where, **options)
            losses.append(loss)
            if guard is not None and guard.failed:
                break
        else:
            with no_grad():
                _, state = model.forward_with_state(chunk.x, chunk.lengths, state)
    total = float(np.sum(losses)) if reduction == "sum" else float(np.mean(losses))
    return total, norm
