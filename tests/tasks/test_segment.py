"""Vessel segmentation: FOV metrics, the U-Net on our encoder, training, bundles, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from fundusfm.bundle import BundleMeta, save_bundle
from fundusfm.cli import app
from fundusfm.config.core import SplitConfig, load_config
from fundusfm.config.segment import SegmentConfig
from fundusfm.data.decode import read_mask
from fundusfm.data.manifest import load_manifest, save_manifest
from fundusfm.data.splits import make_splits
from fundusfm.data.vessel_images import rows_without_fov, square, to_native
from fundusfm.errors import ConfigError, DataError
from fundusfm.evaluation.seg_metrics import NAMES, count, scores, summary
from fundusfm.models.backbone import Backbone
from fundusfm.models.heads import Classifier, make_head
from fundusfm.models.inits import create_backbone
from fundusfm.models.loaded import load_bundle
from fundusfm.models.unet import create_unet, encoder_state_equal
from fundusfm.tasks.segment import note_derived_fov, score_images, seg_loss, train_segmentation
from tests.conftest import TINY_ARCH


def vessels(shape=(40, 48), seed=0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, bool)
    for _ in range(4):  # a few straight "vessels" 2 px wide
        r = rng.integers(4, shape[0] - 4)
        truth[r : r + 2, 3:-3] = True
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    fov = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape) / 2 - 1) ** 2
    return truth, fov


def test_perfect_prediction_scores_one_and_outside_fov_does_not_count():
    truth, fov = vessels()
    m = scores(count(truth.astype(np.float32), truth, fov, 0.5))
    for name in NAMES:
        assert m[name] == pytest.approx(1.0), name
    noisy = truth.astype(np.float32)
    noisy[~fov] = 1 - noisy[~fov]  # every pixel outside the FOV is wrong
    assert scores(count(noisy, truth, fov, 0.5)) == m
    wrong_inside = noisy.copy()
    wrong_inside[fov & truth] = 0.0
    assert scores(count(wrong_inside, truth, fov, 0.5))["dice"] == 0.0


def test_binned_auroc_and_auprc_match_sklearn():
    rng = np.random.default_rng(1)
    truth, fov = vessels((64, 64), seed=2)
    prob = np.clip(truth * 0.35 + rng.random(truth.shape) * 0.65, 0, 1)
    m = scores(count(prob, truth, fov, 0.5))
    y, p = truth[fov], prob[fov]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    assert m["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-2)
    # pooled equals the metric of all pixels together, the mean is over images
    other = count(1 - prob, truth, fov, 0.5)
    s = summary([count(prob, truth, fov, 0.5), other])
    assert s["dice_mean"] == pytest.approx((m["dice"] + scores(other)["dice"]) / 2)
    y, p = np.concatenate([y, y]), np.concatenate([p, 1 - p])
    tp, fp, fn = ((p >= 0.5) & y).sum(), ((p >= 0.5) & ~y).sum(), ((p < 0.5) & y).sum()
    assert s["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert s["specificity"] == pytest.approx(((p < 0.5) & ~y).sum() / (~y).sum())
    assert s["auroc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    assert abs(s["dice"] - s["dice_mean"]) > 0.01  # so the pooled check can tell them apart


def test_loss_ignores_pixels_outside_the_fov():
    truth, fov = vessels((32, 32))
    v, f = torch.tensor(truth[None]).float(), torch.tensor(fov[None]).float()
    logits = torch.randn(1, 1, 32, 32)
    changed = logits.clone()
    changed[0, 0][~torch.tensor(fov)] = 50.0
    a, b = seg_loss(logits, v, f, 1.0, 1.0), seg_loss(changed, v, f, 1.0, 1.0)
    assert torch.allclose(a, b)
    good = seg_loss((v * 2 - 1)[:, None] * 10, v, f, 1.0, 1.0)
    assert good < a


def test_square_and_back_keeps_geometry():
    truth, _ = vessels((40, 56))
    small = square(truth, 32, nearest=True)
    assert small.shape == (32, 32) and small.dtype == bool
    back = to_native(square(truth.astype(np.float32), 56, nearest=False), truth.shape)
    assert back.shape == truth.shape and np.allclose(back, truth)


def test_encoder_weights_are_the_bundles(tmp_path: Path):
    torch.manual_seed(0)
    backbone = Backbone("resnet18")
    model = Classifier(backbone, make_head("linear", backbone.num_features, 2))
    meta = BundleMeta.model_validate(
        {
            "architecture": {"arch": "resnet18", "head": "linear", "outputs": 2},
            "task": {"name": "t", "kind": "binary", "classes": ["0", "1"], "thresholds": [0.5]},
            "preprocessing": {"resolution": 64, "mean": [0, 0, 0], "std": [1, 1, 1]},
        }
    )
    save_bundle(model, tmp_path / "b", meta)
    cfg = load_config(SegmentConfig, None, ["model.arch=resnet18", f"model.init={tmp_path / 'b'}"])
    unet = create_unet(cfg.model)
    assert encoder_state_equal(unet, backbone.net.state_dict())
    scratch = create_unet(cfg.model.model_copy(update={"init": "scratch"}))
    assert not encoder_state_equal(scratch, backbone.net.state_dict())


def test_config_rejects_sizes_the_unet_cannot_take():
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(SegmentConfig, None, ["data.resolution=100"])
    with pytest.raises(ConfigError, match="larger than"):
        load_config(SegmentConfig, None, ["data.resolution=64", "data.patch=96"])


@pytest.fixture(scope="module")
def vessel_set(synth_set: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("seg")
    splits = make_splits(load_manifest(synth_set), SplitConfig(folds=4, val_fraction=0.15))
    splits.to_csv(out / "splits.csv", index=False)
    return {"manifest": synth_set, "splits": out / "splits.csv", "out": out}


def seg_config(vessel_set: dict, out: Path, *sets: str) -> SegmentConfig:
    base = [
        f"data.manifest={vessel_set['manifest']}",
        f"data.splits={vessel_set['splits']}",
        "data.resolution=64",
        f"model.arch={TINY_ARCH}",
        "model.init=scratch",
        "model.decoder_channels=[64, 32, 16, 16, 8]",
        "train.epochs=1",
        "train.batch_size=8",
        f"run.out={out}",
        "run.progress=false",
    ]
    return load_config(SegmentConfig, None, base + list(sets))


def test_scores_without_fov_path_count_the_images_fov_only(
    vessel_set: dict, tmp_path: Path, capsys
):
    # the same images and predictions, scored with the shipped FOV masks and without any
    m = load_manifest(vessel_set["manifest"])
    spec = m.spec.model_copy(update={"root": str(m.root)})
    bare = load_manifest(save_manifest(m.table.drop(columns="fov_path"), spec, tmp_path / "b.csv"))
    rows, rng = np.arange(8), np.random.default_rng(0)
    probs = []
    for r in rows:  # a noisy model, as unsure in the black border as anywhere else
        vessel = read_mask(m.image_path(m.table.vessel_path.iat[r]))
        probs.append(np.clip(0.45 * vessel + 0.6 * rng.random(vessel.shape), 0, 1))
    _, shipped = score_images(m, rows, np.stack(probs), 0.5, tmp_path / "a")
    _, derived = score_images(bare, rows, np.stack(probs), 0.5, tmp_path / "b")
    for name in NAMES:
        assert derived["test"][name] == pytest.approx(shipped["test"][name], abs=0.01), name
    assert (rows_without_fov(m, rows), rows_without_fov(bare, rows)) == (0, 8)
    assert note_derived_fov(bare, rows) == 8
    assert "8 images had no fov_path: FOV derived from the image" in capsys.readouterr().out


def test_frozen_encoder_does_not_change(vessel_set: dict, tmp_path: Path):
    cfg = seg_config(vessel_set, tmp_path / "run", "model.encoder=frozen", "train.epochs=2")
    torch.manual_seed(cfg.train.seed)  # the run builds its U-Net after the same seeding
    before = create_unet(cfg.model).encoder.state_dict()
    out = train_segmentation(cfg)
    bundle = load_bundle(out / "bundle")
    after = bundle.model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too
    torch.manual_seed(cfg.train.seed)
    decoder_before = create_unet(cfg.model).decoder.state_dict()
    decoder_after = bundle.model.decoder.state_dict()
    assert any(not torch.equal(decoder_before[k], decoder_after[k]) for k in decoder_before)
    assert bundle.kind == "segmentation" and bundle.meta.encoder == "frozen"
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_training_beats_a_trivial_baseline_and_cli_eval(vessel_set: dict, tmp_path: Path):
    runner = CliRunner()
    sets = [
        *(
            f"--set={s}"
            for s in [
                f"data.manifest={vessel_set['manifest']}",
                f"data.splits={vessel_set['splits']}",
                "data.resolution=96",
                "model.arch=resnet18",  # learnability: the tiny arch does not learn in 15 epochs
                "model.init=scratch",
                "train.epochs=15",
                "train.batch_size=4",
                "train.lr=0.003",
                f"run.out={tmp_path / 'run'}",
            ]
        ),
    ]
    result = runner.invoke(app, ["segment", "train", "-q", *sets])
    assert result.exit_code == 0, result.output
    assert "test" in result.output and "dice" in result.output
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    table = pd.read_csv(run / "per_image.csv")
    # a constant prediction has AUROC 0.5; calling everything vessel has Dice 2p / (1 + p),
    # p the vessel share of the test images' FOV pixels
    manifest = load_manifest(vessel_set["manifest"])
    test_ids = set(table.image_id)
    vessel = fov = 0
    for _, row in manifest.table[manifest.table.image_id.isin(test_ids)].iterrows():
        v = read_mask(manifest.image_path(row.vessel_path))
        f = read_mask(manifest.image_path(row.fov_path))
        vessel, fov = vessel + (v & f).sum(), fov + f.sum()
    p = vessel / fov
    assert metrics["auroc"] > 0.6
    assert metrics["dice"] > 2 * p / (1 + p)
    png = next((run / "probabilities").glob("*.png"))
    assert png.stem in test_ids

    result = runner.invoke(
        app,
        [
            "segment",
            "eval",
            str(run / "bundle"),
            str(vessel_set["manifest"]),
            "--out",
            str(tmp_path / "ev"),
            "--split",
            "all",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["images"] == len(manifest.table)
    assert len(list((tmp_path / "ev" / "probabilities").glob("*.png"))) == len(manifest.table)
    # the segmentation bundle's encoder can start a classifier too
    encoder = create_backbone("resnet18", str(run / "bundle"))
    assert encoder_state_equal(load_bundle(run / "bundle").model, encoder.net.state_dict())


@pytest.mark.slow
def test_segmentation_grid_runs_and_reports(vessel_set: dict, tmp_path: Path):
    from fundusfm.config.grid import GridConfig
    from fundusfm.grid.cells import cell_dir, expand, status
    from fundusfm.grid.report import build_report
    from fundusfm.grid.runner import run_grid

    sets = {
        "name": "vessels",
        "kind": "segmentation",
        "out": tmp_path / "g",
        "segment.data.manifest": vessel_set["manifest"],
        "segment.data.splits": vessel_set["splits"],
        "segment.model.arch": TINY_ARCH,
        "segment.model.decoder_channels": "[32, 16, 16, 8, 8]",
        "segment.train.epochs": 1,
        "segment.train.batch_size": 8,
        "axes.init": "{a: scratch, b: scratch}",
        "axes.method": "[full]",
        "axes.resolution": "[64]",
        "axes.fraction": "[0.5, 1.0]",
        "axes.fold": "[0, 1]",
        "external": str([{"name": "again", "manifest": str(vessel_set["manifest"])}]),
    }
    cfg = load_config(GridConfig, None, [f"{k}={v}" for k, v in sets.items()])
    cells = expand(cfg)
    assert len(cells) == 8 and cells[0].id.startswith("task=vessels/init=a/method=full/res=64")
    counts = run_grid(cfg, say=lambda _: None)
    assert counts["ran"] == 8 and counts["failed"] == 0
    assert (status(cfg).state == "done").all()
    report = build_report(cfg, n_boot=20)
    out = report.parent
    assert (out / "dice_vs_fraction.png").is_file()
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and (summary.folds == 2).all()
    assert (summary.image_dice_ci_low <= summary.image_dice_ci_high).all()
    results = pd.read_csv(out / "results.csv")
    assert "ext_again_dice" in results.columns and results.test_dice.notna().all()
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert set(comparisons.fraction) == {0.5, 1.0}
    # the same init under two labels trains the same network: no difference at all
    assert (comparisons.difference == 0).all() and (comparisons.wilcoxon_p == 1.0).all()
    # the cross-dataset matrix: each group's mean over folds of its cells' external Dice
    transfer = pd.read_csv(out / "transfer.csv")
    assert len(transfer) == 4 and (transfer.folds == 2).all()
    assert (transfer.ext_again_folds == 2).all()
    ext = [
        json.loads((cell_dir(cfg, c) / "external" / "again" / "metrics.json").read_text())
        for c in cells
        if (c.init_label, c.fraction) == ("a", 1.0)
    ]
    row = transfer[(transfer.init == "a") & (transfer.fraction == 1.0)].iloc[0]
    assert row.ext_again_dice_mean == pytest.approx(np.mean([e["external"]["dice"] for e in ext]))
    assert row.ext_again_images == len(load_manifest(vessel_set["manifest"]).table)
    assert 'id="transfer"' in report.read_text()


def test_segmentation_grid_refuses_classification_methods():
    from fundusfm.config.grid import GridConfig

    with pytest.raises(ConfigError, match="do not fit a segmentation grid"):
        load_config(GridConfig, None, ["kind=segmentation", "axes.method=[lf]", "axes.fold=[0]"])
    cfg = load_config(GridConfig, None, ["kind=segmentation", "axes.fold=[0]"])
    assert cfg.axes.method == ["frozen", "full"]
    with pytest.raises(ConfigError, match="official split is the only fold"):
        load_config(GridConfig, None, ["kind=segmentation"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(
            GridConfig, None, ["kind=segmentation", "axes.fold=[0]", "axes.resolution=[600]"]
        )


def test_a_mask_of_another_size_is_a_data_error():
    truth, fov = vessels()
    with pytest.raises(DataError, match="every mask must have the size of its image"):
        count(truth[:, :-1].astype(np.float32), truth, fov, 0.5)


def test_cldice_counts_an_empty_prediction_as_zero():
    truth, fov = vessels()
    empty = np.zeros(truth.shape, np.float32)
    assert scores(count(empty, truth, fov, 0.5))["cldice"] == 0.0
    perfect = count(truth.astype(np.float32), truth, fov, 0.5)
    mean = summary([count(empty, truth, fov, 0.5), perfect])["cldice_mean"]
    assert mean == pytest.approx(0.5)
