"""Frozen features: what the backbone pools, extracted once and reused by key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fundusfm.config.core import DataConfig, SplitConfig
from fundusfm.data.datasets import load_fold
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import make_splits
from fundusfm.data.transforms import normalise
from fundusfm.models.inits import create_backbone
from fundusfm.tasks.features import cached_features
from tests.conftest import TINY_ARCH


def test_cached_features_are_the_pooled_backbone_outputs_and_are_reused(synth_set, tmp_path):
    splits = tmp_path / "splits.csv"
    make_splits(load_manifest(synth_set), SplitConfig(folds=3)).to_csv(splits, index=False)
    cfg = DataConfig(manifest=synth_set, splits=splits, resolution=32, cache=tmp_path / "cache")
    data = load_fold(cfg, progress=False)
    torch.manual_seed(0)
    backbone = create_backbone(TINY_ARCH, "scratch")
    cpu = torch.device("cpu")
    features, hit = cached_features(backbone, data, tmp_path / "f", 16, cpu, progress=False)
    assert not hit and features.shape == (len(data.manifest.table), backbone.num_features)
    first = torch.as_tensor(data.cache.read(data.sources([0])[0])).permute(2, 0, 1)[None]
    with torch.no_grad():
        direct = backbone.eval().pool(normalise(first)).numpy()[0]
    assert np.allclose(features[0], direct, atol=1e-5)
    again, hit = cached_features(backbone, data, tmp_path / "f", 16, cpu, progress=False)
    assert hit and np.array_equal(again, features)
    with torch.no_grad():  # other weights: another key, a fresh extraction
        next(backbone.parameters()).add_(1.0)
    _, hit = cached_features(backbone, data, tmp_path / "f", 16, cpu, progress=False)
    assert not hit and len(list(Path(tmp_path / "f").glob("*.npy"))) == 2
