"""Screening decisions and rows: thresholds applied as validated, every file one row."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
from PIL import Image

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
