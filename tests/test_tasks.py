"""The embedded tasks: shapes, targets computed right, fixed test sets, baselines."""
import math

import numpy as np
import pytest

from gpurnn.training.tasks import CharLM, Copy, make_task, stdlib_files


def test_adding_targets_are_the_marked_sums(rng):
    task = make_task("adding", 12)
    b = task.batch(rng, 9)
    assert b.x.shape == (12, 9, 2) and b.target.shape == (9, 1)
    marks = b.x[:, :, 1]
    assert np.all(marks.sum(axis=0) == 2)
    assert np.all(marks[:6].sum(axis=0) == 1) and np.all(marks[6:].sum(axis=0) == 1)
    np.testing.assert_allclose(b.target[:, 0], (b.x[:, :, 0] * marks).sum(axis=0))
    # the test set is fixed, whatever the training stream
    t1, t2 = task.test_batches()[0], make_task("adding", 12).test_batches()[0]
    assert np.array_equal(t1.x, t2.x)
    # predicting the mean, 1, scores about the stated baseline
    assert task.score(np.ones_like(t1.target), t1)["mse"][0] / t1.target.size == \
        pytest.approx(task.baseline["mse"], rel=0.1)


def test_copy_layout(rng):
    task = make_task("copy", 15)
    S = task.length
    b = task.batch(rng, 4)
    assert b.x.shape == b.target.shape == b.mask.shape == (15, 4)
    assert np.array_equal(b.target[15 - S:], b.x[:S] - 1)  # recall what was read
    assert np.all(b.x[15 - S - 1] == task.symbols + 1)  # the delimiter
    assert b.mask.sum() == S * 4 and np.all(b.mask[15 - S:])
    assert S == 5 and Copy(7).length == 3 and Copy(30, length=10).length == 10
    with pytest.raises(ValueError, match="can recall 1 to 3 symbols"):
        Copy(7, length=4)


def test_digits_split():
    task = make_task("digits")
    b = task.test_batches()[0]
    assert b.x.shape == (8, 360, 8) and b.target.shape == (360,)
    assert task.x_train.shape[1] + 360 == 1797
    assert 0 <= b.x.min() and b.x.max() <= 1
    with pytest.raises(ValueError, match="seq_len must be 8"):
        make_task("digits", 10)


def test_charlm_corpus_and_baseline(rng):
    train, held_out = stdlib_files()
    assert set(train).isdisjoint(held_out) and len(held_out) >= 1
    task = CharLM(seq_len=20, test_windows=8)
    text = "def f(x):\n    return x"
    assert task.decode(task.encode(text)) == text
    b = task.batch(rng, 3)
    assert b.x.shape == b.target.shape == (20, 3)
    assert np.array_equal(b.x[1:], b.target[:-1])  # targets are the next characters
    assert sum(t.x.shape[1] for t in task.test_batches()) == 8
    assert 2.0 < task.baseline["bits_per_char"] < math.log2(task.vocab_size)


def test_unknown_task_and_bad_lengths():
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("translation")
    with pytest.raises(ValueError, match="seq_len >= 2"):
        make_task("adding", 1)
    with pytest.raises(ValueError, match="positive int"):
        make_task("copy", 0)
