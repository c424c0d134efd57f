"""Linear probes on cached features: logistic regression, turned into a linear head.

For each regularisation strength C, a logistic regression is fitted on the standardised
training features (multinomial for multiclass, one per label for multilabel); the C with the
lowest validation cross-entropy wins (defined for any validation part, unlike AUROC). The
standardisation is folded into the weights, so the probe becomes an ordinary `nn.Linear`
head on the raw pooled features and the cell yields a normal bundle. Fits that stopped at
`max_iter` before converging are counted (`convergence_warnings`, of `fits`), not hidden.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from fundusfm.evaluation.metrics import validation_loss

NEVER = -30.0  # logit of a class the training part never showed


@dataclass
class LinearProbe:
    weight: np.ndarray  # (outputs, features) on raw features
    bias: np.ndarray  # (outputs,)
    C: float
    val_loss: float
    convergence_warnings: int = 0  # over every fit of every C
    fits: int = 0

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def scores(self, x: np.ndarray, kind: str) -> np.ndarray:
        z = torch.as_tensor(self.logits(x), dtype=torch.float32)
        return (torch.sigmoid(z) if kind == "multilabel" else torch.softmax(z, 1)).numpy()

    def as_head(self) -> torch.nn.Sequential:
        """The probe as the project's `linear` head (see `heads.make_head`)."""
        layer = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(self.weight, dtype=torch.float32))
            layer.bias.copy_(torch.as_tensor(self.bias, dtype=torch.float32))
        return torch.nn.Sequential(layer)


def _fit_one(xs, y, n_classes, C, max_iter):
    """Weights and bias on standardised features for one binary/multiclass target, and
    whether the solver stopped before converging."""
    present = np.unique(y)
    weight = np.zeros((n_classes, xs.shape[1]))
    bias = np.full(n_classes, NEVER)
    if len(present) == 1:
        bias[present[0]] = 0.0
        return weight, bias, False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr = LogisticRegression(C=C, max_iter=max_iter).fit(xs, y)
    unconverged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for w in caught:  # only the convergence warnings are counted instead of shown
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn(w.message, stacklevel=2)  # shown once per message, as usual
    if len(present) == 2:  # sklearn's binary model: one vector for the second class
        weight[present[1]], bias[present[1]] = lr.coef_[0], lr.intercept_[0]
        bias[present[0]] = 0.0
    else:
        weight[present], bias[present] = lr.coef_, lr.intercept_
    return weight, bias, unconverged


def fit_probe(
    kind: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    Cs: list[float],
    max_iter: int = 2000,
) -> LinearProbe:
    """Fit one logistic regression per C; keep the one with the lowest validation loss."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    xs = (x_train - mean) / std
    best: LinearProbe | None = None
    unconverged, fits = 0, 0
    for C in Cs:
        if kind == "multilabel":
            parts = [_fit_one(xs, y_train[:, j], 2, C, max_iter) for j in range(n_classes)]
            w = np.stack([p[0][1] for p in parts])  # logit of "label present" minus "absent"
            b = np.array([p[1][1] - p[1][0] for p in parts])
            flags = [p[2] for p in parts]
        else:
            w, b, flag = _fit_one(xs, y_train, n_classes, C, max_iter)
            flags = [flag]
        unconverged, fits = unconverged + sum(flags), fits + len(flags)
        probe = LinearProbe(w / std, b - (w / std) @ mean, C, float("nan"))
        probe.val_loss = validation_loss(kind, y_val, probe.scores(x_val, kind))
        if best is None or probe.val_loss < best.val_loss:
            best = probe
    assert best is not None
    best.convergence_warnings, best.fits = unconverged, fits
    return best
