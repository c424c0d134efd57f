"""The linear probe: standardisation folded into raw-feature weights, as sklearn scores it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from fundusfm.tasks.probe import NEVER, fit_probe


def features(n: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, 6)) * [1, 10, 0.1, 3, 1, 50] + [0, 5, -2, 0, 100, 0]
    x[:, 0] += y * 1.5  # the signal sits in feature 0
    return x, y


@pytest.mark.parametrize("classes", [2, 3])
def test_folded_probe_gives_sklearns_probabilities_on_raw_features(classes):
    x, y = features(120, classes)
    probe = fit_probe("multiclass" if classes > 2 else "binary", x[:80], y[:80], x[80:], y[80:],
                      classes, [0.1])  # fmt: skip
    mean, std = x[:80].mean(axis=0), x[:80].std(axis=0) + 1e-6
    ref = LogisticRegression(C=0.1, max_iter=2000).fit((x[:80] - mean) / std, y[:80])
    expected = ref.predict_proba((x[80:] - mean) / std)
    got = probe.scores(x[80:], "multiclass")
    assert np.abs(got - expected).max() < 1e-5
    head = probe.as_head()  # the same probe as a torch linear head on raw features
    import torch

    logits = head(torch.as_tensor(x[80:], dtype=torch.float32)).detach().numpy()
    assert np.abs(logits - probe.logits(x[80:])).max() < 1e-3


def test_probe_keeps_the_C_with_the_lowest_validation_loss_and_absent_classes_never_win():
    x, y = features(150, 3, seed=1)
    train = y != 2  # class 2 never appears in training
    probe = fit_probe("multiclass", x[train], y[train], x[~train], y[~train], 3, [0.001, 1.0])
    assert probe.fits == 2 and probe.bias[2] == NEVER
    assert (probe.scores(x, "multiclass")[:, 2] < 1e-6).all()
    losses = {
        C: fit_probe("multiclass", x[:100], y[:100], x[100:], y[100:], 3, [C]).val_loss
        for C in (0.001, 1.0)
    }
    both = fit_probe("multiclass", x[:100], y[:100], x[100:], y[100:], 3, [0.001, 1.0])
    assert min(losses, key=losses.get) == both.C and both.val_loss == min(losses.values())


def test_multilabel_probe_is_one_sklearn_model_per_label_on_raw_features():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 5)) * [1, 4, 0.5, 2, 1] + [0, 3, 0, -1, 8]
    y = np.stack([x[:, 0] > 0, x[:, 1] > 3.5], axis=1).astype(int)
    probe = fit_probe("multilabel", x[:80], y[:80], x[80:], y[80:], 2, [0.5])
    mean, std = x[:80].mean(axis=0), x[:80].std(axis=0) + 1e-6
    for j in range(2):
        ref = LogisticRegression(C=0.5, max_iter=2000).fit((x[:80] - mean) / std, y[:80, j])
        expected = ref.predict_proba((x[80:] - mean) / std)[:, 1]
        assert np.abs(probe.scores(x[80:], "multilabel")[:, j] - expected).max() < 1e-5
