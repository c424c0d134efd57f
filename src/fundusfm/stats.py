"""Uncertainty and paired comparisons for pooled out-of-fold predictions.

- `bootstrap_ci`: percentile 95% interval of any metric, resampling whole patients (a
  patient's two eyes move together, as the splits keep them together).
- `delong_test`: DeLong's test for two correlated AUROCs on the same images (fast algorithm
  of Sun & Xu, 2014), the standard for comparing two models on one test set.
- `paired_bootstrap`: the difference of any metric between two models on the same images,
  with a two-sided bootstrap p-value, for everything that is not a binary AUROC.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats as st


def _patient_samples(groups: np.ndarray, n_boot: int, seed: int):
    """Yield row indices of bootstrap samples that draw whole patients with replacement."""
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    for _ in range(n_boot):
        chosen = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[g] for g in chosen])


def bootstrap_ci(
    metric: Callable[[np.ndarray], float],
    n_rows: int,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of `metric(rows)` over bootstrap samples of rows (or patients)."""
    groups = np.arange(n_rows) if groups is None else np.asarray(groups)
    values = []
    for rows in _patient_samples(groups, n_boot, seed):
        v = metric(rows)
        if np.isfinite(v):
            values.append(v)
    if len(values) < n_boot // 2:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j < len(x) and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(len(x))
    out[order] = ranks
    return out


def delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their covariance (k, k) for k score columns on the same labels."""
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=float).T).T  # (n, k)
    pos, neg = scores[y], scores[~y]
    m, n = len(pos), len(neg)
    k = scores.shape[1]
    tx, ty, tz = np.empty((k, m)), np.empty((k, n)), np.empty((k, m + n))
    for r in range(k):
        tx[r] = _midrank(pos[:, r])
        ty[r] = _midrank(neg[:, r])
        tz[r] = _midrank(np.concatenate([pos[:, r], neg[:, r]]))
    auc = tz[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    v01 = (tz[:, :m] - tx) / n
    v10 = 1 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return auc, cov


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, float]:
    """Two-sided DeLong test of AUROC(a) = AUROC(b) on the same images."""
    auc, cov = delong_components(y, np.stack([score_a, score_b], axis=1))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(auc[0] - auc[1])
    if not var > 0:  # no variance (tied or degenerate scores, one case of a class): no test
        return {
            "auroc_a": float(auc[0]),
            "auroc_b": float(auc[1]),
            "difference": diff,
            "p_value": 1.0 if diff == 0 else float("nan"),
        }
    p = float(2 * st.norm.sf(abs(diff) / np.sqrt(var)))
    return {"auroc_a": float(auc[0]), "auroc_b": float(auc[1]), "difference": diff, "p_value": p}


def paired_bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_rows: int,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Difference metric(a) - metric(b) on resampled rows; `metric(rows, which)` scores one.

    `which` is 0 for model a and 1 for model b; rows are shared, so the comparison is paired.
    """
    all_rows = np.arange(n_rows)
    diff = metric(all_rows, 0) - metric(all_rows, 1)
    groups = all_rows if groups is None else np.asarray(groups)
    diffs = []
    for rows in _patient_samples(groups, n_boot, seed):
        d = metric(rows, 0) - metric(rows, 1)
        if np.isfinite(d):
            diffs.append(d)
    diffs = np.asarray(diffs)
    if len(diffs) == 0:
        return {"difference": float(diff), "p_value": float("nan")}
    p = 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0))
    return {
        "difference": float(diff),
        "p_value": float(min(1.0, p)),
        "ci_low": float(np.percentile(diffs, 2.5)),
        "ci_high": float(np.percentile(diffs, 97.5)),
    }
