"""ViT bundles through the rest of the protocol: ONNX Runtime scores as PyTorch does (with
VisionFM's pooling and its own normalisation inside the graph), and t-SNE embeds a ViT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.inference import scorer
from fundusfm.models.loaded import load_bundle
from tests.explain.test_gradcam_vit import VIT, images, random_bundle

VFM = {
    "pool": "cls_last4",
    "input_mean": [0.423737496137619, 0.2609460651874542, 0.128403902053833],
    "input_std": [0.29482534527778625, 0.20167365670204163, 0.13668020069599152],
}


def test_onnx_scores_a_vit_as_pytorch_does(tmp_path: Path):
    bundle = load_bundle(random_bundle(tmp_path / "b", VIT, **VFM))
    batch = torch.from_numpy(np.stack(images(3))).permute(0, 3, 1, 2).contiguous()
    eager, fast = scorer(bundle, "torch"), scorer(bundle, "onnxruntime")
    assert fast.engine == "onnxruntime"
    np.testing.assert_allclose(fast(batch), eager(batch), atol=1e-4, rtol=0)
    assert not np.allclose(eager(batch)[0], eager(batch)[1])  # the images are told apart


def test_tsne_embeds_a_vit_bundle_beside_a_resnet_init(synth_set: Path, tmp_path: Path):
    vit = random_bundle(tmp_path / "vit", VIT, **VFM)
    args = ["explain", "tsne", str(vit), "--init", "scratch", "--arch", "resnet10"]
    args += ["--manifest", str(synth_set), "--task", "abnormal", "--out", str(tmp_path / "t")]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "t" / "separation.csv")
    assert len(table) == 2 and set(table.model) == {"vit", "scratch"}
    embedding = pd.read_csv(tmp_path / "t" / "embedding.csv")
    assert len(embedding) == 2 * 40
