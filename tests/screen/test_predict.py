"""Screening decisions and rows: thresholds applied as validated, every file one row."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from fundusfm.errors import ConfigError, DataError
from fundusfm.screen.predict import decided_class, decision_overlays, decisions
from tests.fakes import fundus


def bundle(kind: str, classes: list[str], thresholds: list[float]):
    return SimpleNamespace(kind=kind, classes=classes, thresholds=thresholds)


def test_binary_decision_uses_the_stored_threshold_not_the_argmax():
    probs = np.array([[0.7, 0.3], [0.8, 0.2], [0.4, 0.6]])
    assert decisions(bundle("binary", ["normal", "abnormal"], [0.25]), probs) == [
        "abnormal",
        "normal",
        "abnormal",
    ]
    assert decisions(bundle("binary", ["normal", "abnormal"], []), probs) == [
        "normal",
        "normal",
        "abnormal",
    ]


def test_multilabel_decisions_list_every_label_over_its_own_threshold():
    probs = np.array([[0.9, 0.1, 0.5], [0.1, 0.1, 0.1]])
    got = decisions(bundle("multilabel", ["dr", "amd", "glaucoma"], [0.5, 0.5, 0.4]), probs)
    assert got == ["dr;glaucoma", ""]


def test_gradcam_explains_the_decision_at_the_threshold_not_the_argmax():
    """p(abnormal) 0.3 with a validated threshold of 0.25 is called abnormal: its overlay
    must show what made it abnormal, not the map of its argmax class (normal)."""
    binary = bundle("binary", ["normal", "abnormal"], [0.25])
    assert decided_class(binary, np.array([0.7, 0.3])) == 1
    assert decided_class(binary, np.array([0.8, 0.2])) == 0
    assert decided_class(bundle("binary", ["normal", "abnormal"], []), np.array([0.7, 0.3])) == 0
    multi = bundle("multilabel", ["dr", "amd", "glaucoma"], [0.9, 0.5, 0.3])
    assert decided_class(multi, np.array([0.8, 0.2, 0.4])) == 2  # dr is the argmax, undecided
    assert decided_class(multi, np.array([0.8, 0.2, 0.1])) == 0  # none decided: the argmax
    assert decided_class(bundle("multiclass", ["a", "b", "c"], []), np.array([0.2, 0.5, 0.3])) == 1


def test_decision_overlays_ask_gradcam_for_the_decided_class(monkeypatch):
    from fundusfm.screen import predict

    asked = []

    def maps(bundle, images, targets):
        asked.extend(targets)
        return np.zeros((len(images), 8, 8), dtype=np.float32)

    monkeypatch.setattr(predict, "gradcam_maps", maps)
    images = [np.zeros((8, 8, 3), dtype=np.uint8)] * 2
    probs = np.array([[0.7, 0.3], [0.9, 0.1]])
    out = decision_overlays(bundle("binary", ["normal", "abnormal"], [0.25]), images, probs)
    assert asked == [1, 0] and out[0].shape == (8, 8, 3)


def test_predict_writes_one_row_per_file_with_its_status(tmp_path: Path):
    from fundusfm.bench.screening import random_bundle
    from fundusfm.config.screen import QualityConfig
    from fundusfm.screen.predict import screen

    folder = tmp_path / "photos"
    fundus(folder / "eye1.png", size=(96, 96), seed=1)
    fundus(folder / "eye2.png", size=(96, 96), seed=2)
    Image.new("RGB", (96, 96)).save(folder / "black.png")  # no field of view: ungradable
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    path = random_bundle("resnet18", 64, tmp_path / "bundle")
    screen(path, folder, tmp_path / "out", QualityConfig(), progress=False)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("file")
    assert set(table.index) == {"eye1.png", "eye2.png", "black.png", "broken.jpg", "notes.txt"}
    status = table["status"].to_dict()
    assert status["eye1.png"] == status["eye2.png"] == "scored"
    assert status["black.png"] == "ungradable" and status["broken.jpg"] == "unreadable"
    assert status["notes.txt"] == "unsupported"
    p = table.filter(like="p_").loc[["eye1.png", "eye2.png"]].to_numpy()
    assert (
        np.allclose(p.sum(axis=1), 1, atol=1e-5)
        and table.loc["black.png"].filter(like="p_").isna().all()
    )


def test_unreadable_reasons_are_user_words_not_class_names(tmp_path: Path, monkeypatch):
    from fundusfm.config.core import PreprocessConfig
    from fundusfm.config.screen import QualityConfig
    from fundusfm.screen import predict

    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "page.jpg").write_text("<!doctype html><html></html>")
    pre, quality = PreprocessConfig(resolution=64), QualityConfig()
    reason = {
        n: predict.prepare_item(tmp_path / n, pre, quality)["reason"]
        for n in ("zero.jpg", "page.jpg")
    }
    assert reason == {
        "zero.jpg": "empty file (0 bytes)",
        "page.jpg": "not a recognised image format (JPEG/PNG/TIFF/BMP/GIF)",
    }

    def broken(path, cfg):
        raise RuntimeError("libjpeg ran out of memory")

    monkeypatch.setattr(predict, "decode_for", broken)  # a fault no fundusfm error names
    item = predict.prepare_item(tmp_path / "zero.jpg", pre, quality)
    assert item["status"] == "unreadable"
    assert item["reason"] == "could not decode: libjpeg ran out of memory"
    assert "Error" not in predict.unreadable_reason(ValueError())


def test_a_missing_folder_or_a_full_out_is_one_error_line_saying_what_to_do(tmp_path: Path):
    """Checked before the bundle is read: `nowhere` need not be a bundle."""
    from fundusfm.cli import app
    from fundusfm.screen.predict import screen

    photos, out = tmp_path / "photos", tmp_path / "out"
    with pytest.raises(DataError, match="does not exist; give the folder that holds"):
        screen(tmp_path / "nowhere", photos, out)
    photos.mkdir()
    (out / "old").mkdir(parents=True)
    with pytest.raises(ConfigError, match="add --overwrite to replace it, or choose another"):
        screen(tmp_path / "nowhere", photos, out)
    runner = CliRunner()
    for folder in (tmp_path / "gone", photos):
        said = runner.invoke(
            app, ["predict", str(tmp_path / "nowhere"), str(folder), "--out", str(out)]
        )
        lines = said.output.strip().splitlines()
        assert said.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            said.output
        )
        assert "Traceback" not in said.output and "fundusfm does not check" not in said.output
    assert (out / "old").is_dir()  # nothing removed
