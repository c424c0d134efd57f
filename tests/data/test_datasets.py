"""CachedImages in loader workers: the epoch reaches workers kept across epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fundusfm.bench.workspace import replicated_cache
from fundusfm.config.core import AugmentConfig
from fundusfm.data.datasets import CachedImages


class Probe(CachedImages):
    """Also returns the epoch the worker saw."""

    def __getitem__(self, i: int):
        image, _, index = super().__getitem__(i)
        return image, torch.tensor([self.epoch]), index


def probe_set(tmp_path: Path, synth_set: Path, n: int = 8) -> Probe:
    image = sorted((synth_set.parent / "images").iterdir())[0]
    cache = replicated_cache(tmp_path / "cache", image, 48, n)
    sources = [Path(s) for s in cache.index]
    return Probe(cache, sources, np.zeros(n, dtype=int), AugmentConfig(rotate=30), seed=3)


def test_persistent_workers_see_set_epoch(tmp_path: Path, synth_set: Path):
    dataset = probe_set(tmp_path, synth_set)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    images = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        batches = list(loader)
        assert {int(e) for b in batches for e in b[1][:, 0]} == {epoch}
        images.append(torch.cat([b[0] for b in batches]))
    assert not torch.equal(images[0], images[1])  # a new epoch, new augmentation
    # and exactly the images an in-process read of that epoch gives
    dataset.set_epoch(2)
    assert torch.equal(images[2], torch.stack([dataset[i][0] for i in range(len(dataset))]))
