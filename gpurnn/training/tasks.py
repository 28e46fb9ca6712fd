"""Tasks embedded in the package (nothing is downloaded).

* ``adding``: the adding problem (Hochreiter & Schmidhuber, 1997): two channels, random values
  in [0, 1) and a marker that is 1 at one step of the first half and one of the second; predict
  the sum of the two marked values at the last step.  Predicting the mean (1) scores MSE 1/6.
* ``copy``: the copy/memory task: read ``S`` symbols (of 8; 5 unless given, fewer when the
  sequence is short), wait through blanks, and after the delimiter write the ``S`` symbols back.  Scored on the ``S`` recall steps only; a model that
  remembers nothing scores ln 8 nats and 1/8 accuracy there.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images) read row by row, 8
  steps of 8 pixels: a sequence classifier.  A fixed 80/20 split (seeded, 360 test images).
* ``charlm``: a character-level language model on the Python standard library's own ``*.py``
  files (top level of ``sysconfig``'s stdlib directory); every 10th file, sorted by name, is
  held out for the test.  Reported in bits per character, beside the held-out text's
  unigram cross-entropy under the training text's character frequencies.

Each task (``task.Task``) gives batches of host NumPy arrays (``Batch``), a fixed test set, and
its metrics.  The test sets do not depend on the run's seed: runs with different seeds score on
the same data.
"""
import glob
import math
import os
import sysconfig

import numpy as np

from ..nn.data import Batch
from . import metrics
from .model import Model
from .task import Task

TEST_SEED = 20240601  # the fixed seed of the synthetic test sets

#: Per task, the defaults of a run: sequence length, hidden size, sequences per batch,
#: training steps and learning rate.  ``make_task(name)`` takes the sequence length from here,
#: ``gpurnn train`` and ``gpurnn gradflow`` every option not given.
TASK_DEFAULTS = {
    "adding": {"seq_len": 30, "hidden": 32, "batch": 32, "steps": 1000, "lr": 1e-2},
    "copy": {"seq_len": 20, "hidden": 64, "batch": 32, "steps": 1500, "lr": 3e-3},
    "digits": {"seq_len": 8, "hidden": 64, "batch": 32, "steps": 1000, "lr": 1e-2},
    "charlm": {"seq_len": 100, "hidden": 128, "batch": 32, "steps": 1000, "lr": 3e-3},
}


class Adding(Task):
    name = "adding"
    loss = "mse"
    head = "last"
    metric = "mse"

    def __init__(self, seq_len, test_size=1000):
        super().__init__(seq_len)
        if self.seq_len < 2:
            raise ValueError(f"the adding problem needs seq_len >= 2, got {seq_len}")
        self.test_size = test_size

    def model_kwargs(self):
        return {"input_size": 2, "output_size": 1, "head": self.head}

    def batch(self, rng, batch_size):
        T, B = self.seq_len, batch_size
        values = rng.random((T, B))
        half = T // 2
        first = rng.integers(0, half, size=B)
        second = rng.integers(half, T, size=B)
        marks = np.zeros((T, B))
        cols = np.arange(B)
        marks[first, cols] = 1.0
        marks[second, cols] = 1.0
        x = np.stack([values, marks], axis=2)  # [T, B, 2]
        target = (values[first, cols] + values[second, cols])[:, None]  # [B, 1]
        return Batch(x, target)

    def test_batches(self):
        return [self.batch(np.random.default_rng(TEST_SEED), self.test_size)]

    def score(self, y, batch):
        return metrics.regression(y, batch.target)

    @property
    def baseline(self):
        return {"mse": 1.0 / 6.0}  # Var(U + U') of always predicting the mean, 1


class Copy(Task):
    name = "copy"
    loss = "cross_entropy"
    head = "all"
    metric = "accuracy"
    higher_is_better = True
    symbols = 8

    def __init__(self, seq_len, length=None, test_size=500):
        super().__init__(seq_len)
        if self.seq_len < 3:
            raise ValueError(f"the copy task needs seq_len >= 3 (symbols, delimiter, recall), "
                             f"got {seq_len}")
        # Symbols to remember; the delay is what is left of seq_len.  Five by default: with ten,
        # an LSTM (H=64) stayed at chance for 2000 steps at length 30; with five it reached 98%
        # recall in 1500 steps at length 20.
        most = (self.seq_len - 1) // 2
        self.length = max(1, min(5, most)) if length is None else int(length)
        if not 1 <= self.length <= most:
            raise ValueError(f"the copy task at seq_len {self.seq_len} can recall 1 to {most} "
                             f"symbols, got length {length}")
        self.test_size = test_size

    def model_kwargs(self):
        # tokens: 0 blank, 1..8 symbols, 9 delimiter; outputs: the 8 symbols
        return {"vocab_size": self.symbols + 2, "output_size": self.symbols, "head": self.head}

    def batch(self, rng, batch_size):
        T, S, B = self.seq_len, self.length, batch_size
        data = rng.integers(0, self.symbols, size=(S, B))  # [S, B] symbol classes
        x = np.zeros((T, B), dtype=np.int64)  # [T, B] tokens
        x[:S] = data + 1
        x[T - S - 1] = self.symbols + 1
        target = np.zeros((T, B), dtype=np.int64)
        target[T - S:] = data
        mask = np.zeros((T, B), dtype=bool)
        mask[T - S:] = True
        return Batch(x, target, mask=mask)

    def test_batches(self):
        return [self.batch(np.random.default_rng(TEST_SEED), self.test_size)]

    def score(self, y, batch):
        return metrics.classification(y, batch.target, batch.mask)

    @property
    def baseline(self):
        return {"accuracy": 1.0 / self.symbols, "loss": math.log(self.symbols)}

    def describe(self):
        return f"copy ({self.length} symbols of {self.symbols}, seq_len {self.seq_len})"


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("the digits task needs scikit-learn: pip install gpurnn[tasks]") from exc
    data = load_digits()
    return data.images / 16.0, data.target  # [N, 8, 8] in [0, 1], [N]


class Digits(Task):
    name = "digits"
    loss = "cross_entropy"
    head = "last"
    metric = "accuracy"
    higher_is_better = True
    test_size = 360

    def __init__(self, seq_len):
        super().__init__(seq_len)
        if self.seq_len != 8:
            raise ValueError(f"the digits task reads 8x8 images row by row: seq_len must be 8, "
                             f"got {seq_len}")
        images, labels = _load_digits()
        order = np.random.default_rng(0).permutation(len(labels))
        train, test = order[: -self.test_size], order[-self.test_size:]
        self.x_train = images[train].transpose(1, 0, 2)  # [8, N_train, 8]
        self.y_train = labels[train]
        self.x_test = images[test].transpose(1, 0, 2)  # [8, 360, 8]
        self.y_test = labels[test]

    def model_kwargs(self):
        return {"input_size": 8, "output_size": 10, "head": self.head}

    def batch(self, rng, batch_size):
        idx = rng.integers(0, self.y_train.shape[0], size=batch_size)
        return Batch(self.x_train[:, idx], self.y_train[idx])

    def test_batches(self):
        return [Batch(self.x_test, self.y_test)]

    def score(self, y, batch):
        return metrics.classification(y, batch.target)

    @property
    def baseline(self):
        return {"accuracy": 0.1, "loss": math.log(10)}


def stdlib_files():
    """The corpus of ``charlm``: (train files, held-out files), sorted paths."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if len(files) < 10:
        raise RuntimeError(f"the charlm task reads the standard library's *.py files, found "
                           f"{len(files)} in {root}")
    held_out = files[::10]
    return [f for f in files if f not in held_out], held_out


def _read(files):
    parts = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            parts.append(f.read())
    return "\n".join(parts)


class CharLM(Task):
    name = "charlm"
    loss = "cross_entropy"
    head = "all"
    metric = "bits_per_char"
    min_count = 10  # rarer characters of the training text become one "unknown" symbol

    def __init__(self, seq_len, test_windows=256):
        super().__init__(seq_len)
        train_files, test_files = stdlib_files()
        train_text, test_text = _read(train_files), _read(test_files)
        chars, counts = np.unique(_codepoints(train_text), return_counts=True)
        keep = chars[counts >= self.min_count]
        self.chars = keep  # [V-1] code points; token 0 is "unknown"
        self.train = self.encode(train_text)  # [N_train] tokens
        self.test = self.encode(test_text)  # [N_test] tokens
        self.files = (len(train_files), len(test_files))
        n = min(test_windows, (self.test.shape[0] - 1) // self.seq_len)
        if n < 1:
            raise ValueError(f"seq_len {seq_len} is longer than the held-out text")
        self.test_windows = n

    @property
    def vocab_size(self):
        return int(self.chars.shape[0]) + 1

    def encode(self, text):
        """Text -> int64 tokens (0 for characters outside the vocabulary)."""
        cp = _codepoints(text)
        pos = np.searchsorted(self.chars, cp)
        pos = np.minimum(pos, self.chars.shape[0] - 1)
        return np.where(self.chars[pos] == cp, pos + 1, 0).astype(np.int64)

    def decode(self, tokens):
        return "".join(chr(self.chars[t - 1]) if t > 0 else "\ufffd" for t in tokens)

    def model_kwargs(self):
        return {"vocab_size": self.vocab_size, "output_size": self.vocab_size, "head": self.head}

    def _windows(self, text, starts):
        idx = starts[None, :] + np.arange(self.seq_len + 1)[:, None]  # [T+1, B]
        tokens = text[idx]
        return Batch(tokens[:-1], tokens[1:])

    def batch(self, rng, batch_size):
        starts = rng.integers(0, self.train.shape[0] - self.seq_len - 1, size=batch_size)
        return self._windows(self.train, starts)

    def test_batches(self, batch_size=64):
        starts = np.arange(self.test_windows) * self.seq_len  # consecutive, non-overlapping
        return [self._windows(self.test, starts[i:i + batch_size])
                for i in range(0, starts.shape[0], batch_size)]

    def score(self, y, batch):
        s = metrics.classification(y, batch.target)
        nats, n = s["loss"]
        return {"bits_per_char": (nats / math.log(2), n), "accuracy": s["accuracy"]}

    @property
    def baseline(self):
        """Unigram cross-entropy, in bits per character, of the scored held-out characters under
        the training text's character frequencies (add-one smoothed)."""
        counts = np.bincount(self.train, minlength=self.vocab_size) + 1.0
        logp = np.log2(counts / counts.sum())
        scored = self.test[1: self.test_windows * self.seq_len + 1]
        return {"bits_per_char": float(-logp[scored].mean())}

    def describe(self):
        return (f"charlm (stdlib *.py: {self.files[0]} train files, {self.files[1]} held out; "
                f"{self.vocab_size} symbols, seq_len {self.seq_len})")


def _codepoints(text):
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


TASKS = {"adding": Adding, "copy": Copy, "digits": Digits, "charlm": CharLM}


def make_task(name, seq_len=None):
    """The task ``name`` at ``seq_len`` steps (None: its ``TASK_DEFAULTS`` length)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](TASK_DEFAULTS[name]["seq_len"] if seq_len is None else seq_len)


def model_for_task(task, cell="lstm", hidden_size=64, **kwargs):
    """A ``Model`` (``gpurnn.Model``) shaped for ``task`` (inputs, outputs, head)."""
    return Model(cell=cell, hidden_size=hidden_size, **task.model_kwargs(), **kwargs)
