"""The user's sequences, as a network takes them: checked, padded, staged on its device, cut
into time-major batches.

The user's layout is sample-major, one row per sequence, as Keras and scikit-learn hold data:

* ``x`` [N, T, I] float features, or [N, T] int tokens (a token model);
* ``lengths`` [N]: the valid steps of each sequence (None: all T);
* ``y`` per step, [N, T, K] float or [N, T] int class labels (head "all"), or per sequence,
  [N, K] / [N] float or [N] int class labels (head "last").

Any array library is taken (``engine.arrays.adopt``): NumPy, CuPy, and DLPack arrays such as
torch tensors and JAX arrays.  A list or tuple of sequences of different lengths (``[T_i, I]``
or ``[T_i]`` each) is padded with zeros to the longest and ``lengths`` made from it; a list of
per-step targets (one array of each sequence's length) is padded alike.  Values at padded
positions are never used: non-finite ones are replaced by zeros, out-of-range labels ignored.

The networks run time-major: ``SequenceData.batch(rows)`` gives a ``Batch`` of
``x`` [T_b, B, ...], its target and mask on the network's device, ``T_b`` the longest length
among the rows.  The data goes to the device once, when it takes at most a quarter of the
device's free memory (``STAGE_FRACTION``), else batch by batch.
"""
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..engine.arrays import DLPACK_CUDA, adopt, array_module, dlpack_device_type, host_view, \
    to_numpy
from ..engine.memory import free_bytes
from .losses import LOSSES
from .validation import integer_lengths

#: The largest fraction of the device's free memory the data of a call is staged into at once.
STAGE_FRACTION = 0.25
HEADS = ("all", "last")


@dataclass
class Batch:
    """x [T, B, I] float (or [T, B] int tokens); target [B, K] float, [B] or [T, B] int;
    lengths [B] int or None (all T); mask of the target's positions or None (all count)."""

    x: Any
    target: Any
    lengths: Optional[Any] = None
    mask: Optional[Any] = None


def _is_sequence_list(a):
    return isinstance(a, (list, tuple))


def _pad(items, what, lengths=None):
    """Sequences [T_i, ...] -> (zero-padded array [N, max T_i, ...], lengths [N] int64).
    ``lengths`` given: each item must have that many steps."""
    arrays = [np.asarray(host_view(a, what)) for a in items]
    if not arrays:
        raise ValueError(f"{what} is an empty list: give at least one sequence")
    for i, a in enumerate(arrays):
        if a.ndim < 1 or a.shape[1:] != arrays[0].shape[1:] or a.dtype.kind not in "biuf":
            raise ValueError(f"{what} as a list must hold sequences [T_i] or [T_i, F] of numbers "
                             f"with the same F; item {i} has shape {a.shape}, dtype {a.dtype} "
                             f"(item 0: shape {arrays[0].shape})")
        if lengths is not None and a.shape[0] != lengths[i]:
            raise ValueError(f"{what}[{i}] has {a.shape[0]} steps, its sequence x[{i}] has "
                             f"{lengths[i]}")
    made = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    T = int(made.max())
    if T < 1:
        raise ValueError(f"every sequence of {what} is empty: give at least one step")
    out = np.zeros((len(arrays), T) + arrays[0].shape[1:], np.result_type(*arrays))
    for i, a in enumerate(arrays):
        out[i, :a.shape[0]] = a
    return out, made


def _as_array(a, what, backend):
    """``a`` as an array without a copy where it can be: an array of ``backend`` when its
    memory is on the backend's device (``adopt``; device memory given to a host backend is a
    TypeError), else a host NumPy array, which ``SequenceData`` stages on the device."""
    if backend is not None and (backend.host_arrays or dlpack_device_type(a) in DLPACK_CUDA):
        a = adopt(backend, a, what)
        if backend.is_array(a):
            return a
    return np.asarray(host_view(a, what))


def positive_int(value, name):
    """``value`` as an int, or a ValueError unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class Sequences:
    """The inputs of N sequences, checked: ``x`` [N, T, I] float or [N, T] int tokens (a host
    NumPy array, or the backend's when one is given), ``lengths`` host int64 [N] or None."""

    def __init__(self, x, lengths=None, what="x", backend=None):
        self.what = what
        if _is_sequence_list(x):
            if lengths is not None:
                raise ValueError(f"{what} is a list of sequences, whose lengths are its own: "
                                 f"give no lengths with it")
            x, lengths = _pad(x, what)
            self.ragged = True
        else:
            self.ragged = False
        x = _as_array(x, what, backend)
        if x.dtype.kind not in "iuf":
            raise TypeError(f"{what} must hold float features [N, T, I] or int tokens [N, T], "
                            f"got dtype {x.dtype}")
        rank = 2 if x.dtype.kind in "iu" else 3
        if x.ndim != rank:
            kind = "int tokens [N, T]" if rank == 2 else "float features [N, T, I]"
            raise ValueError(f"{what} of {x.dtype} must be {kind}, got shape {tuple(x.shape)}"
                             + (" (one feature per step: add an axis, x[..., None])"
                                if rank == 3 and x.ndim == 2 else ""))
        if x.shape[0] < 1 or x.shape[1] < 1 or (rank == 3 and x.shape[2] < 1):
            raise ValueError(f"{what} must hold at least one sequence of one step, got shape "
                             f"{tuple(x.shape)}")
        self.x = x
        if lengths is not None:
            lengths = integer_lengths(lengths, x.shape[0], x.shape[1],
                                      "lengths" if what == "x" else f"lengths of {what}")
        self.lengths = lengths

    @property
    def N(self):
        return int(self.x.shape[0])

    @property
    def T(self):
        return int(self.x.shape[1])

    @property
    def tokens(self):
        return self.x.dtype.kind in "iu"

    def valid(self):
        """Host bool [N, T]: the positions within each sequence's length, or None (all)."""
        if self.lengths is None:
            return None
        return np.arange(self.T)[None, :] < self.lengths[:, None]

    def describe(self):
        steps = f"{self.T} steps" if self.lengths is None else \
            f"up to {self.T} steps (lengths {self.lengths.min()}..{self.lengths.max()})"
        if self.tokens:
            what = f"int tokens {int(self.x.min())}..{int(self.x.max())}"
        else:
            what = f"{self.x.shape[2]} float feature{'s' if self.x.shape[2] != 1 else ''}"
        return f"{self.N} sequences of {steps}, {what}"


@dataclass
class Targets:
    """Targets of N sequences: ``y`` [N, T, K] / [N, K] float (loss "mse") or [N, T] / [N]
    int64 class labels (loss "cross_entropy"), with the ``head`` they need and ``size``: K, or
    the number of classes seen (largest label + 1)."""

    y: Any
    loss: str
    head: str
    size: int

    def describe(self):
        where = "per step" if self.head == "all" else "per sequence"
        if self.loss == "cross_entropy":
            what = f"class labels {where} ({self.size} classes seen): classification"
        else:
            what = f"{self.size} value{'s' if self.size != 1 else ''} {where}: regression"
        return f"{what}, loss {self.loss!r}, head {self.head!r}"


def _first_position(bad):
    """'sequence i, step t' (or 'sequence i') of the first True of a host bool array."""
    where = np.argwhere(bad)[0]
    return f"sequence {where[0]}" + (f", step {where[1]}" if len(where) > 1 else "")


def _finite(a, valid, what, per_step=True):
    """``a`` with non-finite values at padded positions replaced by zeros; ValueError naming
    the first non-finite value at a valid position.  ``a``: [N, T, ...] (``per_step``) or
    [N, ...]; ``valid``: host bool [N, T] or None (every position)."""
    xp = array_module(a)
    bad = ~xp.isfinite(a)
    if not bool(bad.any()):
        return a
    axes = 2 if per_step else 1  # the leading axes that name a position
    per_position = bad.reshape(bad.shape[:axes] + (-1,)).any(axis=axes)
    counted = per_position if valid is None else per_position & xp.asarray(valid)
    if bool(counted.any()):
        host = to_numpy(counted)
        raise ValueError(f"{what} holds {int(host.sum())} NaN or Inf value(s) (first at "
                         f"{_first_position(host)}): clean the data first")
    return xp.where(bad, xp.zeros((), a.dtype), a)


def _head_error(y, head, found, head_from):
    """The ValueError of a y whose shape asks for head ``found`` where ``head`` is set."""
    wanted = {"all": "an output at every step", "last": "one output per sequence"}
    held = "per step" if found == "all" else "per sequence"
    return ValueError(f"y of shape {tuple(y.shape)} holds targets {held}, but {head_from} "
                      f"head={head!r} ({wanted[head]}); this y needs head={found!r}")


def targets(y, seqs, loss=None, head=None, head_from="the model has"):
    """Read ``y`` (any array library, or a list, padded like ``seqs`` when it holds per-step
    targets) as ``Targets`` of the sequences ``seqs``, host-side.

    ``loss`` None: "cross_entropy" for integer or bool y, "mse" for float y.  ``head`` (the
    model's, or the user's wish; None: inferred): y [N, T, K] is per step, [N, K] and [N] per
    sequence; float [N, T] is per step (K = 1) only when ``head`` is "all".  A ``head`` that
    contradicts y is a ValueError whose text starts from ``head_from``."""
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if _is_sequence_list(y) and y and all(np.ndim(host_view(v, "y")) >= 1 for v in y) \
            and seqs.lengths is not None and seqs.ragged:
        y, _ = _pad(y, "y", seqs.lengths)
    y = np.asarray(host_view(y, "y"))
    N, T = seqs.N, seqs.T
    if y.dtype.kind not in "biuf":
        raise TypeError(f"y must hold numbers (float targets or int class labels), got dtype "
                        f"{y.dtype}")
    if y.ndim < 1 or y.shape[0] != N:
        raise ValueError(f"y must have one entry per sequence: x has {N} sequences, y has shape "
                         f"{tuple(y.shape)}")
    loss = loss or ("cross_entropy" if y.dtype.kind in "biu" else "mse")
    valid = seqs.valid()
    if loss == "cross_entropy":
        if y.ndim == 1:
            found = "last"
        elif y.ndim == 2 and y.shape[1] == T:
            found = "all"
        else:
            raise ValueError(f"class labels y must be [N] (one per sequence) or [N, T={T}] (one "
                             f"per step), got shape {tuple(y.shape)}")
        if head is not None and head != found:
            raise _head_error(y, head, found, head_from)
        counted = np.ones(y.shape, bool) if found == "last" or valid is None else valid
        if y.dtype.kind == "f":
            y = _finite(y, valid if found == "all" else None, "y", found == "all")
            if not np.all(y[counted] == np.round(y[counted])):
                raise TypeError("loss 'cross_entropy' needs integer class labels, y holds "
                                "non-integer values; for regression targets give loss='mse'")
        y = np.where(counted, y, 0).astype(np.int64)
        if y.size and y.min() < 0:
            raise ValueError(f"class labels must be >= 0, got {y.min()} (at "
                             f"{_first_position(y < 0)})")
        return Targets(y, loss, found, int(y.max()) + 1)
    y = y.astype(np.float64) if y.dtype.kind != "f" else y
    if y.ndim == 2 and head == "all" and y.shape[1] == T:
        y = y[:, :, None]
    if y.ndim == 3 and y.shape[1] == T:
        found = "all"
    elif y.ndim in (1, 2):
        found = "last"
        y = y[:, None] if y.ndim == 1 else y
    else:
        raise ValueError(f"regression targets y must be [N, T={T}, K] (per step) or [N, K] / "
                         f"[N] (per sequence), got shape {tuple(y.shape)}")
    if head is not None and head != found:
        raise _head_error(y, head, found, head_from)
    y = _finite(y, valid if found == "all" else None, "y", found == "all")
    return Targets(y, loss, found, int(y.shape[-1]))


class SequenceData:
    """The sequences of one call of a network (``predict``, ``fit``, ``evaluate``), checked
    against it and staged on its device (see the module docstring).

    ``x``, ``lengths`` as above; ``y`` and ``loss`` for training and evaluation (None for
    predict).  ``targets`` holds the ``Targets`` (None without y)."""

    def __init__(self, network, x, lengths=None, y=None, loss=None, what="x"):
        self.network = network
        backend, dtype = network.backend, network.dtype
        seqs = Sequences(x, lengths, what, backend)
        self.seqs = seqs
        if network.embedding is not None:
            V = network.embedding.params["weight"].shape[0]
            if not seqs.tokens:
                raise TypeError(f"this model takes int tokens [N, T] (vocab_size {V}), got "
                                f"{what} of {seqs.x.dtype} with shape {tuple(seqs.x.shape)}")
            lo, hi = int(seqs.x.min()), int(seqs.x.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"tokens of {what} must lie in [0, {V}) (the model's "
                                 f"vocab_size), got min {lo} max {hi}")
        else:
            I = network.rnn.input_size
            if seqs.tokens:
                raise TypeError(f"this model takes float features [N, T, {I}], got {what} of "
                                f"{seqs.x.dtype} with shape {tuple(seqs.x.shape)}")
            if seqs.x.shape[2] != I:
                raise ValueError(f"this model takes {I} features per step (input_size), got "
                                 f"{what} of shape {tuple(seqs.x.shape)}")
            seqs.x = _finite(seqs.x, seqs.valid(), what)
        if network.head_mode == "last" and seqs.lengths is not None and seqs.lengths.min() < 1:
            raise ValueError(f"head='last' reads each sequence's last step: every length must "
                             f"be >= 1, got a zero length (sequence "
                             f"{int(np.argmin(seqs.lengths))})")
        self.targets = None
        if y is not None:
            self.targets = targets(y, seqs, loss, network.head_mode)
            K = network.head.params["weight"].shape[0]
            if self.targets.loss == "cross_entropy" and self.targets.size > K:
                raise ValueError(f"y holds class {self.targets.size - 1}, but the model has "
                                 f"output_size={K} (classes 0..{K - 1})")
            if self.targets.loss == "mse" and self.targets.size != K:
                raise ValueError(f"y has {self.targets.size} target(s) per position, but the "
                                 f"model has output_size={K}")
        x_type = np.int64 if seqs.tokens else dtype
        # Targets keep their own precision: the loss casts a batch's to the network's dtype,
        # the metrics score against them as given.
        y_type = None if y is None else self.targets.y.dtype
        need = seqs.N * seqs.T * (seqs.x.shape[2] if seqs.x.ndim == 3 else 1) * \
            np.dtype(x_type).itemsize
        if y is not None:
            need += self.targets.y.size * np.dtype(y_type).itemsize
        free = free_bytes(backend)
        self.staged = free is None or need <= STAGE_FRACTION * free
        self._x_type, self._y_type = x_type, y_type
        self.x = self._stage(seqs.x, x_type)  # [N, T, I] or [N, T]
        self.y = None if y is None else self._stage(self.targets.y, y_type)
        self.lengths = seqs.lengths

    def _stage(self, a, dtype):
        if not self.staged:
            return a
        return self.network.backend.asarray(a).astype(dtype, copy=False)

    def _device(self, a, dtype):
        """A batch's rows of an array that may still be on the host, on the device."""
        return self.network.backend.asarray(a).astype(dtype, copy=False)

    @property
    def N(self):
        return self.seqs.N

    def _rows(self, a, rows):
        if isinstance(rows, slice) or array_module(a) is np:
            return a[rows]
        return a[self.network.backend.asarray(rows)]

    def batch(self, rows):
        """The Batch of sequences ``rows`` (a slice or host int array), time-major, on the
        device: x [T_b, B, ...], target [T_b, B, ...] (per step) or [B, ...], the mask of the
        valid steps (per step, with lengths) and host lengths; T_b the longest of them."""
        backend, xp = self.network.backend, self.network.backend.xp
        lengths = None if self.lengths is None else self.lengths[rows]
        T = self.seqs.T if lengths is None else max(1, int(lengths.max()))
        x = self._device(self._rows(self.x, rows)[:, :T], self._x_type)  # [B, T, ...]
        x = xp.ascontiguousarray(xp.swapaxes(x, 0, 1))  # [T, B, ...]
        per_step = self.network.head_mode == "all"
        mask = None
        if per_step and lengths is not None:
            mask = backend.asarray(np.arange(T)[:, None] < lengths[None, :])  # [T, B]
        target = None
        if self.y is not None:
            target = self._device(self._rows(self.y, rows), self._y_type)
            if per_step:
                target = xp.ascontiguousarray(xp.swapaxes(target[:, :T], 0, 1))  # [T, B, ...]
        return Batch(x, target, lengths, mask)

    def batches(self, batch_size):
        """The Batches of every sequence in order, ``batch_size`` at a time:
        (rows, Batch)."""
        for start in range(0, self.N, batch_size):
            rows = slice(start, min(start + batch_size, self.N))
            yield rows, self.batch(rows)
