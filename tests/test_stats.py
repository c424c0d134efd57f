"""DeLong's test against a direct O(m*n) computation, and bootstrap sanity checks."""

import numpy as np
import pytest
from scipy import stats as st

from fundusfm.metrics import binary_auroc
from fundusfm.stats import bootstrap_ci, delong_components, delong_test, paired_bootstrap


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
