"""What a training run draws from: a ``Task`` gives the model's shape, the loss, the training
batches, the evaluation set and its metrics.  The embedded tasks (``tasks.py``) and the user's
arrays (``data.ArrayTask``) are tasks, so ``loop.fit`` trains on either the same way."""
import numpy as np


class Task:
    """A task: its model shape, loss, batches, evaluation set and metrics.

    ``model_kwargs()`` gives ``input_size`` or ``vocab_size``, ``output_size`` and ``head``
    (``"last"``: one output per sequence; ``"all"``: one per step).  ``loss`` names a loss of
    ``gpurnn.nn.losses.LOSSES``.  ``metric`` is the headline test metric, ``higher_is_better`` its
    direction, ``baseline`` what a trivial model scores on it (the mean, chance, or the
    unigram frequencies of the text).
    """

    name = None
    loss = None
    head = None
    metric = None
    higher_is_better = False

    def __init__(self, seq_len):
        if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len of task {self.name!r} must be a positive int, got "
                             f"{seq_len!r}")
        self.seq_len = int(seq_len)

    def model_kwargs(self):
        raise NotImplementedError

    def batch(self, rng, batch_size):
        """A training batch drawn with ``rng`` (a ``numpy.random.Generator``)."""
        raise NotImplementedError

    def batches(self, rng, batch_size, start_step=0):
        """The training batches of the steps after ``start_step``, in order, drawn with ``rng``:
        by default a fresh ``batch(rng, batch_size)`` per step, so ``rng``'s state alone says
        where the stream stands."""
        while True:
            yield self.batch(rng, batch_size)

    def test_batches(self):
        """The fixed test (evaluation) set: an iterable of Batch."""
        raise NotImplementedError

    def score(self, y, batch):
        """{metric: (sum, count)} of one test batch; y the model's output as a NumPy array."""
        raise NotImplementedError

    @property
    def baseline(self):
        raise NotImplementedError

    def describe(self):
        return f"{self.name} (seq_len {self.seq_len})"
