"""Every kind of bundle goes through every command that reads one, from the command line.

Kinds: pretraining, full fine-tuning (FF), linear probe (LF through the feature cache),
segmentation, the authors' layout imported from a state dict and from a pickled
DataParallel model, and a torchvision export imported back. Each reads its preprocessing
through `bundle.read_preprocessing`, with defaults for what an imported bundle lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from fundusfm.bundle import bundle_notes, parse_meta, read_meta, read_preprocessing, save_bundle
from fundusfm.cli import app
from fundusfm.cli.common import DEBUG
from fundusfm.config.core import FinetuneConfig, PretrainConfig, SplitConfig, load_config
from fundusfm.config.grid import ProbeConfig
from fundusfm.config.segment import SegmentConfig
from fundusfm.data.manifest import load_manifest
from fundusfm.data.preprocess import FOV_RULE, preprocess_image
from fundusfm.data.splits import make_splits
from fundusfm.errors import BundleError
from fundusfm.evaluation.seg_metrics import ThresholdPick
from fundusfm.evaluation.stats import auroc_interval
from fundusfm.models.loaded import load_bundle
from fundusfm.models.unet import build_unet
from fundusfm.tasks.classify import finetune, pretrain, probe_finetune
from fundusfm.tasks.seg_threshold import task_thresholds
from fundusfm.tasks.segment import _bundle_meta as segmentation_meta
from tests.conftest import TINY_ARCH

runner = CliRunner()
RES = 32
CLASSIFIERS = ["pretrain", "ff", "lf_probe", "legacy_state", "legacy_pickle", "reimported"]


def cli(*args) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _train_sets(root: Path, manifest: Path, splits: Path, name: str) -> list[str]:
    sets = {
        "data.manifest": manifest,
        "data.task": "abnormal",
        "data.cache": root / "cache",
        "data.resolution": RES,
        "model.arch": TINY_ARCH,
        "model.hidden": 16,
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.select_metric": "loss",
        "run.out": root / name,
        "run.progress": False,
    }
    if name != "pretrain":
        sets.update({"data.splits": splits, "model.init": "scratch"})
    return [f"{k}={v}" for k, v in sets.items()]


def _authors_model() -> nn.Module:
    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    net.fc = nn.Sequential(nn.Linear(512, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    return nn.DataParallel(net).eval()


@pytest.fixture(scope="module")
def kinds(synth_set: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kinds")
    splits = root / "splits.csv"
    make_splits(load_manifest(synth_set), SplitConfig(folds=3, val_fraction=0.2)).to_csv(
        splits, index=False
    )
    made = {"manifest": synth_set, "root": root}
    made["pretrain"] = (
        pretrain(
            load_config(
                PretrainConfig,
                None,
                [*_train_sets(root, synth_set, splits, "pretrain"), "strategy=fundus"],
            )
        )
        / "bundle"
    )
    ff = load_config(FinetuneConfig, None, [*_train_sets(root, synth_set, splits, "ff")])
    made["ff"] = finetune(ff) / "bundle"
    lf = ff.model_copy(
        update={"method": "lf", "run": ff.run.model_copy(update={"out": root / "lf"})}
    )
    made["lf_probe"] = probe_finetune(lf, ProbeConfig(), root / "features") / "bundle"
    seg = SegmentConfig.model_validate(
        {"data": {"manifest": str(synth_set), "resolution": 64}, "model": {"arch": TINY_ARCH}}
    )
    torch.manual_seed(0)
    unet = build_unet(TINY_ARCH, seg.model.decoder_channels)
    chosen = task_thresholds(seg.train.threshold, "val", ThresholdPick(0.5, 0.8, 4))
    made["segmentation"] = save_bundle(unet, root / "seg_bundle", segmentation_meta(seg, chosen))
    state = {k: v for k, v in _authors_model().state_dict().items()}
    torch.save(state, root / "authors_state.pth")
    torch.save(_authors_model(), root / "authors_model.pth")
    for name, source, extra in [
        ("legacy_state", "authors_state.pth", []),
        ("legacy_pickle", "authors_model.pth", ["--trust-pickle"]),
    ]:
        out = root / name
        result = cli(
            "weights", "import-legacy", root / source, "--out", out, "--resolution", RES, *extra
        )
        assert result.exit_code == 0, result.output
        made[name] = out
    exported = root / "ff_export.pth"
    assert (
        cli("weights", "export", made["ff"], "--format", "torchvision", "--out", exported).exit_code
        == 0
    )
    result = cli(
        "weights", "import-legacy", exported, "--out", root / "reimported", "--resolution", RES
    )
    assert result.exit_code == 0, result.output
    made["reimported"] = root / "reimported"
    (root / "label_map.yaml").write_text("column: abnormal\nmap: {'0': normal, '1': abnormal}\n")
    return made


def _evaluate_args(kinds: dict, kind: str, out: Path) -> list:
    args = [
        "evaluate",
        kinds[kind],
        kinds["manifest"],
        "--out",
        out,
        "--cache",
        kinds["root"] / "c",
        "--engine",  # the engines' equality is tests/screen/test_engine.py's; here the kinds
        "torch",
    ]
    if kind.startswith(("legacy", "reimported")):
        return [*args, "--label-map", kinds["root"] / "label_map.yaml"]
    return [*args, "--task", "abnormal"]


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_evaluate_predict_gradcam_export_for_every_classifier(kinds, kind, tmp_path):
    result = cli(*_evaluate_args(kinds, kind, tmp_path / "eval"), "-q")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 40
    images = Path(kinds["manifest"]).parent / "images"
    result = cli(
        "predict", kinds[kind], images, "--out", tmp_path / "screen", "--workers", 0,
        "--engine", "torch", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "screen" / "predictions.csv")
    assert (table.status == "scored").sum() + (table.status == "ungradable").sum() == 40
    two = sorted(images.glob("*.jpg"))[:2]
    result = cli(
        "explain", "gradcam", kinds[kind], *two, "--out", tmp_path / "cam", "--no-road",
        "--engine", "torch", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cam" / "overlays").glob("*.png"))) == 2
    out = tmp_path / "model.pth"
    assert (
        cli("weights", "export", kinds[kind], "--format", "torchvision", "--out", out).exit_code
        == 0
    )


def test_segmentation_bundle_evaluates_and_classifier_commands_refuse_it(kinds, tmp_path):
    seg = kinds["segmentation"]
    result = cli(
        "segment", "eval", seg, kinds["manifest"], "--out", tmp_path / "s", "--split", "all"
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["images"] == 40
    images = Path(kinds["manifest"]).parent / "images"
    for args in (
        ["evaluate", seg, kinds["manifest"], "--out", tmp_path / "e", "--task", "abnormal"],
        ["predict", seg, images, "--out", tmp_path / "p"],
        ["explain", "gradcam", seg, next(images.glob("*.jpg")), "--out", tmp_path / "g"],
        ["weights", "export", seg, "--format", "torchvision", "--out", tmp_path / "x.pth"],
    ):
        result = cli(*args)
        assert result.exit_code == 2 and "segment" in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1


def test_tsne_takes_every_kind_with_its_own_preprocessing(kinds, tmp_path):
    specs = [kinds[k] for k in [*CLASSIFIERS, "segmentation"]]
    result = cli(
        "explain", "tsne", *specs, "--manifest", kinds["manifest"], "--out", tmp_path, "-q"
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "separation.csv")
    assert len(table) == len(specs) and (table.images == 40).all()
    assert table.set_index("source").loc[str(kinds["segmentation"]), "resolution"] == 64
    assert (table.resolution[:-1] == RES).all()


def test_imported_bundle_reads_documented_defaults(kinds):
    assert "crop" not in json.loads((kinds["legacy_state"] / "bundle.json").read_text())
    pre = read_preprocessing(read_meta(kinds["legacy_state"]))
    assert pre.defaulted == ("crop",) and pre.crop.fov_threshold == 0.06
    result = cli("weights", "info", kinds["legacy_state"])
    assert "crop: not recorded, defaults used" in result.output


def test_evaluate_uses_the_bundles_crop_and_normalisation(kinds, tmp_path):
    """A bundle whose mean/std and crop margin are not the defaults is scored with its own."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for f in ("model.safetensors", "bundle.json"):
        (bundle / f).write_bytes((kinds["ff"] / f).read_bytes())
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["preprocessing"].update(mean=[0.3, 0.3, 0.3], std=[0.4, 0.5, 0.6])
    meta["preprocessing"]["crop"]["margin"] = 0.2
    (bundle / "bundle.json").write_text(json.dumps(meta))
    b = load_bundle(bundle)
    m = load_manifest(kinds["manifest"])
    rows = m.table.head(4)
    expected = b.predict(
        [preprocess_image(m.image_path(p), b.preprocessing.config())[0] for p in rows.path]
    )
    args = ["evaluate", bundle, kinds["manifest"], "--out", tmp_path / "e", "--task", "abnormal"]
    assert cli(*args, "--cache", tmp_path / "c", "--engine", "torch", "-q").exit_code == 0
    scores = pd.read_csv(tmp_path / "e" / "predictions.csv", dtype={"image_id": str})
    scores = scores.set_index("image_id").loc[rows.image_id, ["score_0", "score_1"]].to_numpy()
    assert np.allclose(scores, expected, atol=1e-5)
    default = load_bundle(kinds["ff"]).predict(
        [
            preprocess_image(m.image_path(p), load_bundle(kinds["ff"]).preprocessing.config())[0]
            for p in rows.path
        ]
    )
    assert not np.allclose(default, expected, atol=1e-3)  # the settings matter


def test_unexpected_error_is_one_line_and_debug_shows_it(kinds, tmp_path, monkeypatch):
    import fundusfm.tasks.evaluate as experiment

    def broken(*args, **kwargs):
        raise KeyError("crop")

    monkeypatch.setattr(experiment, "evaluate", broken)
    args = _evaluate_args(kinds, "ff", tmp_path / "e")
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "fundusfm evaluate failed: KeyError" in line and "--debug" in line
    try:
        result = runner.invoke(app, ["--debug", *[str(a) for a in args]])
    finally:
        DEBUG["traceback"] = False
    assert isinstance(result.exception, KeyError)


def test_evaluate_intervals_shrink_with_the_set_and_equal_the_grids(kinds, tmp_path):
    m = load_manifest(kinds["manifest"])
    half = tmp_path / "half.csv"
    m.table[m.table.patient_id.isin(sorted(m.table.patient_id.unique())[:10])].to_csv(
        half, index=False
    )
    (tmp_path / "half.yaml").write_text(
        Path(kinds["manifest"])
        .with_suffix(".yaml")
        .read_text()
        .replace("root: .", f"root: {Path(kinds['manifest']).parent}")
    )
    widths = {}
    for name, manifest in (("half", half), ("all", kinds["manifest"])):
        out = tmp_path / name
        args = ["evaluate", kinds["ff"], manifest, "--out", out, "--task", "abnormal"]
        result = cli(*args, "--cache", tmp_path / "c", "-q", "--n-boot", 300, "--engine", "torch")
        assert result.exit_code == 0 and "95% CI" in result.output, result.output
        ci = json.loads((out / "metrics.json").read_text())["external_ci"]
        widths[name] = ci["auroc"]["ci_high"] - ci["auroc"]["ci_low"]
        assert ci["patients"] == (10 if name == "half" else 20)
        assert {"auprc", "sensitivity", "specificity", "per_class"} <= ci.keys()
    assert widths["all"] < widths["half"]
    # the grid report's pooled-AUROC interval on the same predictions is the same interval
    preds = pd.read_csv(tmp_path / "all" / "predictions.csv", dtype={"image_id": str})
    patients = preds.image_id.map(dict(zip(m.table.image_id, m.table.patient_id, strict=True)))
    low, high = auroc_interval(
        "binary", preds.y_true.to_numpy(), preds[["score_0", "score_1"]].to_numpy(), patients, 300
    )
    assert (low, high) == pytest.approx((ci["auroc"]["ci_low"], ci["auroc"]["ci_high"]), abs=1e-12)


def test_commands_say_what_an_imported_bundle_lacks(kinds, tmp_path):
    notes = bundle_notes(read_meta(kinds["legacy_state"]))
    assert len(notes) == 2
    assert "not (all) chosen on validation data (imported weights)" in notes[0]
    assert "records no preprocessing crop" in notes[1]
    ours = json.loads((kinds["ff"] / "bundle.json").read_text())
    assert ours["preprocessing"]["fov_rule"] == FOV_RULE
    older = {
        **ours,
        "preprocessing": {k: v for k, v in ours["preprocessing"].items() if k != "fov_rule"},
    }
    assert any("FOV rule is not recorded" in n for n in bundle_notes(parse_meta(older)))
    result = cli(*_evaluate_args(kinds, "legacy_state", tmp_path / "e"), "-q", "--n-boot", 20)
    assert (
        result.exit_code == 0 and "note: bundle.json records no preprocessing crop" in result.output
    )
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["notes"] == notes


@pytest.mark.parametrize("kind", [*CLASSIFIERS, "segmentation"])
def test_bundle_json_round_trips_through_the_schema(kinds, kind, tmp_path):
    """Every kind's bundle.json parses into BundleMeta and is written back field for field."""
    raw = json.loads((kinds[kind] / "bundle.json").read_text())
    meta = read_meta(kinds[kind])
    assert meta.model_dump(mode="json", exclude_none=True) == raw
    bundle = load_bundle(kinds[kind])
    again = save_bundle(bundle.model, tmp_path / "again", meta)
    assert json.loads((again / "bundle.json").read_text()) == raw  # same weights, same sha256


def test_bundle_json_with_an_unknown_field_or_wrong_type_is_refused_by_name(kinds, tmp_path):
    raw = json.loads((kinds["ff"] / "bundle.json").read_text())
    unknown = {**raw, "task": {**raw["task"], "threshold": 0.3}}  # a typo of thresholds
    with pytest.raises(BundleError, match=r"task\.threshold: Extra inputs are not permitted"):
        parse_meta(unknown)
    wrong = {**raw, "preprocessing": {**raw["preprocessing"], "resolution": "big"}}
    with pytest.raises(BundleError, match=r"preprocessing\.resolution: .*integer"):
        parse_meta(wrong)
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((kinds["ff"] / "model.safetensors").read_bytes())
    (folder / "bundle.json").write_text(json.dumps(wrong))
    result = cli("weights", "info", folder)
    assert result.exit_code == 2 and "preprocessing.resolution" in result.output


def test_format_1_bundles_load_unchanged(kinds, tmp_path):
    folder = tmp_path / "v1"
    folder.mkdir()
    raw = json.loads((kinds["ff"] / "bundle.json").read_text())
    (folder / "bundle.json").write_text(json.dumps({**raw, "format_version": 1}))
    (folder / "model.safetensors").write_bytes((kinds["ff"] / "model.safetensors").read_bytes())
    x = torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8)
    assert np.array_equal(load_bundle(folder).predict(x), load_bundle(kinds["ff"]).predict(x))
    with pytest.raises(BundleError, match="bundle format 7 is not supported"):
        parse_meta({**raw, "format_version": 7})
