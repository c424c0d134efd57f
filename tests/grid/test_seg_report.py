"""The segmentation report's tables: per-setting summaries, paired init comparisons with
Holm-adjusted p, the headline and the methods paragraph."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fundusfm.config.core import load_config
from fundusfm.config.grid import GridConfig
from fundusfm.grid.findings import DICE, headline
from fundusfm.grid.methods import segmentation_methods
from fundusfm.grid.seg_report import compare, summarise
from fundusfm.grid.tables import WILCOXON, add_holm

BASE = {"task": "vessels", "method": "full", "resolution": 64, "fraction": 1.0}


def per_image(init: str, dice: np.ndarray) -> pd.DataFrame:
    ids = [f"img{i}" for i in range(len(dice))]
    return pd.DataFrame({**BASE, "init": init, "fold": 0, "image_id": ids, "dice": dice})


def test_paired_comparison_sees_a_consistent_gain_and_its_sign():
    rng = np.random.default_rng(0)
    scratch = rng.uniform(0.6, 0.7, 20)
    fundus = scratch + rng.uniform(0.02, 0.04, 20)  # better on every image
    images = pd.concat([per_image("scratch", scratch), per_image("fundus", fundus)])
    patients = {f"img{i}": f"p{i // 2}" for i in range(20)}  # two eyes per patient
    (row,) = compare(images, patients, n_boot=200).to_dict("records")
    a, b = row["init_a"], row["init_b"]
    sign = 1 if (a, b) == ("scratch", "fundus") else -1
    assert sign * row["difference"] == pytest.approx(-(fundus - scratch).mean())
    assert row["ci_low"] <= row["difference"] <= row["ci_high"]
    assert row["ci_low"] > 0 or row["ci_high"] < 0  # the interval excludes no difference
    assert row["wilcoxon_p"] < 0.001 and row["images"] == 20 and row["complete"]


def test_summary_has_the_mean_image_dice_of_each_setting():
    images = per_image("scratch", np.array([0.5, 0.7, 0.9]))
    results = pd.DataFrame([{**BASE, "init": "scratch", "fold": 0, "test_dice": 0.71}])
    (row,) = summarise(results, images, {}, n_boot=100).to_dict("records")
    assert row["image_dice"] == pytest.approx(0.7) and row["images"] == 3
    assert row["image_dice_ci_low"] <= 0.7 <= row["image_dice_ci_high"]
    assert row["test_dice_mean"] == pytest.approx(0.71)


def test_headline_and_methods_of_a_segmentation_grid():
    rng = np.random.default_rng(1)
    scratch = rng.uniform(0.6, 0.7, 20)
    images = pd.concat(
        [per_image("scratch", scratch), per_image("fundus", scratch + 0.03),
         per_image("imagenet", scratch + rng.normal(0, 0.01, 20))]
    )  # fmt: skip
    patients = {f"img{i}": f"p{i // 2}" for i in range(20)}
    results = pd.DataFrame(
        [
            {**BASE, "init": i, "fold": 0, "test_dice": 0.7}
            for i in ("scratch", "fundus", "imagenet")
        ]
    )
    summary = summarise(results, images, patients, n_boot=50).assign(
        folds=1, folds_expected=1, complete=True
    )
    comparisons = add_holm(compare(images, patients, n_boot=50), "wilcoxon_p")
    assert (comparisons.p_holm >= comparisons.wilcoxon_p).all() and len(comparisons) == 3
    text = headline(summary, comparisons, DICE)
    best = summary.set_index("init").loc["fundus"]
    shown = f"{best.image_dice:.3f} [{best.image_dice_ci_low:.3f}, {best.image_dice_ci_high:.3f}]"
    assert f"Best initialisation by mean per-image test Dice: fundus, {shown}" in text
    assert "3 pairwise comparisons" in text and WILCOXON in text
    cfg = load_config(GridConfig, None, ["kind=segmentation", "axes.fold=[0]"])
    methods = segmentation_methods(cfg, {}, 50)
    assert "official training images" in methods and "Holm's step-down" in methods
    assert "frozen encoder" in methods and "50 resamples" in methods
