"""Uncertainty and paired comparisons for pooled out-of-fold predictions.

- `bootstrap_ci`: percentile interval of any metric, resampling whole patients (a patient's
  two eyes move together, as the splits keep them together).
- `metric_intervals`: AUROC, AUPRC, sensitivity and specificity (overall and per class) with
  patient-level bootstrap intervals; `auroc_interval` is its AUROC interval alone, on the
  same resamples (the report's pooled AUROC uses it).
- `delong_test`: DeLong's test for two correlated AUROCs on the same images (fast algorithm
  of Sun & Xu, 2014), for images that are independent cases (one image per patient).
- `clustered_delong_test`: Obuchowski's (1997) clustered extension of DeLong's test, for
  patients with several images (two eyes); `compare_aurocs` picks the one that fits.
- `paired_bootstrap`: the difference of any metric between two models on the same images,
  with a two-sided bootstrap p-value, for everything that is not a binary AUROC.
- `holm`: Holm's step-down adjusted p-values (family-wise error; NaN stays NaN, outside m).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats as st

from fundusfm.evaluation.metrics import classification_metrics, per_class_table

DELONG = "DeLong"
CLUSTERED_DELONG = "clustered DeLong (Obuchowski)"


def _patient_samples(groups: np.ndarray, n_boot: int, seed: int):
    """Yield row indices of bootstrap samples that draw whole patients with replacement."""
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    for _ in range(n_boot):
        chosen = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[g] for g in chosen])


def _intervals(
    sample: Callable[[np.ndarray], dict[str, float]],
    n_rows: int,
    groups: np.ndarray | None,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every statistic `sample(rows)` returns, on shared resamples.

    A resample where a statistic is undefined (NaN) is dropped for that statistic; with fewer
    than half the resamples left the interval is NaN rather than a figure from a few draws.
    """
    groups = np.arange(n_rows) if groups is None else np.asarray(groups)
    values: dict[str, list[float]] = {}
    for rows in _patient_samples(groups, n_boot, seed):
        for name, v in sample(rows).items():
            values.setdefault(name, []).append(v)
    out = {}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    for name, vs in values.items():
        finite = np.asarray(vs, dtype=float)
        finite = finite[np.isfinite(finite)]
        if len(finite) < n_boot // 2:
            out[name] = (float("nan"), float("nan"))
        else:
            lo, hi = np.percentile(finite, q)
            out[name] = (float(lo), float(hi))
    return out


def bootstrap_ci(
    metric: Callable[[np.ndarray], float],
    n_rows: int,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of `metric(rows)` over bootstrap samples of rows (or patients)."""
    return _intervals(lambda r: {"m": metric(r)}, n_rows, groups, n_boot, seed, level)["m"]


def _class_matrix(kind: str, y: np.ndarray, n_classes: int) -> np.ndarray:
    """0/1 (N, C): whether each image belongs to each class (one-vs-rest for every kind)."""
    y = np.asarray(y)
    return y.astype(int) if kind == "multilabel" else np.eye(n_classes, dtype=int)[y]


def _headline(kind: str, per_class: np.ndarray, scorable: np.ndarray) -> float:
    """The headline figure of a resample: the positive class (binary) or the macro average
    over the classes the full data can score, NaN when the resample cannot score one of them
    (otherwise the average would silently run over fewer classes in some resamples)."""
    if kind == "binary":
        return float(per_class[1])
    if not scorable.any() or np.isnan(per_class[scorable]).any():
        return float("nan")
    return float(np.mean(per_class[scorable]))


def _scorable(onehot: np.ndarray) -> np.ndarray:
    return (onehot.sum(0) > 0) & (onehot.sum(0) < len(onehot))


def auroc_interval(
    kind: str,
    y: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Patient-bootstrap interval of the headline AUROC; equals `metric_intervals`' AUROC
    interval for the same seed (same resamples, same statistic)."""
    scores = np.asarray(scores, dtype=float)
    onehot = _class_matrix(kind, y, scores.shape[1])
    ranked, ok = _Ranked(onehot, scores), _scorable(onehot)

    def sample(rows):
        return {"auroc": _headline(kind, ranked.figures(_counts(rows, len(scores)))[0], ok)}

    return _intervals(sample, len(scores), groups, n_boot, seed, level)["auroc"]


def _decisions(kind: str, scores: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
    """0/1 (N, C) decisions per class, as `metrics.per_class_table` takes them."""
    if kind == "binary":
        positive = (scores[:, 1] >= (thresholds or [0.5])[0]).astype(int)
        return np.stack([1 - positive, positive], axis=1)
    if kind == "multiclass":
        return np.eye(scores.shape[1], dtype=int)[scores.argmax(axis=1)]
    t = np.asarray(thresholds if thresholds else [0.5] * scores.shape[1])
    return (scores >= t[None, :]).astype(int)


def _counts(rows: np.ndarray, n: int) -> np.ndarray:
    """How often each image is drawn into a resample: its weight there."""
    return np.bincount(rows, minlength=n).astype(float)


class _Ranked:
    """Each class's images sorted by score once, so that AUROC and AUPRC of any resample,
    given as per-image weights (draw counts), take a few cumulative sums instead of a sort.

    A resample with repeated images is the full set with those weights, so the figures are
    scikit-learn's `roc_auc_score` and `average_precision_score` of the resample (tests
    hold them equal): scores tied in the full data form one step, as they do there.
    """

    def __init__(self, onehot: np.ndarray, scores: np.ndarray):
        self.order = np.argsort(-scores, axis=0, kind="mergesort")  # (N, C), descending
        self.y = np.take_along_axis(onehot, self.order, axis=0).astype(float)
        ranked = np.take_along_axis(scores, self.order, axis=0)
        n = len(scores)
        self.ends = [np.r_[np.flatnonzero(np.diff(c)), n - 1] for c in ranked.T]  # tie runs

    def figures(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AUROC and AUPRC (C,) of the resample with image weights `w` (NaN: one class)."""
        drawn = w[self.order]
        tp_all, fp_all = np.cumsum(drawn * self.y, axis=0), np.cumsum(drawn * (1 - self.y), axis=0)
        aurocs, auprcs = np.full(len(self.ends), np.nan), np.full(len(self.ends), np.nan)
        for j, ends in enumerate(self.ends):
            tp, fp = tp_all[ends, j], fp_all[ends, j]  # cumulative counts at each tie run's end
            if tp[-1] > 0 and fp[-1] > 0:
                d_tp, d_fp = np.diff(tp, prepend=0), np.diff(fp, prepend=0)
                # positives above the negatives below them, ties counting half
                aurocs[j] = np.sum(d_tp * (fp[-1] - fp + 0.5 * d_fp)) / (tp[-1] * fp[-1])
                # precision at each step where recall grows, times the recall gained
                up = d_tp > 0
                auprcs[j] = np.sum(d_tp[up] * tp[up] / (tp[up] + fp[up])) / tp[-1]
        return aurocs, auprcs


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """AUPRC of one class (scikit-learn's `average_precision_score`), NaN without both."""
    score = np.asarray(score, dtype=float)[:, None]
    ranked = _Ranked(np.asarray(y).astype(int)[:, None], score)
    return float(ranked.figures(np.ones(len(score)))[1][0])


def _sample_metrics(kind, onehot, ranked, decisions, scorable, rows) -> dict[str, float]:
    """Every statistic of `metric_intervals` on one resample (`c<j>_<metric>` per class)."""
    w = _counts(rows, len(onehot))
    aurocs, auprcs = ranked.figures(w)
    out = {"auroc": _headline(kind, aurocs, scorable), "auprc": _headline(kind, auprcs, scorable)}
    pos, neg = w @ onehot, w @ (1 - onehot)
    with np.errstate(invalid="ignore", divide="ignore"):  # a class absent: NaN, dropped
        sensitivity = (w @ (onehot * decisions)) / pos
        specificity = (w @ ((1 - onehot) * (1 - decisions))) / neg
    for j in range(onehot.shape[1]):
        out.update({f"c{j}_auroc": aurocs[j], f"c{j}_auprc": auprcs[j]})
        out.update({f"c{j}_sensitivity": sensitivity[j], f"c{j}_specificity": specificity[j]})
    if kind == "binary":
        out.update(sensitivity=out["c1_sensitivity"], specificity=out["c1_specificity"])
    return out


def metric_intervals(
    kind: str,
    y: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    thresholds: list[float] | None = None,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Classification metrics with percentile bootstrap intervals that resample patients.

    `kind`, `y` (class indices, or a 0/1 matrix for multilabel) and `scores` (N x C) follow
    `fundusfm.evaluation.metrics`; `thresholds` are the decision thresholds the metrics module takes
    (binary: one, of the positive class; multilabel: one per label; multiclass: ignored, the
    decision is the argmax); `groups` holds each image's patient id (None: every image is its
    own patient, right only with one image per patient). Returns::

        {"auroc": {"value", "ci_low", "ci_high"}, "auprc": {...},
         "sensitivity": {...}, "specificity": {...},     # binary only: the positive class
         "per_class": [{"class", "n", "auroc", "auprc", "sensitivity", "specificity"}, ...],
         "images", "patients", "n_boot", "seed", "level"}

    Values are those of `classification_metrics` (macro over scorable classes for multiclass
    and multilabel) and `per_class_table`; intervals come from the same `n_boot` resamples of
    whole patients, each figure dropping resamples where it is undefined (NaN interval if
    more than half are). Inside the bootstrap the figures come from `_Ranked` (one sort,
    then weights), equal to scikit-learn's and `metrics.binary_counts`' but ~10x faster.
    """
    y, scores = np.asarray(y), np.asarray(scores, dtype=float)
    onehot = _class_matrix(kind, y, scores.shape[1])
    decisions = _decisions(kind, scores, thresholds)
    ranked, ok = _Ranked(onehot, scores), _scorable(onehot)
    ci = _intervals(
        lambda rows: _sample_metrics(kind, onehot, ranked, decisions, ok, rows),
        len(y),
        groups,
        n_boot,
        seed,
        level,
    )

    def entry(value, name):
        return {"value": float(value), "ci_low": ci[name][0], "ci_high": ci[name][1]}

    overall = classification_metrics(kind, y, scores, thresholds)
    names = ["auroc", "auprc"] + (["sensitivity", "specificity"] if kind == "binary" else [])
    out: dict = {name: entry(overall[name], name) for name in names}
    table = per_class_table(kind, y, scores, classes, thresholds)
    out["per_class"] = [
        {
            "class": row["class"],
            "n": int(row["n"]),
            **{
                m: entry(row[m], f"c{j}_{m}")
                for m in ("auroc", "auprc", "sensitivity", "specificity")
            },
        }
        for j, row in enumerate(table.to_dict("records"))
    ]
    n_patients = len(y) if groups is None else len(np.unique(np.asarray(groups)))
    out.update(images=len(y), patients=n_patients, n_boot=n_boot, seed=seed, level=level)
    return out


def _placements(y: np.ndarray, scores: np.ndarray):
    """AUROCs (k,) and placement values of k score columns (DeLong 1988; Sun & Xu 2014).

    A positive's placement is the share of negatives it outscores (ties count half), a
    negative's the share of positives that outscore it; AUROC is the mean of either.
    """
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=float).T).T  # (n, k)
    pos, neg = scores[y].T, scores[~y].T  # (k, m), (k, n)
    m, n = pos.shape[1], neg.shape[1]
    tx = st.rankdata(pos, axis=1)  # midranks among positives
    ty = st.rankdata(neg, axis=1)
    tz = st.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    auc = tz[:, :m].sum(axis=1) / (m * n) - (m + 1) / (2 * n)
    pos_place = (tz[:, :m] - tx) / n
    neg_place = 1 - (tz[:, m:] - ty) / m
    return auc, pos_place, neg_place


def delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their covariance (k, k) for k score columns on the same labels."""
    auc, pos_place, neg_place = _placements(y, scores)
    m, n = pos_place.shape[1], neg_place.shape[1]
    cov = np.atleast_2d(np.cov(pos_place)) / m + np.atleast_2d(np.cov(neg_place)) / n
    return auc, cov


def obuchowski_components(
    y: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs (k,) and their covariance (k, k) with patients as clusters (Obuchowski 1997).

    With V10_i, V01_i the sums of placement values of cluster i's positives and negatives,
    m_i, n_i its counts and M, N the totals over I clusters, each cluster contributes
    u_i = (V10_i - m_i A) / M + (V01_i - n_i A) / N, and cov = I / (I - 1) * sum_i u_i u_i';
    expanded, this is the paper's S10 / M + S01 / N + 2 S11 / (M N).
    """
    y = np.asarray(y).astype(bool)
    auc, pos_place, neg_place = _placements(y, scores)
    _, cluster = np.unique(np.asarray(groups), return_inverse=True)
    n_clusters = int(cluster.max()) + 1
    cp, cn = cluster[y], cluster[~y]
    m_i = np.bincount(cp, minlength=n_clusters)
    n_i = np.bincount(cn, minlength=n_clusters)
    v10 = np.stack([np.bincount(cp, w, minlength=n_clusters) for w in pos_place])  # (k, I)
    v01 = np.stack([np.bincount(cn, w, minlength=n_clusters) for w in neg_place])
    a = auc[:, None]
    u = (v10 - m_i * a) / len(cp) + (v01 - n_i * a) / len(cn)
    return auc, n_clusters / (n_clusters - 1) * (u @ u.T)


def _z_test(auc: np.ndarray, cov: np.ndarray) -> dict[str, float]:
    """Two-sided normal test of auc[0] = auc[1] given their covariance."""
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(auc[0] - auc[1])
    if not var > 0:  # no variance (tied or degenerate scores, one case of a class): no test
        p = 1.0 if diff == 0 else float("nan")
    else:
        p = float(2 * st.norm.sf(abs(diff) / np.sqrt(var)))
    return {"auroc_a": float(auc[0]), "auroc_b": float(auc[1]), "difference": diff, "p_value": p}


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, float]:
    """Two-sided DeLong test of AUROC(a) = AUROC(b) on the same, independent images."""
    return _z_test(*delong_components(y, np.stack([score_a, score_b], axis=1)))


def clustered_delong_test(
    y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, groups: np.ndarray
) -> dict[str, float]:
    """Two-sided test of AUROC(a) = AUROC(b) with images clustered by patient (`groups`).

    With one image per patient Obuchowski's variance is close to DeLong's but not equal
    (its I/(I-1) factor against DeLong's m/(m-1) and n/(n-1)); `compare_aurocs` therefore
    runs plain DeLong on such data, and this function only where clusters are real.
    """
    if len(np.unique(np.asarray(groups))) < 2:
        auc, _ = delong_components(y, np.stack([score_a, score_b], axis=1))
        return _z_test(auc, np.full((2, 2), np.nan))
    return _z_test(*obuchowski_components(y, np.stack([score_a, score_b], axis=1), groups))


def compare_aurocs(
    y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, groups: np.ndarray | None
) -> dict:
    """The test that fits the data: Obuchowski's when some patient has several images,
    plain DeLong when none has; the result names the test and counts the patients."""
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    patients = len(np.unique(groups))
    if patients == len(groups):
        return {**delong_test(y, score_a, score_b), "test": DELONG, "patients": patients}
    res = clustered_delong_test(y, score_a, score_b, groups)
    return {**res, "test": CLUSTERED_DELONG, "patients": patients}


def paired_bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_rows: int,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Difference metric(a) - metric(b) on resampled rows; `metric(rows, which)` scores one.

    `which` is 0 for model a and 1 for model b; rows are shared, so the comparison is paired.
    The two-sided p-value counts the observed data as one resample, (k + 1) / (B + 1) on each
    side, so it is never 0: B resamples cannot show a p-value below 2 / (B + 1).
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
    b = len(diffs)
    p = 2 * min((np.sum(diffs <= 0) + 1) / (b + 1), (np.sum(diffs >= 0) + 1) / (b + 1))
    return {
        "difference": float(diff),
        "p_value": float(min(1.0, p)),
        "ci_low": float(np.percentile(diffs, 2.5)),
        "ci_high": float(np.percentile(diffs, 97.5)),
    }


def holm(p_values) -> np.ndarray:
    """Holm: the k-th smallest of m p-values -> max over j <= k of (m-j+1) p_(j), at most 1."""
    p = np.asarray(p_values, dtype=float)
    out, order = np.full(p.shape, np.nan), np.flatnonzero(np.isfinite(p))
    order = order[np.argsort(p[order], kind="stable")]
    steps = (len(order) - np.arange(len(order))) * p[order]
    out[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return out
