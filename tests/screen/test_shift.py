"""Shift: images of another camera are flagged far more often than held-out images of the
training camera, and those are flagged at about the chosen rate (5%)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from fundusfm.config.core import CameraConfig, PretrainConfig, SynthConfig, load_config
from fundusfm.models.loaded import load_bundle
from fundusfm.screen.predict import screen
from fundusfm.synthetic.generate import generate
from fundusfm.tasks.classify import pretrain
from fundusfm.tasks.evaluate import evaluate
from fundusfm.tasks.shift import (
    CUTOFF_PERCENTILE,
    IN,
    SHIFTED,
    UNAVAILABLE,
    fit_reference,
    shift_scorer,
)
from tests.conftest import TINY_ARCH

# another camera: warmer, blurrier, noisier, more vignetting than the default one (a little
# further than the demo's external look, tint (1.12, 0.92, 0.78), blur 2, noise 0.04, which
# this 2-epoch ResNet-10 flags at ~38% against ~12%)
OTHER_CAMERA = CameraConfig(tint=(1.2, 0.88, 0.72), blur_max=3.0, noise_max=0.05, vignetting=0.5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny classifier trained on one camera; held-out images of it and of another."""
    root = tmp_path_factory.mktemp("shift")
    sets = {
        "train": SynthConfig(n=120, size=96, seed=11, workers=1),
        "same": SynthConfig(n=120, size=96, seed=12, workers=1),
        "other": SynthConfig(n=60, size=96, seed=13, workers=1, camera=OTHER_CAMERA),
    }
    manifests = {k: generate(c, root / k, progress=False) for k, c in sets.items()}
    sets_ = {
        "data.manifest": manifests["train"],
        "data.cache": root / "cache",
        "data.resolution": 64,
        "data.task": "abnormal",
        "model.arch": TINY_ARCH,
        "model.hidden": 16,
        "strategy": "fundus",
        "val_fraction": 0.4,
        "train.epochs": 2,
        "train.batch_size": 16,
        "train.lr": 0.001,
        "train.select_metric": "loss",
        "run.out": root / "run",
        "run.progress": False,
    }
    cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in sets_.items()])
    run = pretrain(cfg)
    return {"root": root, "bundle": run / "bundle", "manifests": manifests}


def _screen(trained: dict, name: str) -> pd.DataFrame:
    out = trained["root"] / f"screen_{name}"
    done = screen(
        trained["bundle"],
        trained["manifests"][name].parent / "images",
        out,
        progress=False,
        workers=0,
        overwrite=True,
    )
    return done.table[done.table.status == "scored"]


def test_another_camera_is_flagged_far_more_often_than_the_training_camera(trained):
    meta = json.loads((trained["bundle"] / "bundle.json").read_text())
    assert meta["shift"]["method"] == "mahalanobis-pca-ledoitwolf"
    assert meta["shift"]["cutoff_percentile"] == CUTOFF_PERCENTILE
    same, other = _screen(trained, "same"), _screen(trained, "other")
    assert set(same["shift"]) <= {IN, SHIFTED} and set(other["shift"]) <= {IN, SHIFTED}
    share_same = (same["shift"] == SHIFTED).mean()
    share_other = (other["shift"] == SHIFTED).mean()
    print(
        f"flagged: other camera {share_other:.3f} (n={len(other)}), "
        f"held-out same camera {share_same:.3f} (n={len(same)}), "
        f"image stats: other {other.shift_image_stats.mean():.3f}, "
        f"same {same.shift_image_stats.mean():.3f}"
    )
    assert share_other >= 0.5 and share_other >= 2 * share_same
    # about the chosen 5%: the cut-off is the 95th percentile of n_val = 60 validation
    # scores, so the rate of new images above it has sd ~ sqrt(.05 * .95 / 61) = 0.028,
    # and n = 120 held-out images add sd 0.020: 0.05 + 3 * 0.034 ~ 0.15
    assert share_same <= 0.15
    p = same["shift_percentile"].to_numpy()
    assert ((p >= 0) & (p <= 100)).all() and np.isfinite(same["shift_distance"]).all()


def test_evaluate_reports_the_share_flagged_and_metrics_without_them(trained):
    metrics = evaluate(
        trained["bundle"],
        trained["manifests"]["other"],
        trained["root"] / "eval_other",
        task="abnormal",
        cache=trained["root"] / "cache",
        device="cpu",
        progress=False,
        n_boot=20,
    )
    shift = metrics["shift"]
    assert shift["available"] and 0 <= shift["flagged_share"] <= 1
    assert shift["n"] == metrics["images"]
    assert shift["metrics_all"]["auroc"] == pytest.approx(metrics["external"]["auroc"], nan_ok=True)
    assert set(shift["metrics_in_distribution"]) == set(shift["metrics_all"])
    preds = pd.read_csv(trained["root"] / "eval_other" / "predictions.csv")
    assert {"shift_distance", "shift_percentile", "shift"} <= set(preds.columns)
    assert (preds["shift"] == SHIFTED).sum() == shift["n_flagged"]
    assert shift["notes"][-1].startswith("shift:")


def test_a_bundle_without_a_reference_loads_and_says_unavailable(trained, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(trained["bundle"], old)
    meta = json.loads((old / "bundle.json").read_text())
    del meta["shift"]
    (old / "bundle.json").write_text(json.dumps(meta))
    (old / "shift.safetensors").unlink()
    shifter = shift_scorer(load_bundle(old))
    assert not shifter.available and "unavailable" in shifter.notes[0]
    images = trained["manifests"]["same"].parent / "images"
    done = screen(old, images, tmp_path / "out", progress=False, workers=0)
    scored = done.table[done.table.status == "scored"]
    assert (scored["shift"] == UNAVAILABLE).all() and scored["shift_distance"].isna().all()
    assert any("unavailable" in n for n in done.notes)


def test_validation_distances_are_cross_fitted_so_gaussian_data_is_flagged_at_5_percent():
    rng = np.random.default_rng(0)
    val, new = rng.normal(size=(200, 64)), rng.normal(size=(4000, 64))
    ref = fit_reference(val, rng.normal(size=(200, 6)))
    _, _, combined = ref.score(new, rng.normal(size=(4000, 6)))
    share = float((combined > ref.cutoff()).mean())
    assert 0.02 <= share <= 0.10, share  # the cut-off of 200 distances: sd ~ 0.015
    assert fit_reference(val[:5], np.zeros((5, 6))) is None  # too few validation images
