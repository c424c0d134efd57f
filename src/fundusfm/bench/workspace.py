"""Throw-away data for the benchmarks: a generated set with splits and caches, or a big cache.

`Workspace` generates fundus photographs (`fundusfm synth`), splits them by patient and
builds the preprocessing cache at each resolution asked for, all in a temporary folder, so
the benchmarks read exactly what training reads. `replicated_cache` makes a cache of any
size from one preprocessed image at no disk cost: every array file is a hard link to the
same file, and `index.csv` / `settings.json` are written in `ImageCache`'s format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from fundusfm.config.core import DataConfig, PreprocessConfig, SplitConfig, SynthConfig
from fundusfm.data.datasets import FoldData, load_fold
from fundusfm.data.manifest import load_manifest
from fundusfm.data.preprocess import CACHE_FORMAT, INDEX_COLUMNS, ImageCache, preprocess_image
from fundusfm.data.splits import make_splits
from fundusfm.io import write_csv, write_npy, write_text_atomic
from fundusfm.synthetic.generate import generate

TASK = "abnormal"


class Workspace:
    """A generated data set under `root`, its 5-fold splits and caches built on demand."""

    def __init__(
        self,
        root: Path,
        images: int,
        size: int,
        folds: int = 5,
        fractions: tuple[float, ...] = (1.0,),
        seed: int = 0,
    ):
        self.root = Path(root)
        cfg = SynthConfig(n=images, size=size, seed=seed, workers=0)
        self.manifest = generate(cfg, self.root / "synth", progress=False)
        self.splits = self.root / "splits.csv"
        split_cfg = SplitConfig(folds=folds, fractions=[*fractions, 1.0], task=TASK, seed=seed)
        write_csv(self.splits, make_splits(load_manifest(self.manifest), split_cfg))
        self._folds: dict[int, FoldData] = {}

    def data_config(self, resolution: int) -> DataConfig:
        return DataConfig(
            manifest=self.manifest,
            splits=self.splits,
            task=TASK,
            resolution=resolution,
            cache=self.root / "cache",
        )

    def fold(self, resolution: int) -> FoldData:
        """Fold 0 at full fraction, its cache built at `resolution` (once)."""
        if resolution not in self._folds:
            self._folds[resolution] = load_fold(self.data_config(resolution), progress=False)
        return self._folds[resolution]


def replicated_cache(directory: Path, source: Path, resolution: int, images: int) -> ImageCache:
    """A valid `ImageCache` of `images` entries, every array a hard link to one image.

    The image is `source` preprocessed at `resolution`. Where hard links are not supported,
    symbolic links are used; either way the disk holds one array.
    """
    cfg = PreprocessConfig(resolution=resolution)
    arrays = Path(directory) / "arrays"
    arrays.mkdir(parents=True)
    settings = {**cfg.model_dump(exclude={"workers"}), "format": CACHE_FORMAT}
    write_text_atomic(directory / "settings.json", json.dumps(settings, indent=2))
    pixels, info = preprocess_image(source, cfg)
    first = arrays / "000000.npy"
    write_npy(first, pixels)
    link = os.link
    rows = []
    for i in range(images):
        name = f"{i:06d}.npy"
        if i:
            try:
                link(first, arrays / name)
            except OSError:
                link = os.symlink
                link(first, arrays / name)
        rows.append({"source": f"/replicated/{i:06d}.jpg", "size": 0, "mtime_ns": 0})
        rows[-1].update(file=name, **info)
    write_csv(directory / "index.csv", pd.DataFrame(rows, columns=INDEX_COLUMNS))
    return ImageCache(directory)
