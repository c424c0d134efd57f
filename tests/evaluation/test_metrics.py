"""Metrics checked against values worked out by hand."""

import numpy as np
import pytest

from fundusfm.evaluation.metrics import (
    choose_thresholds,
    classification_metrics,
    per_class_table,
    youden_threshold,
)

Y = np.array([0, 0, 1, 1])
P = np.array([0.1, 0.4, 0.35, 0.8])
S = np.stack([1 - P, P], axis=1)


def test_binary_by_hand():
    m = classification_metrics("binary", Y, S, [0.5])
    assert m["auroc"] == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered
    # at 0.5 only the 0.8 case is called positive
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["ppv"] == pytest.approx(1.0)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["kappa"] == pytest.approx(0.5)  # po 0.75, pe 0.5
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)


def test_youden_threshold_chosen_on_validation_and_applied_to_test():
    assert youden_threshold(Y, P) == pytest.approx(0.8)  # J = 0.5, first of the ties
    chosen = choose_thresholds("binary", Y, S)
    assert chosen.values == [pytest.approx(0.8)] and chosen.validated
    # other (test) images: at 0.8 only 0.85 is positive; at the default 0.5 three would be
    y_test = np.array([0, 0, 1, 1, 1])
    p_test = np.array([0.6, 0.2, 0.55, 0.85, 0.7])
    m = classification_metrics("binary", y_test, np.stack([1 - p_test, p_test], 1), chosen.values)
    assert m["threshold"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(1 / 3) and m["specificity"] == 1.0
    default = classification_metrics("binary", y_test, np.stack([1 - p_test, p_test], 1))
    assert default["sensitivity"] == 1.0 and default["specificity"] == 0.5


def test_threshold_from_one_class_validation_is_marked_not_validated():
    chosen = choose_thresholds("binary", np.array([1, 1, 1]), S[:3])
    assert chosen.values == [0.5] and chosen.validated is False
    assert "one class" in chosen.note
    y = np.array([[1, 0], [1, 1], [1, 0]])  # label 0 is always present: not validated
    labels = choose_thresholds("multilabel", y, np.array([[0.9, 0.2], [0.8, 0.7], [0.7, 0.1]]))
    assert labels.validated is False and labels.values[0] == 0.5
    assert labels.values[1] == pytest.approx(0.7)  # label 1 has both classes: chosen


def test_brier_is_one_definition_for_binary_and_multiclass():
    binary = classification_metrics("binary", Y, S)["brier"]
    multiclass = classification_metrics("multiclass", Y, S)["brier"]
    assert binary == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert multiclass == pytest.approx(binary)


def test_multiclass_by_hand():
    y = np.array([0, 1, 2, 2])
    scores = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]])
    m = classification_metrics("multiclass", y, scores)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["kappa"] == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))
    assert m["kappa_quadratic"] == pytest.approx(0.8)  # 1 - 0.25 / 1.25
    table = per_class_table("multiclass", y, scores, ["a", "b", "c"])
    assert m["auroc"] == pytest.approx(table["auroc"].mean())
    assert list(table["n"]) == [1, 1, 2]
    assert table.loc[2, "sensitivity"] == pytest.approx(0.5)


def test_multilabel_macro_and_micro():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.3, 0.4], [0.6, 0.7], [0.4, 0.5]])
    m = classification_metrics("multilabel", y, scores)
    # label 0: positives 0.9, 0.6 vs negatives 0.3, 0.4 -> 1.0
    # label 1: positives 0.4, 0.7 vs negatives 0.2, 0.5 -> 3 of 4 pairs -> 0.75
    assert m["auroc"] == pytest.approx((1.0 + 0.75) / 2)
    # micro: all 8 (image, label) scores as one binary problem; 14.5 of 16 pairs ordered
    # (0.4 positive vs 0.4 negative counts a half, 0.4 vs 0.5: none)
    pos, neg = scores[y == 1], scores[y == 0]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    assert m["auroc_micro"] == pytest.approx(pairs.mean()) == pytest.approx(14.5 / 16)
    chosen = choose_thresholds("multilabel", y, scores)
    # label 0: 0.6 separates perfectly; label 1: J is best at 0.7 (sens 0.5, spec 1)
    assert chosen.values == [pytest.approx(0.6), pytest.approx(0.7)] and chosen.validated


def test_single_class_gives_nan_not_error():
    m = classification_metrics("binary", np.array([1, 1]), np.array([[0.2, 0.8], [0.3, 0.7]]))
    assert np.isnan(m["auroc"]) and m["sensitivity"] == 1.0


def test_absent_class_is_left_out_of_macro_averages():
    y = np.array([0, 0, 1, 1])  # class 2 never occurs, as in many external sets
    scores = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics("multiclass", y, scores)
    assert m["auroc"] == 1.0 and m["auprc"] == 1.0 and m["f1_macro"] == 1.0
    assert m["classes_scored"] == 2
