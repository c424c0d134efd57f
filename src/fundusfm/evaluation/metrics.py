"""Classification metrics as pure functions of labels and scores (on scikit-learn).

Scores are class probabilities: (N, C) for every task kind (binary tasks have C = 2 and the
positive class in column 1). Labels are class indices (N,) for binary and multiclass tasks,
and a 0/1 matrix (N, C) for multilabel tasks.

Thresholds for the threshold-dependent figures (sensitivity, specificity, PPV, NPV, F1) are
chosen on the validation part by Youden's J and applied unchanged to the test part, as a
clinical study would; `choose_thresholds` picks them and `classification_metrics` applies them.
A validation part that lacks a class cannot choose a threshold: 0.5 is used and the result
says `validated: False`, so it is never mistaken for a chosen one.

Brier score, for every task kind: the mean over images and classes of (score - truth)^2,
truth being the one-hot label (binary, multiclass) or the 0/1 labels (multilabel). For a
binary task this equals the usual (p - y)^2 of the positive class, so the same 2-class
predictions score the same whether the task is declared binary or multiclass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn import metrics as skm


def binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC by the rank-sum identity (ties averaged): fast enough for bootstrap loops."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - m * (m + 1) / 2) / (m * n))


def auroc(kind: str, y: np.ndarray, scores: np.ndarray) -> float:
    """The headline AUROC of a task kind: binary, or macro over the classes that can be scored."""
    if kind == "binary":
        return binary_auroc(y, scores[:, 1])
    onehot = np.eye(scores.shape[1])[y] if kind == "multiclass" else y
    values = [binary_auroc(onehot[:, j], scores[:, j]) for j in range(scores.shape[1])]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold that maximises sensitivity + specificity - 1 on (y, score);
    0.5 when `y` has one class (see `choose_thresholds`, which says so)."""
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = skm.roc_curve(y, score)
    best = int(np.argmax(tpr - fpr))
    return float(min(thr[best], 1.0))


@dataclass(frozen=True)
class Thresholds:
    """Decision thresholds and whether validation data chose them (else they are 0.5)."""

    values: list[float]
    validated: bool
    note: str = ""

    def record(self) -> dict:
        return {"values": self.values, "validated": self.validated, "note": self.note}


def choose_thresholds(kind: str, y: np.ndarray, scores: np.ndarray) -> Thresholds:
    """Per-class decision thresholds from validation data (one for binary: the positive class)."""
    if kind == "multiclass":
        return Thresholds([], True, "multiclass decisions are the argmax")
    columns = [np.asarray(y)] if kind == "binary" else [y[:, j] for j in range(scores.shape[1])]
    targets = [scores[:, 1]] if kind == "binary" else [scores[:, j] for j in range(len(columns))]
    values = [youden_threshold(c, t) for c, t in zip(columns, targets, strict=True)]
    lacking = [j for j, c in enumerate(columns) if len(np.unique(c)) < 2]
    if not lacking:
        return Thresholds(values, True)
    which = "the validation part" if kind == "binary" else f"labels {lacking} of validation"
    note = f"{which} holds one class only: threshold 0.5 used, not chosen on data"
    return Thresholds(values, False, note)


def brier(truth: np.ndarray, scores: np.ndarray) -> float:
    """Mean over images and classes of (score - truth)^2 (see the module docstring)."""
    return float(np.mean((np.asarray(scores, float) - truth) ** 2))


def binary_counts(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, PPV and NPV of 0/1 predictions (NaN where undefined)."""
    tp = float(np.sum((pred == 1) & (y == 1)))
    tn = float(np.sum((pred == 0) & (y == 0)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    fn = float(np.sum((pred == 0) & (y == 1)))

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def _safe(fn, *args, **kwargs) -> float:
    """A metric that is undefined on this data (one class only) is NaN, not an exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(fn(*args, **kwargs))
    except ValueError:
        return float("nan")


def _binary(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (p >= threshold).astype(int)
    return {
        "auroc": _safe(skm.roc_auc_score, y, p),
        "auprc": _safe(skm.average_precision_score, y, p),
        "accuracy": _safe(skm.accuracy_score, y, pred),
        "balanced_accuracy": _safe(skm.balanced_accuracy_score, y, pred),
        "f1": _safe(skm.f1_score, y, pred, zero_division=0),
        **binary_counts(y, pred),
        "kappa": _safe(skm.cohen_kappa_score, y, pred),
        "brier": brier(np.eye(2)[np.asarray(y, int)], np.stack([1 - p, p], axis=1)),
        "threshold": threshold,
    }


def classification_metrics(
    kind: str, y: np.ndarray, scores: np.ndarray, thresholds: list[float] | None = None
) -> dict[str, float]:
    """Every summary metric of one task kind; see the module docstring for the conventions."""
    y, scores = np.asarray(y), np.asarray(scores, dtype=float)
    n_classes = scores.shape[1]
    if kind == "binary":
        return _binary(y, scores[:, 1], (thresholds or [0.5])[0])
    if kind == "multiclass":
        pred = scores.argmax(axis=1)
        onehot = np.eye(n_classes)[y]
        labels = list(range(n_classes))
        auroc, auprc, weight = _one_vs_rest(onehot, scores)
        scored = ~np.isnan(auroc)
        return {
            "auroc": float(np.mean(auroc[scored])) if scored.any() else float("nan"),
            "auroc_weighted": float(np.average(auroc[scored], weights=weight[scored]))
            if scored.any()
            else float("nan"),
            "auprc": float(np.mean(auprc[scored])) if scored.any() else float("nan"),
            "classes_scored": int(scored.sum()),
            "accuracy": _safe(skm.accuracy_score, y, pred),
            "balanced_accuracy": _safe(skm.balanced_accuracy_score, y, pred),
            "f1_macro": _safe(
                skm.f1_score,
                y,
                pred,
                average="macro",
                labels=sorted(set(y.tolist())),
                zero_division=0,
            ),
            "kappa": _safe(skm.cohen_kappa_score, y, pred, labels=labels),
            "kappa_quadratic": _safe(
                skm.cohen_kappa_score, y, pred, labels=labels, weights="quadratic"
            ),
            "brier": brier(onehot, scores),
        }
    thresholds = thresholds or [0.5] * n_classes
    pred = (scores >= np.asarray(thresholds)[None, :]).astype(int)
    auroc, auprc, _ = _one_vs_rest(y, scores)
    scored = ~np.isnan(auroc)
    return {
        "auroc": float(np.mean(auroc[scored])) if scored.any() else float("nan"),
        "auroc_micro": _safe(skm.roc_auc_score, y, scores, average="micro"),
        "auprc": float(np.mean(auprc[scored])) if scored.any() else float("nan"),
        "classes_scored": int(scored.sum()),
        "f1_macro": _safe(
            skm.f1_score, y[:, scored], pred[:, scored], average="macro", zero_division=0
        ),
        "accuracy_subset": _safe(skm.accuracy_score, y, pred),
        "brier": brier(y, scores),
    }


def _one_vs_rest(onehot: np.ndarray, scores: np.ndarray):
    """Per-class AUROC and AUPRC (NaN for a class that is absent or universal) and prevalence.

    Macro averages run over the classes that can be scored, so a class missing from an
    external set neither counts as zero nor makes the whole figure undefined; how many
    classes were scored is reported next to them.
    """
    n = scores.shape[1]
    auroc, auprc = np.full(n, np.nan), np.full(n, np.nan)
    for j in range(n):
        yj = onehot[:, j]
        if 0 < yj.sum() < len(yj):
            auroc[j] = skm.roc_auc_score(yj, scores[:, j])
            auprc[j] = skm.average_precision_score(yj, scores[:, j])
    return auroc, auprc, onehot.sum(axis=0)


def per_class_table(
    kind: str,
    y: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    thresholds: list[float] | None = None,
) -> pd.DataFrame:
    """One row per class: prevalence, one-vs-rest AUROC/AUPRC and sensitivity/specificity."""
    y, scores = np.asarray(y), np.asarray(scores, dtype=float)
    rows = []
    for j, name in enumerate(classes):
        if kind == "multilabel":
            yj, sj = y[:, j], scores[:, j]
            pred = (sj >= (thresholds[j] if thresholds else 0.5)).astype(int)
        else:
            yj, sj = (y == j).astype(int), scores[:, j]
            if kind == "binary":
                pred = (scores[:, 1] >= (thresholds or [0.5])[0]).astype(int)
                pred = pred if j == 1 else 1 - pred
            else:
                pred = (scores.argmax(axis=1) == j).astype(int)
        rows.append(
            {
                "class": name,
                "n": int(yj.sum()),
                "auroc": _safe(skm.roc_auc_score, yj, sj),
                "auprc": _safe(skm.average_precision_score, yj, sj),
                **binary_counts(yj, pred),
            }
        )
    return pd.DataFrame(rows)


def validation_loss(kind: str, labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean cross-entropy (binary/multiclass) or binary cross-entropy (multilabel) of scores."""
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    if kind == "multilabel":
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))
