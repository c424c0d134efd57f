"""Model cards (`card.py`, `weights.card`): hub front matter, every section from the bundle,
metrics only as recorded, and refusals of what timm's ResNet cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fundusfm.bundle import BundleMeta, save_bundle
from fundusfm.card import model_card
from fundusfm.cli import app
from fundusfm.errors import ConfigError, WeightsError
from fundusfm.models.backbone import Backbone
from fundusfm.models.heads import Classifier, make_head
from fundusfm.weights import card, check_timm_exportable

runner = CliRunner()
SECTIONS = [
    "Model description",
    "Use with timm",
    "Intended use",
    "Out-of-scope use",
    "Training data",
    "Evaluation",
    "Limitations",
    "Licence",
    "Citation",
]


def meta(arch="resnet18", head="linear", **task) -> BundleMeta:
    """The metadata a finetune run writes (binary, thresholds chosen on validation data)."""
    return BundleMeta.model_validate(
        {
            "architecture": {"arch": arch, "head": head, "outputs": 2},
            "task": {
                "name": "abnormal",
                "kind": "binary",
                "classes": ["normal", "abnormal"],
                "thresholds": [0.42],
                **task,
            },
            "preprocessing": {"resolution": 64, "crop": {"margin": 0.05}, "fov_rule": 2},
            "provenance": {
                "config": {"data": {"task": "abnormal", "fold": 1}, "model": {"init": "imagenet"}},
                "manifest": "/data/site_a/manifest.csv",
                "manifest_sha256": "ab" * 32,
            },
            "weights_sha256": "cd" * 32,
            "method": "ff",
        }
    )


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def section(text: str, name: str) -> str:
    return text.split(f"## {name}\n")[1].split("\n## ")[0]


def run_metrics() -> dict:
    val = {"auroc": 0.9, "auprc": 0.85, "sensitivity": 0.8, "specificity": float("nan")}
    return {"val": val, "test": {**val, "auroc": 0.875}, "labelled": {"train_images": 120}}


def evaluate_metrics(classes=("normal", "abnormal")) -> dict:
    ci = {name: {"value": 0.812, "ci_low": 0.75, "ci_high": 0.87} for name in ("auroc", "auprc")}
    per_class = [{"class": c, "n": 25, "auroc": ci["auroc"]} for c in classes]
    return {
        "external_ci": {
            **ci,
            "per_class": per_class,
            "images": 50,
            "patients": 25,
            "n_boot": 1000,
            "level": 0.95,
        },
        "manifest": "/data/rfmid/manifest.csv",
    }


def test_card_front_matter_and_sections_come_from_the_bundle():
    text = model_card(meta(), 11_177_538)
    head = front_matter(text)
    assert head["library_name"] == "timm" and head["license"] == "unknown"
    assert head["pipeline_tag"] == "image-classification"
    assert {"image-classification", "fundus", "resnet18"} <= set(head["tags"])
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    about = section(text, "Model description")
    for fact in ("resnet18 + linear head, 11,177,538 parameters", "normal, abnormal", "64 px"):
        assert fact in about
    assert "margin 0.05" in about and ">= 0.42, chosen on validation data" in about
    data = section(text, "Training data")
    assert "site_a/manifest.csv, sha256 " + "ab" * 32 in data and "/data/" not in data
    assert "**Init:** imagenet" in data and "**Fold:** 1" in data
    assert "not recorded in this bundle" in section(text, "Evaluation")
    assert "Not a medical device" in section(text, "Out-of-scope use")
    assert "unspecified" in section(text, "Licence") and "Apache-2.0" in section(text, "Licence")
    assert "2408.08790" in section(text, "Citation")
    assert 'pretrained_cfg_overlay=dict(file="FOLDER/model.safetensors", num_classes=2)' in text


def test_metrics_are_reported_as_recorded_with_their_intervals():
    text = model_card(meta(), 1, [run_metrics(), evaluate_metrics()])
    evaluation = section(text, "Evaluation")
    assert "not recorded in this bundle" not in evaluation
    assert "| validation | 0.900 | 0.850 | 0.800 | n/a |" in evaluation
    assert "| test | 0.875 |" in evaluation and "records no confidence intervals" in evaluation
    assert "Trained on 120 images" in evaluation and "(fold 1)" in evaluation
    assert "External validation: rfmid/manifest.csv" in evaluation
    assert "50 images of 25 patients" in evaluation
    assert "| auroc | 0.812 (0.750 to 0.870) |" in evaluation


def test_licence_thresholds_and_heads_timm_cannot_hold():
    text = model_card(
        meta(thresholds_validated=False, thresholds_note="imported weights"), 1, license="CC-BY-4.0"
    )
    assert front_matter(text)["license"] == "cc-by-4.0"
    assert "**Weights:** CC-BY-4.0" in text
    assert "not chosen on validation data (imported weights)" in text

    mlp = meta(head="mlp")
    text = model_card(mlp, 1)
    assert front_matter(text)["pipeline_tag"] == "image-feature-extraction"
    assert "--backbone-only" in section(text, "Use with timm")
    check_timm_exportable(mlp, backbone_only=True)
    with pytest.raises(WeightsError, match="add --backbone-only"):
        check_timm_exportable(mlp, backbone_only=False)
    with pytest.raises(ConfigError, match="linear head exports whole"):
        check_timm_exportable(meta(), backbone_only=True)

    tiny = meta(arch="resnet10")
    text = model_card(tiny, 1)
    assert "library_name" not in front_matter(text) and "timm" not in front_matter(text)["tags"]
    assert "no timm export" in section(text, "Use with timm")
    with pytest.raises(WeightsError, match="timm cannot build resnet10"):
        check_timm_exportable(tiny, backbone_only=False)

    vessels = BundleMeta.model_validate(
        {
            "architecture": {"arch": "resnet18", "type": "unet", "outputs": 1},
            "task": {"name": "vessels", "kind": "segmentation", "classes": ["vessel"]},
            "preprocessing": {"resolution": 64},
        }
    )
    text = model_card(vessels, 1)
    assert "U-Net on a resnet18 encoder" in text and "image-segmentation" in text
    assert "no timm export" in text and "fundusfm segment eval" in section(text, "Evaluation")


def test_card_reads_the_runs_metrics_beside_the_bundle_and_refuses_another_models(
    tmp_path: Path,
):
    backbone = Backbone("resnet10")
    model = Classifier(backbone, make_head("linear", backbone.num_features, 2))
    bundle = save_bundle(model, tmp_path / "run" / "bundle", meta(arch="resnet10"))
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(run_metrics()))
    assert "| validation | 0.900 |" in card(bundle)

    (tmp_path / "eval.json").write_text(json.dumps(evaluate_metrics()))
    result = runner.invoke(
        app, ["weights", "info", str(bundle), "--metrics", str(tmp_path / "eval.json")]
    )
    assert result.exit_code == 0, result.output
    assert "| validation | 0.900 |" in result.output and "0.812 (0.750 to 0.870)" in result.output

    (tmp_path / "other.json").write_text(json.dumps(evaluate_metrics(("a", "b", "c"))))
    with pytest.raises(ConfigError, match="the metrics of another model"):
        card(bundle, [tmp_path / "other.json"])
    (tmp_path / "junk.json").write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(ConfigError, match="neither a training run's"):
        card(bundle, [tmp_path / "junk.json"])
