"""DeLong's and Obuchowski's tests against direct O(m*n) computations, their behaviour under
the null with two correlated eyes per patient, and the bootstrap intervals and p-values."""

import numpy as np
import pytest
from scipy import stats as st
from sklearn.metrics import average_precision_score, roc_auc_score

from fundusfm.evaluation.metrics import binary_auroc, classification_metrics, per_class_table
from fundusfm.evaluation.stats import (
    CLUSTERED_DELONG,
    DELONG,
    _Ranked,
    average_precision,
    bootstrap_ci,
    clustered_delong_test,
    compare_aurocs,
    delong_components,
    delong_test,
    holm,
    metric_intervals,
    obuchowski_components,
    paired_bootstrap,
)


def reference_delong(y, a, b):
    """DeLong et al. (1988) from their definitions: placement values by explicit pairs."""
    y = y.astype(bool)

    def psi(x, z):
        return (x > z) + 0.5 * (x == z)

    comps = []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        kernel = psi(pos[:, None], neg[None, :])
        comps.append((kernel.mean(), kernel.mean(axis=1), kernel.mean(axis=0)))
    m, n = y.sum(), (~y).sum()
    s10 = np.cov(np.stack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.stack([comps[0][2], comps[1][2]]))
    cov = s10 / m + s01 / n
    diff = comps[0][0] - comps[1][0]
    z = diff / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return comps[0][0], comps[1][0], 2 * st.norm.sf(abs(z))


def test_delong_matches_reference_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    a = np.round(y * 0.8 + rng.normal(0, 0.6, 120), 1)  # rounded: many ties
    b = np.round(y * 0.3 + rng.normal(0, 0.6, 120), 1)
    result = delong_test(y, a, b)
    auc_a, auc_b, p = reference_delong(y, a, b)
    assert result["auroc_a"] == pytest.approx(auc_a) == pytest.approx(binary_auroc(y, a))
    assert result["auroc_b"] == pytest.approx(auc_b)
    assert result["p_value"] == pytest.approx(p, rel=1e-9)
    assert result["p_value"] < 0.05


def test_delong_identical_models_and_variance():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert delong_test(y, s, s)["p_value"] == 1.0
    auc, cov = delong_components(y, s)
    assert auc[0] == pytest.approx(binary_auroc(y, s)) and cov[0, 0] > 0


def test_bootstrap_ci_brackets_estimate_and_narrows():
    rng = np.random.default_rng(0)

    def ci(n):
        y = rng.integers(0, 2, n)
        s = y + rng.normal(0, 1.0, n)
        lo, hi = bootstrap_ci(lambda r: binary_auroc(y[r], s[r]), n, n_boot=400)
        return binary_auroc(y, s), lo, hi

    est, lo, hi = ci(100)
    assert lo < est < hi
    _, lo_big, hi_big = ci(2000)
    assert hi_big - lo_big < (hi - lo) / 2


def test_patient_bootstrap_is_wider_for_correlated_eyes():
    rng = np.random.default_rng(2)
    patient_y = rng.integers(0, 2, 60)
    patient_s = patient_y + rng.normal(0, 1.0, 60)
    y, s = np.repeat(patient_y, 2), np.repeat(patient_s, 2) + rng.normal(0, 0.05, 120)
    groups = np.repeat(np.arange(60), 2)
    lo_i, hi_i = bootstrap_ci(lambda r: binary_auroc(y[r], s[r]), 120, None, 500)
    lo_p, hi_p = bootstrap_ci(lambda r: binary_auroc(y[r], s[r]), 120, groups, 500)
    assert (hi_p - lo_p) > 1.2 * (hi_i - lo_i)  # two eyes are not two independent cases


def test_paired_bootstrap_p_values():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    good, bad = y + rng.normal(0, 0.5, 200), y + rng.normal(0, 3.0, 200)
    both = (good, bad)
    res = paired_bootstrap(lambda r, w: binary_auroc(y[r], both[w][r]), 200, n_boot=500)
    assert res["difference"] > 0.1 and res["p_value"] < 0.01
    same = paired_bootstrap(lambda r, w: binary_auroc(y[r], good[r]), 200, n_boot=200)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_delong_without_variance_gives_no_p_value():
    y = np.array([0, 0, 0, 1, 1, 1])
    perfect, constant = y.astype(float), np.full(6, 0.5)
    assert np.isnan(delong_test(y, perfect, constant)["p_value"])


def reference_obuchowski(y, a, b, groups):
    """Obuchowski (1997), written as the paper states it: explicit pairs, cluster sums, S10,
    S01 and S11 terms for each variance and the analogous terms for the covariance."""
    y, groups = y.astype(bool), np.asarray(groups)
    clusters = np.unique(groups)
    big_i, big_m, big_n = len(clusters), y.sum(), (~y).sum()
    parts = []
    for s in (a, b):
        kernel = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
        area = kernel.mean()
        v10 = kernel.mean(axis=1)  # per positive: V10(X_ij) = (1/N) sum psi
        v01 = kernel.mean(axis=0)  # per negative: V01(Y_kl) = (1/M) sum psi
        d10 = np.array(
            [v10[groups[y] == c].sum() - (groups[y] == c).sum() * area for c in clusters]
        )
        d01 = np.array(
            [v01[groups[~y] == c].sum() - (groups[~y] == c).sum() * area for c in clusters]
        )
        parts.append((area, d10, d01))
    f = big_i / (big_i - 1)

    def cov(r, s):
        (_, d10r, d01r), (_, d10s, d01s) = parts[r], parts[s]
        s10 = f / big_m * np.sum(d10r * d10s)
        s01 = f / big_n * np.sum(d01r * d01s)
        s11 = f * (np.sum(d10r * d01s) + np.sum(d01r * d10s)) / 2
        return s10 / big_m + s01 / big_n + 2 * s11 / (big_m * big_n)

    var = cov(0, 0) + cov(1, 1) - 2 * cov(0, 1)
    diff = parts[0][0] - parts[1][0]
    return parts[0][0], parts[1][0], cov(0, 0), 2 * st.norm.sf(abs(diff) / np.sqrt(var))


def test_obuchowski_matches_direct_computation_with_ties_and_mixed_clusters():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(70), rng.integers(1, 4, 70))  # 1 to 3 images a patient
    n = len(groups)
    y = (rng.random(n) < 0.3 + 0.4 * (groups % 2)).astype(int)  # mixed and pure clusters
    a = np.round(0.9 * y + rng.normal(0, 0.6, n), 1)
    b = np.round(0.4 * y + rng.normal(0, 0.6, n), 1)
    result = clustered_delong_test(y, a, b, groups)
    auc_a, auc_b, var_a, p = reference_obuchowski(y, a, b, groups)
    assert result["auroc_a"] == pytest.approx(auc_a, rel=1e-12)
    assert result["auroc_b"] == pytest.approx(auc_b, rel=1e-12)
    assert result["p_value"] == pytest.approx(p, rel=1e-9)
    _, cov = obuchowski_components(y, np.stack([a, b], axis=1), groups)
    assert cov[0, 0] == pytest.approx(var_a, rel=1e-9)
    # the labels of the groups do not matter, only who is with whom
    shuffled = rng.permutation(1000)[groups]
    assert clustered_delong_test(y, a, b, shuffled)["p_value"] == pytest.approx(p, rel=1e-12)


def test_one_image_per_patient_runs_plain_delong():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 90)
    a, b = y + rng.normal(0, 1, 90), 0.5 * y + rng.normal(0, 1, 90)
    chosen = compare_aurocs(y, a, b, np.arange(90) * 7)
    assert chosen["test"] == DELONG and chosen["patients"] == 90
    assert chosen["p_value"] == pytest.approx(delong_test(y, a, b)["p_value"], rel=1e-9, abs=0)
    # Obuchowski's I/(I-1) factors differ from DeLong's m/(m-1) with clusters of one image:
    # close, not equal, which is why one-image-per-patient data gets plain DeLong
    obu = clustered_delong_test(y, a, b, np.arange(90))["p_value"]
    assert obu == pytest.approx(chosen["p_value"], rel=0.2) and obu != chosen["p_value"]
    paired = compare_aurocs(y, a, b, np.arange(90) // 2)
    assert paired["test"] == CLUSTERED_DELONG and paired["patients"] == 45


def two_eye_null(rng, patients=150):
    """Two models exactly as good as each other; eyes share a patient's risk and each
    model's patient-level error, and the models share a patient-level component."""
    risk = rng.normal(size=patients)
    y = (rng.random((patients, 2)) < 1 / (1 + np.exp(-2.5 * risk[:, None]))).astype(int).ravel()
    shared = np.repeat(rng.normal(0, 0.7, patients), 2)

    def model():
        own = np.repeat(rng.normal(0, 1.0, patients), 2)
        return 1.5 * y + shared + own + rng.normal(0, 0.3, 2 * patients)

    return y, model(), model(), np.repeat(np.arange(patients), 2)


def test_clustered_delong_holds_its_level_with_two_eyes_and_image_level_does_not():
    rng = np.random.default_rng(0)
    p_clustered, p_images, z2_clustered, z2_images = [], [], [], []
    for _ in range(200):
        y, a, b, groups = two_eye_null(rng)
        p_clustered.append(clustered_delong_test(y, a, b, groups)["p_value"])
        p_images.append(delong_test(y, a, b)["p_value"])
        for z2, (auc, cov) in (
            (z2_clustered, obuchowski_components(y, np.stack([a, b], 1), groups)),
            (z2_images, delong_components(y, np.stack([a, b], 1))),
        ):
            z2.append((auc[0] - auc[1]) ** 2 / (cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    rate_clustered = np.mean(np.asarray(p_clustered) < 0.05)
    rate_images = np.mean(np.asarray(p_images) < 0.05)
    print(f"rejections at 0.05: clustered {rate_clustered:.3f}, image-level {rate_images:.3f}")
    assert 0.02 <= rate_clustered <= 0.09
    # image-level DeLong counts two eyes as two cases: its z^2 averages well above 1 (the
    # clustered one's stays near 1) and it rejects a true null more often
    assert 0.8 < np.mean(z2_clustered) < 1.2 and np.mean(z2_images) > 1.25
    assert rate_images >= rate_clustered + 0.03


def test_paired_bootstrap_p_value_is_never_zero():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 300)
    good, noise = y + rng.normal(0, 0.2, 300), rng.normal(0, 1, 300)
    both = (good, noise)
    res = paired_bootstrap(lambda r, w: binary_auroc(y[r], both[w][r]), 300, n_boot=99)
    assert res["ci_low"] > 0.3  # every resample favours the good model
    assert res["p_value"] == pytest.approx(2 / 100)


def task_data(kind, rng, n=120):
    """Labels and (N, 3 or 2) scores of one task kind, informative but imperfect."""
    c = 2 if kind == "binary" else 3
    if kind == "multilabel":
        y = (rng.random((n, c)) < 0.4).astype(int)
        return y, 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.2, (n, c)))))
    y = rng.integers(0, c, n)
    logits = 1.5 * np.eye(c)[y] + rng.normal(0, 1, (n, c))
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


THRESHOLDS = {"binary": [0.4], "multiclass": None, "multilabel": [0.3, 0.5, 0.6]}


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel"])
def test_metric_intervals_values_are_the_metrics_modules(kind):
    rng = np.random.default_rng(7)
    y, s = task_data(kind, rng)
    names = ["a", "b", "c"][: s.shape[1]]
    groups = np.arange(len(s)) // 2
    res = metric_intervals(kind, y, s, names, THRESHOLDS[kind], groups, n_boot=200, seed=1)
    overall = classification_metrics(kind, y, s, THRESHOLDS[kind])
    table = per_class_table(kind, y, s, names, THRESHOLDS[kind])
    shown = ["auroc", "auprc"] + (["sensitivity", "specificity"] if kind == "binary" else [])
    assert [k for k in res if isinstance(res[k], dict)] == shown
    for name in shown:
        assert res[name]["value"] == overall[name]
        assert res[name]["ci_low"] < res[name]["value"] < res[name]["ci_high"]
    assert [r["class"] for r in res["per_class"]] == names
    for row, want in zip(res["per_class"], table.to_dict("records"), strict=True):
        assert row["n"] == want["n"]
        for m in ("auroc", "auprc", "sensitivity", "specificity"):
            assert row[m]["value"] == want[m]
            assert row[m]["ci_low"] <= want[m] <= row[m]["ci_high"]
    assert res["patients"] == 60 and res["images"] == 120
    # one patient: every resample is the whole set, so each statistic the bootstrap computes
    # is the documented metric itself (thresholds and decisions included)
    one = metric_intervals(kind, y, s, names, THRESHOLDS[kind], np.zeros(120), n_boot=4)
    for name in shown:
        assert one[name]["ci_low"] == pytest.approx(one[name]["value"], abs=1e-12)
        assert one[name]["ci_high"] == pytest.approx(one[name]["value"], abs=1e-12)
    for row in one["per_class"]:
        for m in ("auroc", "auprc", "sensitivity", "specificity"):
            assert row[m]["ci_low"] == pytest.approx(row[m]["value"], abs=1e-12), (row, m)


def test_metric_intervals_resample_patients():
    rng = np.random.default_rng(8)
    patient_y = rng.integers(0, 2, 80)
    y = np.repeat(patient_y, 2)
    score = np.repeat(patient_y + rng.normal(0, 1, 80), 2) + rng.normal(0, 0.05, 160)
    s = np.stack([1 - score, score], axis=1)
    as_images = metric_intervals("binary", y, s, ["no", "yes"], [0.5], None, n_boot=300)
    as_patients = metric_intervals(
        "binary", y, s, ["no", "yes"], [0.5], np.repeat(np.arange(80), 2), n_boot=300
    )

    def width(r, name):
        return r[name]["ci_high"] - r[name]["ci_low"]

    for name in ("auroc", "sensitivity", "specificity"):
        assert width(as_patients, name) > 1.2 * width(as_images, name), name


def test_resample_figures_are_scikit_learns_on_the_drawn_rows():
    """The bootstrap scores a resample as weights on the sorted full set; that must give
    scikit-learn's AUROC and AUPRC of the resample itself, ties included."""
    rng = np.random.default_rng(9)
    for n, digits in ((30, 1), (200, 2), (500, 6)):  # coarse scores: many ties
        y = rng.integers(0, 2, (n, 2))
        s = np.round(0.3 * y + rng.random((n, 2)), digits)
        ranked = _Ranked(y, s)
        for rows in (np.arange(n), rng.integers(0, n, n)):
            w = np.bincount(rows, minlength=n).astype(float)
            aurocs, auprcs = ranked.figures(w)
            for j in range(2):
                yr, sr = y[rows, j], s[rows, j]
                assert aurocs[j] == pytest.approx(roc_auc_score(yr, sr), abs=1e-12)
                assert auprcs[j] == pytest.approx(average_precision_score(yr, sr), abs=1e-12)
        assert average_precision(y[:, 0], s[:, 0]) == pytest.approx(
            average_precision_score(y[:, 0], s[:, 0]), abs=1e-12
        )
    assert np.isnan(average_precision(np.ones(5), np.arange(5.0)))


def test_holm_step_down_matches_a_hand_computation():
    # sorted 0.01, 0.02, 0.03, 0.04 (m = 4): 4*0.01 = 0.04; 3*0.02 = 0.06; 2*0.03 = 0.06
    # (max with 0.06); 1*0.04 = 0.04 -> 0.06 (monotone); returned in the input's order
    got = holm([0.04, 0.01, 0.03, 0.02])
    np.testing.assert_allclose(got, [0.06, 0.04, 0.06, 0.06])
    # capped at 1; a NaN (no test) stays NaN and is not one of the m = 2 tests
    got = holm([0.3, np.nan, 0.8])
    np.testing.assert_allclose(got, [0.6, np.nan, 0.8])
    assert holm([]).shape == (0,) and holm([0.7, 0.9]).tolist() == [1.0, 1.0]
    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    assert (holm(p) >= p).all() and (holm(p) <= np.minimum(1, 12 * p) + 1e-15).all()
