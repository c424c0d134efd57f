"""The vessel threshold: chosen by maximum Dice after training, stored in the bundle, used by
`segment eval`; and segmentation on a dataset copy where some images have no vessel mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fundusfm.bundle import bundle_notes, parse_meta
from fundusfm.config.core import load_config
from fundusfm.config.segment import SegmentConfig, SegThresholdConfig
from fundusfm.data.adapters.vessels import import_vessels
from fundusfm.data.manifest import load_manifest
from fundusfm.data.vessel_images import (
    VesselImage,
    load_images,
    native_masks,
    seg_parts,
    to_native,
)
from fundusfm.engine.device import Runtime
from fundusfm.engine.predict import predict_vessels
from fundusfm.errors import ConfigError, DataError
from fundusfm.evaluation.seg_metrics import (
    GRID,
    ThresholdPick,
    choose_threshold,
    count,
    dice_by_threshold,
    scores,
)
from fundusfm.models.loaded import load_bundle
from fundusfm.tasks import segment
from fundusfm.tasks.seg_threshold import (
    OPTIMISTIC_NOTE,
    check_choosable,
    task_thresholds,
    threshold_part,
)
from fundusfm.tasks.segment import _bundle_meta, evaluate_segmentation, train_segmentation
from tests.conftest import TINY_ARCH
from tests.fakes import drive_tree, tiny_segment_config


def _pixels(values: dict[float, int]) -> np.ndarray:
    return np.concatenate([np.full(n, v) for v, n in values.items()])


def test_the_chooser_keeps_the_threshold_of_maximum_dice():
    # vessel pixels at 0.552 and 0.748, background at 0.345 and a few at 0.652: every
    # threshold in (0.345, 0.552] calls 20 vessel pixels and 2 background ones (Dice 40/42),
    # below it all 12 background pixels are vessel, above it half the vessels are missed
    vessel, background = _pixels({0.552: 10, 0.748: 10}), _pixels({0.345: 10, 0.652: 2})
    prob = np.concatenate([vessel, background])[None]
    truth = np.arange(prob.size)[None] < vessel.size
    pick = choose_threshold([prob], [truth], [np.ones_like(truth)])
    assert pick == ThresholdPick(0.45, pytest.approx(40 / 42), 1)  # the middle of 0.35-0.55
    # one best threshold: vessels at 0.305, background at 0.295 and 0.9
    prob = np.concatenate([_pixels({0.305: 30}), _pixels({0.295: 100, 0.9: 1})])[None]
    truth = np.arange(prob.size)[None] < 30
    pick = choose_threshold([prob], [truth], [np.ones_like(truth)])
    assert (pick.threshold, pick.dice) == (0.3, pytest.approx(60 / 61))


def test_the_chooser_pools_fov_pixels_of_all_images_like_brute_force():
    rng = np.random.default_rng(3)
    probs, truths, fovs = [], [], []
    for k in range(3):
        truth = rng.random((30, 40)) < 0.15
        probs.append(np.clip(0.3 * truth + rng.random(truth.shape) * (0.6 + 0.1 * k), 0, 1))
        truths.append(truth)
        fovs.append(rng.random(truth.shape) < 0.8)
    inside = [(p[f], t[f]) for p, t, f in zip(probs, truths, fovs, strict=True)]
    p, t = np.concatenate([a for a, _ in inside]), np.concatenate([b for _, b in inside])
    brute = np.array([2 * (t & (p >= g)).sum() / (t.sum() + (p >= g).sum()) for g in GRID])
    pick = choose_threshold(probs, truths, fovs)
    assert pick.dice == pytest.approx(brute.max())
    assert brute[list(GRID).index(pick.threshold)] == pytest.approx(brute.max())
    assert pick.threshold != 0.5 and pick.images == 3
    # the curve agrees with count() at any grid threshold, outside-FOV pixels ignored
    c = count(probs[0], truths[0], fovs[0], 0.3)
    assert dice_by_threshold(c.pos_hist, c.neg_hist, np.array([0.3]))[0] == pytest.approx(
        scores(c)["dice"]
    )
    with pytest.raises(DataError, match="no vessel pixel"):
        choose_threshold([probs[0]], [np.zeros((30, 40), bool)], [fovs[0]])


def test_threshold_settings_and_the_part_they_choose_on():
    cfg = load_config(SegmentConfig, None, [])
    assert (cfg.train.threshold.rule, cfg.train.threshold.choose_on) == ("max_dice", "auto")
    fixed = load_config(SegmentConfig, None, ["train.threshold=0.4"]).train.threshold
    assert (fixed.rule, fixed.value) == ("fixed", 0.4)  # a bare number: configs before rules
    with_val = {"train": np.arange(4), "val": np.arange(2), "test": np.arange(2)}
    without = {**with_val, "val": np.array([], int)}
    assert threshold_part(cfg.train.threshold, with_val) == "val"
    assert threshold_part(cfg.train.threshold, without) == "train"
    assert threshold_part(fixed, with_val) is None
    on_val = load_config(SegmentConfig, None, ["train.threshold.choose_on=val"]).train.threshold
    with pytest.raises(ConfigError, match="no validation images"):
        threshold_part(on_val, without)
    with pytest.raises(ConfigError, match=r"train\.threshold\.rule"):
        load_config(SegmentConfig, None, ["train.threshold.rule=youden"])
    blank = np.zeros((32, 32), bool)
    empty = VesselImage("a", np.zeros((32, 32, 3), np.uint8), blank, ~blank, (32, 32))
    with pytest.raises(DataError, match="1 validation images have no vessel pixel"):
        check_choosable("val", [empty])  # refused before training, not after it
    check_choosable(None, [empty])  # a fixed threshold needs none


def test_a_threshold_chosen_on_the_training_images_is_not_called_validated():
    """DRIVE's official split has no validation part: its threshold is fitted on the images
    the model learned from, so the bundle must not label it validated."""
    cfg = SegThresholdConfig()
    on_train = task_thresholds(cfg, "train", ThresholdPick(0.41, 0.8, 20))
    assert on_train["thresholds"] == [0.41] and not on_train["thresholds_validated"]
    assert "not validated" in on_train["thresholds_note"]
    assert task_thresholds(cfg, "val", ThresholdPick(0.41, 0.8, 4))["thresholds_validated"]
    fixed = task_thresholds(SegThresholdConfig(rule="fixed", value=0.4), None, None)
    assert fixed["thresholds"] == [0.4] and not fixed["thresholds_validated"]


def test_a_segmentation_bundle_made_before_thresholds_were_chosen_loads_unvalidated(
    synth_set: Path,
):
    cfg = SegmentConfig.model_validate({"data": {"manifest": synth_set}})
    chosen = task_thresholds(cfg.train.threshold, "val", ThresholdPick(0.37, 0.8, 5))
    raw = _bundle_meta(cfg, chosen).model_dump(mode="json", exclude_none=True)
    assert raw["task"]["thresholds"] == [0.37] and raw["task"]["thresholds_validated"]
    assert raw["task"]["threshold_choice"] == {
        "rule": "max_dice",
        "chosen_on": "val",
        "images": 5,
        "dice": 0.8,
    }
    assert parse_meta(raw).task.threshold_choice.chosen_on == "val" and not bundle_notes(
        parse_meta(raw)
    )
    older = {**raw, "task": {"name": "vessels", "kind": "segmentation", "classes": ["vessel"]}}
    older["task"]["thresholds"] = [0.5]  # what the release before wrote: 0.5, "validated"
    task = parse_meta(older).task
    assert (task.thresholds, task.thresholds_validated) == ([0.5], False)
    assert (task.threshold_choice.rule, task.threshold_choice.chosen_on) == ("fixed", "none")
    assert "not (all) chosen on validation data" in bundle_notes(parse_meta(older))[0]


@pytest.fixture(scope="module")
def tiny_run(synth_set: Path, tmp_path_factory) -> dict:
    """One epoch of a tiny U-Net on fold 0 of the generated set (it has validation parts)."""
    out = tmp_path_factory.mktemp("thr")
    cfg = tiny_segment_config(synth_set, out)
    return {"cfg": cfg, "run": train_segmentation(cfg), "manifest": synth_set}


def test_the_stored_threshold_is_the_max_dice_one_of_the_validation_images(tiny_run: dict):
    cfg, run = tiny_run["cfg"], tiny_run["run"]
    meta = json.loads((run / "bundle" / "bundle.json").read_text())["task"]
    stored = meta["thresholds"][0]
    assert meta["threshold_choice"]["rule"] == "max_dice"
    assert meta["threshold_choice"]["chosen_on"] == "val" and meta["thresholds_validated"]
    assert stored != 0.5 and "validation images" in meta["thresholds_note"]
    # recomputed from the bundle: its threshold gives the best pooled Dice of the val images
    manifest = load_manifest(tiny_run["manifest"])
    rows = seg_parts(cfg.data, manifest, cfg.train.seed).rows["val"]
    bundle = load_bundle(run / "bundle")
    rt = Runtime.of(torch.device("cpu"), "auto", "auto", 8)
    probs = predict_vessels(bundle.model, load_images(manifest, rows, 64, False), rt)
    pairs = [native_masks(manifest, r) for r in rows]
    natives = [to_native(p, v.shape) for p, (v, _) in zip(probs, pairs, strict=True)]
    p = np.concatenate([n[f] for n, (_, f) in zip(natives, pairs, strict=True)])
    t = np.concatenate([v[f] for v, f in pairs])
    brute = {g: 2 * (t & (p >= g)).sum() / (t.sum() + (p >= g).sum()) for g in GRID}
    assert brute[stored] == pytest.approx(max(brute.values()), abs=1e-6)
    assert meta["threshold_choice"]["images"] == len(rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["threshold"]["value"] == stored and metrics["threshold"]["chosen_on"] == "val"
    assert metrics["optimistic_best"]["note"] == OPTIMISTIC_NOTE


def test_segment_eval_binarises_with_the_stored_threshold(
    tiny_run: dict, tmp_path: Path, monkeypatch
):
    run = tiny_run["run"]
    stored = json.loads((run / "bundle" / "bundle.json").read_text())["task"]["thresholds"][0]
    used = []

    def recording(prob, truth, fov, threshold):
        used.append(threshold)
        return count(prob, truth, fov, threshold)

    monkeypatch.setattr(segment, "count", recording)
    metrics = evaluate_segmentation(
        run / "bundle", tiny_run["manifest"], tmp_path, None, "cpu", False
    )
    assert used and set(used) == {stored}
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["threshold"] == metrics["threshold"]
    assert (written["threshold"]["value"], written["threshold"]["rule"]) == (stored, "max_dice")
    best = written["optimistic_best"]
    assert best["note"] == OPTIMISTIC_NOTE and best["dice"] >= written["external"]["dice"] - 1e-6
    assert written["external"]["dice"] == pytest.approx(metrics["external"]["dice"])


@pytest.fixture
def partial_drive(tmp_path: Path) -> Path:
    """A DRIVE copy whose training image 22 and test image 2 lack their manual masks."""
    root = drive_tree(tmp_path / "DRIVE", missing=(22, 2))
    return import_vessels("drive", root, tmp_path / "m" / "drive.csv")


def test_segment_train_and_eval_skip_images_without_a_mask(
    partial_drive: Path, tmp_path: Path, capsys
):
    sets = [
        f"data.manifest={partial_drive}",
        "data.resolution=64",
        f"model.arch={TINY_ARCH}",
        "model.init=scratch",
        "model.decoder_channels=[32, 16, 16, 8, 8]",
        "train.epochs=1",
        "train.batch_size=2",
        f"run.out={tmp_path / 'run'}",
        "run.progress=false",
    ]
    run = train_segmentation(load_config(SegmentConfig, None, sets))
    assert "skipped 2 images without a vessel mask (train 1, test 1)" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parts"] == {"train": 1, "val": 0, "test": 1} and metrics["images"] == 1
    assert metrics["skipped_no_mask"] == {"train": 1, "val": 0, "test": 1}
    assert metrics["threshold"]["chosen_on"] == "train"  # no validation part: the train images
    ev = evaluate_segmentation(run / "bundle", partial_drive, tmp_path / "ev", None, "cpu", False)
    assert "skipped 2 images without a vessel mask" in capsys.readouterr().out
    assert (ev["images"], ev["skipped_no_mask"]) == (2, 2)


def test_a_manifest_without_any_vessel_mask_is_a_data_error(tmp_path: Path):
    root = drive_tree(tmp_path / "DRIVE", missing=(21, 22, 1, 2))
    manifest = import_vessels("drive", root, tmp_path / "m" / "drive.csv")  # imports
    cfg = load_config(SegmentConfig, None, [f"data.manifest={manifest}"])
    with pytest.raises(DataError, match="none of its 4 images has a vessel mask"):
        seg_parts(cfg.data, load_manifest(manifest), 0)
    with pytest.raises(DataError, match="none of its 4 images has a vessel mask"):
        segment._scored_rows(load_manifest(manifest), None)
