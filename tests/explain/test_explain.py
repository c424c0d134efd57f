"""Quality gate, Grad-CAM, t-SNE and folder screening, on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.metrics import road
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.config.core import FinetuneConfig, SplitConfig, load_config
from fundusfm.config.screen import QualityConfig
from fundusfm.data.decode import read_rgb
from fundusfm.data.manifest import load_manifest
from fundusfm.data.preprocess import crop_resize, decode_for
from fundusfm.data.splits import make_splits
from fundusfm.data.transforms import normalise
from fundusfm.explain.gradcam import (
    SigmoidTarget,
    explain_gradcam,
    gradcam_maps,
    lesion_overlap,
    road_scores,
)
from fundusfm.explain.tsne import separation
from fundusfm.models.loaded import load_bundle
from fundusfm.screen.quality import assess
from fundusfm.tasks.classify import finetune
from tests.conftest import TINY_ARCH

runner = CliRunner()


@pytest.fixture(scope="module")
def bundles(synth_set: Path, tmp_path_factory) -> dict:
    """Two tiny trained classifiers (binary and multilabel) on the generated set."""
    out = tmp_path_factory.mktemp("explain")
    splits = make_splits(load_manifest(synth_set), SplitConfig(folds=3, val_fraction=0.2))
    splits.to_csv(out / "splits.csv", index=False)
    made = {}
    for task in ("abnormal", "diseases"):
        sets = {
            "data.manifest": synth_set,
            "data.splits": out / "splits.csv",
            "data.cache": out / "cache",
            "data.task": task,
            "data.resolution": 64,
            "model.arch": TINY_ARCH,
            "model.init": "scratch",
            "model.hidden": 16,
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.select_metric": "loss",
            "run.out": out / task,
            "run.progress": False,
        }
        cfg = load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in sets.items()])
        made[task] = finetune(cfg) / "bundle"
    return {**made, "manifest": synth_set}


def degraded(rgb: np.ndarray) -> dict[str, np.ndarray]:
    img = Image.fromarray(rgb)
    return {  # the reason the gate must give -> the degraded image
        "out of focus": np.asarray(img.filter(ImageFilter.GaussianBlur(rgb.shape[0] / 30))),
        "under-exposed": (rgb * 0.05).astype(np.uint8),
        "over-exposed": np.clip(rgb.astype(int) * 4 + 80, 0, 255).astype(np.uint8),
        "no field of view": np.zeros_like(rgb),
    }


def test_quality_gate_on_good_and_degraded_images(synth_set: Path):
    m = load_manifest(synth_set)
    cfg = QualityConfig()
    images = [read_rgb(m.image_path(p)) for p in m.table["path"][:12]]
    assert all(assess(rgb, cfg).gradable for rgb in images)
    for rgb in images[:4]:
        for fault, bad in degraded(rgb).items():
            q = assess(bad, cfg)
            assert not q.gradable, fault
            assert any(r.startswith(fault) for r in q.reasons), (fault, q.reasons)
    off = cfg.model_copy(update={"enabled": False})
    assert assess(degraded(images[0])["under-exposed"], off).gradable


def test_lesion_overlap_is_relative_to_chance():
    lesions = np.zeros((10, 10), bool)
    lesions[:2] = True  # 20% of the image
    assert lesion_overlap(np.ones((10, 10)), lesions)["enrichment"] == pytest.approx(1.0)
    focused = lesions.astype(float)
    assert lesion_overlap(focused, lesions)["enrichment"] == pytest.approx(5.0)


@pytest.mark.slow
def test_gradcam_on_a_manifest_with_lesion_masks(bundles: dict, tmp_path: Path):
    table = explain_gradcam(
        bundles["abnormal"], tmp_path / "cam", manifest=bundles["manifest"], progress=False
    )
    n = len(load_manifest(bundles["manifest"]).table)
    assert len(table) == n and len(list((tmp_path / "cam" / "overlays").glob("*.png"))) == n
    cam = np.load(next((tmp_path / "cam" / "maps").glob("*.npy")))
    assert cam.shape == (64, 64) and cam.min() >= 0 and cam.max() <= 1.0
    assert table["road"].notna().all()
    with_lesions = table.dropna(subset=["enrichment"])
    assert len(with_lesions) > 0 and (with_lesions.lesion_area > 0).all()
    summary = json.loads((tmp_path / "cam" / "summary.json").read_text())
    assert summary["images_with_lesions"] == len(with_lesions)


def test_gradcam_cli_per_label_and_chosen_class(bundles: dict, tmp_path: Path):
    m = load_manifest(bundles["manifest"])
    files = [str(m.image_path(p)) for p in m.table["path"][:3]]
    result = runner.invoke(
        app,
        [
            "explain",
            "gradcam",
            str(bundles["diseases"]),
            *files,
            "--out",
            str(tmp_path / "ml"),
            "--no-road",
            "--engine",
            "torch",  # ONNX Runtime's probabilities: tests/screen/test_engine.py
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "ml" / "gradcam.csv")
    labels = json.loads((bundles["diseases"] / "bundle.json").read_text())["task"]["classes"]
    assert len(table) == 3 * len(labels)  # multilabel: one map per label
    result = runner.invoke(
        app,
        [
            "explain",
            "gradcam",
            str(bundles["abnormal"]),
            files[0],
            "--class",
            "1",
            "--out",
            str(tmp_path / "one"),
            "--engine",
            "torch",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "one" / "gradcam.csv")["class"].tolist() == [1]
    bad = runner.invoke(
        app,
        [
            "explain",
            "gradcam",
            str(bundles["abnormal"]),
            files[0],
            "--class",
            "nope",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code == 2 and "not one of" in bad.output


def test_tsne_panels_and_separation(bundles: dict, tmp_path: Path):
    result = runner.invoke(
        app,
        [
            "explain",
            "tsne",
            str(bundles["abnormal"]),
            "--init",
            "scratch",
            "--manifest",
            str(bundles["manifest"]),
            "--task",
            "disease",
            "--out",
            str(tmp_path / "t"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "t" / "separation.csv").set_index("model")
    assert table.index.tolist() == ["abnormal", "scratch"]
    assert (tmp_path / "t" / "tsne.png").is_file()
    embedding = pd.read_csv(tmp_path / "t" / "embedding.csv")
    assert len(embedding) == 2 * 40
    # the embedding's figures are those of its points, 5-NN folds grouped by patient
    patients = load_manifest(bundles["manifest"]).table.set_index("image_id")["patient_id"]
    for model, rows in embedding.groupby("model"):
        got = separation(
            rows[["x", "y"]].to_numpy(),
            rows["class"].to_numpy(),
            patients[rows["image_id"]].to_numpy(),
        )
        assert table.loc[model, "knn_accuracy_embedding"] == pytest.approx(got["knn_accuracy"])
        assert table.loc[model, "silhouette_embedding"] == pytest.approx(
            got["silhouette"], abs=1e-5
        )


def test_knn_separation_does_not_count_a_patients_other_images():
    # 40 patients with 8 images each at (almost) one point; the class is random per patient,
    # so only a patient's own images can tell it: chance with patient folds, ~1 with image folds
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (40, 2))
    points = np.repeat(centres, 8, axis=0) + rng.normal(0, 0.01, (320, 2))
    classes = np.repeat(rng.permutation(np.repeat(["a", "b"], 20)), 8)
    patients = np.repeat(np.arange(40), 8)
    grouped, by_image = separation(points, classes, patients), separation(points, classes)
    assert grouped["knn_accuracy"] < 0.65 and by_image["knn_accuracy"] > 0.95
    assert abs(grouped["silhouette"]) < 0.1  # the classes themselves do not cluster


def test_multilabel_road_and_gradcam_use_each_labels_sigmoid(bundles: dict, monkeypatch):
    # ROAD's noisy linear imputation (a sparse solve per map and percentile) is replaced by
    # blanking the removed pixels: the test is about the score ROAD measures, not the infill
    monkeypatch.setattr(road.NoisyLinearImputer, "__call__", lambda self, img, keep: img * keep)
    bundle = load_bundle(bundles["diseases"])
    assert bundle.kind == "multilabel"
    m, pre = load_manifest(bundles["manifest"]), bundle.preprocessing.config()
    image = crop_resize(decode_for(m.image_path(m.table.path.iat[0]), pre)[0], pre)[0]
    targets = list(range(len(bundle.classes)))  # one map per label, as explain_gradcam draws
    images = [image] * len(targets)
    maps = gradcam_maps(bundle, images, targets)
    ours = road_scores(bundle, images, maps, targets)
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in images])
    x = normalise(x, bundle.preprocessing.mean, bundle.preprocessing.std)

    def by_hand(score) -> np.ndarray:  # score(logits of one image, label) -> its probability
        hand = [lambda out, j=j: score(out, j) for j in targets]
        with torch.no_grad():
            faith = road.ROADCombined(percentiles=[20, 40, 60, 80])(x, maps, hand, bundle.model)
        return np.asarray(faith, dtype=float).reshape(-1)

    assert np.allclose(ours, by_hand(lambda out, j: torch.sigmoid(out[j])), atol=1e-6)
    softmax = by_hand(lambda out, j: torch.softmax(out, dim=-1)[j])
    assert not np.allclose(ours, softmax, rtol=0.2, atol=1e-6)  # labels compete in a softmax
    # Grad-CAM on the raw logit draws the sigmoid's map: its slope is one factor per image
    with GradCAM(model=bundle.model, target_layers=[bundle.model.backbone.net.layer4[-1]]) as cam:
        sig_maps = cam(input_tensor=x, targets=[SigmoidTarget(j) for j in targets])
    assert np.allclose(maps, sig_maps, atol=1e-4)


def test_predict_reports_every_file_and_refuses_to_overwrite(bundles: dict, tmp_path: Path):
    m = load_manifest(bundles["manifest"])
    folder = tmp_path / "in"
    (folder / "nested dir").mkdir(parents=True)
    good = [m.image_path(p) for p in m.table["path"][:5]]
    for k, p in enumerate(good):
        target = folder / ("nested dir" if k % 2 else "") / f"img {k}.png"
        Image.open(p).save(target)
    rgb = read_rgb(good[0])
    Image.fromarray(degraded(rgb)["out of focus"]).save(folder / "blurred.png")
    (folder / "page.jpg").write_text("<html>not an image</html>")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("hello")
    args = [
        "predict",
        str(bundles["abnormal"]),
        str(folder),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "0",
        "-q",
    ]
    result = runner.invoke(app, [*args, "--gradcam"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("file")
    assert len(table) == 9
    assert (table.status == "scored").sum() == 5 and table.loc[
        "nested dir/img 1.png", "decision"
    ] in (0, 1)
    assert table.loc["blurred.png", "status"] == "ungradable"
    assert "focus" in table.loc["blurred.png", "reason"]
    assert (
        table.loc["page.jpg", "status"] == "unreadable"
        and table.loc["empty.png", "status"] == "unreadable"
    )
    assert table.loc["notes.txt", "status"] == "unsupported"
    scored = table[table.status == "scored"]
    assert np.allclose(scored[["p_0", "p_1"]].sum(axis=1), 1.0)
    assert len(list((tmp_path / "out" / "gradcam").glob("*.png"))) == 5
    assert "data:image/png;base64" in (tmp_path / "out" / "report.html").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    strict = runner.invoke(app, [*args, "--overwrite", "--set", "min_focus=5.0"])
    assert strict.exit_code == 0
    assert (pd.read_csv(tmp_path / "out" / "predictions.csv").status == "scored").sum() == 0
