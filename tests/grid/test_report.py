"""The grid report's statistics on hand-made predictions (no training): the pooled AUROC
interval is `metric_intervals`' own, and comparisons name the test they ran."""

import numpy as np
import pandas as pd
import pytest

from fundusfm.evaluation.stats import (
    CLUSTERED_DELONG,
    DELONG,
    clustered_delong_test,
    delong_test,
    metric_intervals,
)
from fundusfm.grid.figures import fraction_ticks
from fundusfm.grid.report import compare, summarise
from fundusfm.grid.tables import KEYS, in_groups

COORDS = {"task": "abnormal", "method": "lf", "resolution": 64, "fraction": 1.0}
TASKS = {"abnormal": ("binary", ["normal", "abnormal"])}


def predictions(rng, patients: int, eyes: int, init: str, signal: float) -> pd.DataFrame:
    """Pooled test predictions of one init: `eyes` images per patient, labels per patient."""
    y = np.repeat(rng.integers(0, 2, patients), eyes)
    score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, len(y)))))
    return pd.DataFrame(
        {
            "image_id": [f"p{i // eyes}_e{i % eyes}" for i in range(len(y))],
            "fold": np.arange(len(y)) % 3,
            "split": "test",
            "y_true": y,
            "score_normal": 1 - score,
            "score_abnormal": score,
            **COORDS,
            "init": init,
        }
    )


def patients_of(frame: pd.DataFrame) -> dict:
    return {i: i.split("_")[0] for i in frame["image_id"]}


def summary_of(frame: pd.DataFrame, n_boot: int) -> pd.Series:
    results = pd.DataFrame(
        [{**COORDS, "init": "a", "fold": k, "test_auroc": 0.7} for k in range(3)]
    )
    return summarise(results, frame, TASKS, patients_of(frame), n_boot).iloc[0]


def test_pooled_auroc_interval_is_metric_intervals_and_narrows_with_more_patients():
    rng = np.random.default_rng(0)
    widths = []
    for patients in (30, 600):
        frame = predictions(rng, patients, 2, "a", 1.0)
        row = summary_of(frame, n_boot=300)
        y, s = frame["y_true"].to_numpy(), frame[["score_normal", "score_abnormal"]].to_numpy()
        groups = frame["image_id"].map(patients_of(frame)).to_numpy()
        ref = metric_intervals("binary", y, s, TASKS["abnormal"][1], None, groups, n_boot=300)
        assert row.pooled_auroc == pytest.approx(ref["auroc"]["value"], abs=1e-12)
        assert (row.pooled_auroc_ci_low, row.pooled_auroc_ci_high) == (
            ref["auroc"]["ci_low"],
            ref["auroc"]["ci_high"],
        )  # same resamples, same statistic: identical, not merely close
        assert row.pooled_patients == patients and row.pooled_images == 2 * patients
        widths.append(row.pooled_auroc_ci_high - row.pooled_auroc_ci_low)
    assert widths[1] < widths[0] / 2.5  # 20x the patients: about 1/sqrt(20) the width


@pytest.mark.parametrize("eyes", [1, 2])
def test_compare_runs_the_test_that_fits_and_reports_it(eyes):
    rng = np.random.default_rng(eyes)
    a = predictions(rng, 80, eyes, "a", 1.2)
    b = a.assign(
        init="b", score_abnormal=np.clip(a.score_abnormal + rng.normal(0, 0.3, len(a)), 0, 1)
    )
    b["score_normal"] = 1 - b["score_abnormal"]
    table = compare(pd.concat([a, b]), TASKS, patients_of(a), n_boot=10)
    (row,) = table.to_dict("records")
    y, sa, sb = a.y_true.to_numpy(), a.score_abnormal.to_numpy(), b.score_abnormal.to_numpy()
    if eyes == 1:
        want, name = delong_test(y, sa, sb), DELONG
    else:
        groups = a.image_id.map(patients_of(a)).to_numpy()
        want, name = clustered_delong_test(y, sa, sb, groups), CLUSTERED_DELONG
    assert row["test"] == name and row["patients"] == 80 and row["images"] == 80 * eyes
    assert row["p_value"] == pytest.approx(want["p_value"], rel=1e-9, abs=0)
    assert 0 < row["p_value"] <= 1 and row["complete"]


def test_only_the_incomplete_group_leaves_the_comparisons():
    rng = np.random.default_rng(3)
    frames = []
    for fraction in (0.5, 1.0):
        for init in ("a", "b"):
            frames.append(predictions(rng, 30, 2, init, 1.0).assign(fraction=fraction))
    preds = pd.concat(frames, ignore_index=True)
    incomplete = pd.DataFrame([{**COORDS, "init": "b", "fraction": 0.5}])[KEYS]
    kept = preds[~in_groups(preds, incomplete)]
    assert set(zip(kept.init, kept.fraction, strict=True)) == {("a", 0.5), ("a", 1.0), ("b", 1.0)}
    table = compare(kept, TASKS, patients_of(preds), n_boot=10, incomplete=incomplete)
    assert list(table.fraction) == [1.0] and table.complete.all()
    allowed = compare(preds, TASKS, patients_of(preds), n_boot=10, incomplete=incomplete)
    assert dict(zip(allowed.fraction, allowed.complete, strict=True)) == {0.5: False, 1.0: True}


def test_summary_states_realised_share_labelled_images_and_holdout(tmp_path):
    frame = predictions(np.random.default_rng(1), 30, 2, "a", 1.0)
    coords = {**COORDS, "fraction": 0.01, "init": "a"}
    frame["fraction"] = 0.01
    results = pd.DataFrame(
        [
            {**coords, "fold": k, "test_auroc": 0.7, "holdout_auroc": 0.6 + 0.1 * k,
             "share": share, "train_images": 5, "val_images": 5 + k, "labelled_images": 10 + k}
            for k, share in enumerate([0.02, 0.025, 0.03])
        ]
    )  # fmt: skip
    row = summarise(results, frame, TASKS, patients_of(frame), 20).iloc[0]
    assert row.labelled_share == "2.5% (0.01)"  # realised, nominal in brackets
    assert row.labelled_images_mean == 11
    assert row.holdout_auroc_mean == pytest.approx(0.7)
    summary = summarise(results, frame, TASKS, patients_of(frame), 20)
    ticks, labels = fraction_ticks(summary.assign(fraction=0.01))
    assert ticks == [pytest.approx(0.025)] and labels == ["2.5% (0.01)"]
