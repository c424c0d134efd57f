"""Segmentation runs with FOV scaling, an input form and test-time flips: recorded in the
bundle and applied identically by `segment eval` and `Bundle.predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fundusfm.bundle import parse_meta, read_preprocessing
from fundusfm.data.manifest import load_manifest
from fundusfm.data.transforms import normalise
from fundusfm.data.vessel_images import batch_of, load_images
from fundusfm.data.vessel_input import to_input
from fundusfm.engine.device import Runtime
from fundusfm.engine.predict import predict_vessels
from fundusfm.models.loaded import load_bundle
from fundusfm.models.unet import vessel_probabilities
from fundusfm.tasks.segment import evaluate_segmentation, train_segmentation
from tests.fakes import tiny_segment_config

CPU = Runtime.of(torch.device("cpu"), "auto", "auto", 8)


def test_tta_flips_are_the_mean_of_the_flipped_predictions():
    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, 3, padding=1)  # an asymmetric kernel: flips change its output
    x = torch.randn(2, 3, 12, 10)
    p = [torch.sigmoid(model(x.flip(d) if d else x)[:, 0]) for d in ((), (-1,), (-2,), (-2, -1))]
    expected = (p[0] + p[1].flip(-1) + p[2].flip(-2) + p[3].flip(-2, -1)) / 4
    with torch.no_grad():
        got = vessel_probabilities(model, x, tta_flips=True)
        plain = vessel_probabilities(model, x)
    assert torch.allclose(got, expected.detach(), atol=1e-6)
    assert torch.allclose(plain, p[0].detach()) and not torch.allclose(got, plain, atol=1e-3)


def test_a_bundle_without_the_new_fields_reads_as_before():
    raw = {
        "format_version": 2,
        "architecture": {"arch": "resnet18", "type": "unet", "outputs": 1},
        "task": {"name": "vessels", "kind": "segmentation", "classes": ["vessel"]},
        "preprocessing": {"resolution": 512, "resize": "pad to a centred square, then resize"},
    }
    pre = read_preprocessing(parse_meta(raw))
    assert (pre.fov_diameter, pre.input, pre.tta_flips) == (None, "rgb", False)


@pytest.fixture(scope="module")
def framed_run(synth_set: Path, tmp_path_factory) -> dict:
    """One epoch of a tiny U-Net with the FOV scaled to 48 px, CLAHE input and flips."""
    out = tmp_path_factory.mktemp("framed")
    extra = ["data.fov_diameter=48", "data.input=clahe", "eval.tta_flips=true"]
    cfg = tiny_segment_config(synth_set, out, *extra)
    return {"cfg": cfg, "run": train_segmentation(cfg), "manifest": synth_set, "out": out}


def test_the_bundle_records_how_images_were_framed_and_fed(framed_run: dict):
    run = framed_run["run"]
    pre = json.loads((run / "bundle" / "bundle.json").read_text())["preprocessing"]
    assert (pre["fov_diameter"], pre["input"], pre["tta_flips"]) == (48, "clahe", True)
    assert "fov_diameter" in pre["resize"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["inference"] == {"fov_diameter": 48, "input": "clahe", "tta_flips": True}


def test_bundle_predict_applies_the_recorded_input_and_flips(framed_run: dict):
    bundle = load_bundle(framed_run["run"] / "bundle")
    manifest = load_manifest(framed_run["manifest"])
    images = load_images(manifest, np.arange(3), 64, False, fov_diameter=48)
    ours = bundle.predict([s.image for s in images])
    engine = predict_vessels(bundle.model, images, CPU, input="clahe", tta_flips=True)
    assert np.allclose(ours, engine, atol=1e-6)
    x, _, _ = batch_of(images)
    with torch.no_grad():
        rgb = vessel_probabilities(bundle.model, normalise(x), tta_flips=True).numpy()
        no_flips = vessel_probabilities(bundle.model, normalise(to_input(x, "clahe"))).numpy()
    assert not np.allclose(ours, rgb, atol=1e-4) and not np.allclose(ours, no_flips, atol=1e-4)


def test_segment_eval_frames_and_feeds_another_set_as_the_run_did(framed_run: dict):
    run, out = framed_run["run"], framed_run["out"]
    metrics = evaluate_segmentation(
        run / "bundle", framed_run["manifest"], out / "eval", split="all", device="cpu"
    )
    assert metrics["inference"] == {"fov_diameter": 48, "input": "clahe", "tta_flips": True}
    tested = sorted((run / "probabilities").glob("*.png"))
    assert tested
    for png in tested:  # the run's test images, predicted again by segment eval: identical
        a, b = (
            np.asarray(Image.open(png)),
            np.asarray(Image.open(out / "eval" / "probabilities" / png.name)),
        )
        assert a.shape == b.shape and np.array_equal(a, b), png.name
    off = evaluate_segmentation(
        run / "bundle", framed_run["manifest"], out / "off", "all", "cpu", False, tta_flips=False
    )
    assert off["inference"]["tta_flips"] is False
    assert any("without test-time flips" in note for note in off["notes"])
    name = tested[0].name
    a = np.asarray(Image.open(out / "off" / "probabilities" / name))
    assert not np.array_equal(a, np.asarray(Image.open(run / "probabilities" / name)))
