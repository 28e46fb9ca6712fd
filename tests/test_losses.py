"""Losses: values by hand and against PyTorch, gradients against central finite differences in
float64, masks, stability, and bad input."""
import numpy as np
import pytest
import torch

from gpurnn.nn.losses import mse, softmax_cross_entropy
from helpers import central_difference

EPS = 1e-6


def _finite_difference_check(fn, pred, rng, entries=30):
    _, grad = fn(pred)
    flat = list(np.ndindex(pred.shape))
    for p in rng.choice(len(flat), size=min(entries, len(flat)), replace=False):
        idx = flat[p]
        num = central_difference(lambda: fn(pred)[0], pred, idx, EPS)
        assert abs(num - grad[idx]) <= 1e-7 + 1e-6 * abs(num), f"{idx}: fd {num}, grad {grad[idx]}"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_mse_value_and_gradient(reduction, masked, rng):
    T, B, K = 5, 3, 2
    pred, target = rng.standard_normal((T, B, K)), rng.standard_normal((T, B, K))
    mask = rng.random((T, B)) < 0.6 if masked else None
    loss, grad = mse(pred, target, mask, reduction)
    w = np.ones((T, B)) if mask is None else mask.astype(float)
    expected = 0.5 * ((pred - target) ** 2 * w[..., None]).sum()
    if reduction == "mean":
        expected /= w.sum()
    assert loss == pytest.approx(expected, rel=1e-12)
    if masked:
        assert np.all(grad[~mask] == 0)
    _finite_difference_check(lambda p: mse(p, target, mask, reduction), pred, rng)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(4, 3), (6,)])
def test_cross_entropy_against_torch_and_finite_differences(reduction, shape, rng):
    C = 5
    logits = rng.standard_normal(shape + (C,)) * 3
    targets = rng.integers(0, C, size=shape)
    mask = rng.random(shape) < 0.7
    mask.flat[0] = True
    targets_padded = np.where(mask, targets, 99)  # padded positions may hold anything
    loss, grad = softmax_cross_entropy(logits, targets_padded, mask, reduction)
    per = torch.nn.functional.cross_entropy(torch.tensor(logits.reshape(-1, C)),
                                            torch.tensor(targets.reshape(-1)), reduction="none")
    per = per.numpy()[mask.reshape(-1)]
    expected = per.sum() if reduction == "sum" else per.mean()
    assert loss == pytest.approx(float(expected), rel=1e-12)
    assert np.all(grad[~mask] == 0)
    _finite_difference_check(
        lambda p: softmax_cross_entropy(p, targets_padded, mask, reduction), logits, rng)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [-5e3, 5e3, 5e3]])
    loss, grad = softmax_cross_entropy(logits, np.array([1, 2]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    # row 0: log-sum-exp ~ 1e4, target logit 0 -> 1e4; row 1: two equal maxima -> log 2
    assert loss == pytest.approx(1e4 + np.log(2), rel=1e-12)
    np.testing.assert_allclose(grad[1], [0.0, 0.5, -0.5], atol=1e-15)


def test_float32_stays_float32(rng):
    pred = rng.standard_normal((3, 4, 2)).astype(np.float32)
    _, g = mse(pred, rng.standard_normal((3, 4, 2)))
    assert g.dtype == np.float32
    _, g = softmax_cross_entropy(pred, rng.integers(0, 2, size=(3, 4)))
    assert g.dtype == np.float32


def test_bad_input_is_refused(rng):
    pred = rng.standard_normal((3, 2))
    with pytest.raises(ValueError, match="target must have the shape"):
        mse(pred, rng.standard_normal((3, 1)))
    with pytest.raises(ValueError, match="reduction"):
        mse(pred, pred, reduction="avg")
    with pytest.raises(ValueError, match="mask must have the shape"):
        mse(pred, pred, mask=np.ones(2, bool))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 2\)"):
        softmax_cross_entropy(pred, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        softmax_cross_entropy(pred, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="at least 2 axes"):
        mse(np.zeros(3), np.zeros(3))
