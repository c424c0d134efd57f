"""Torch datasets over the preprocessing cache, and the labelled parts of one fold.

Images come out as uint8 3xRxR tensors; normalisation happens per batch on the training
device (`transforms.normalise`). Augmentation parameters are drawn from a generator seeded by
(seed, epoch, image index), so an epoch's images are the same whatever the number of loader
workers, and a resumed run sees exactly what an uninterrupted one would. The epoch lives in
shared memory, so loader workers kept across epochs (`persistent_workers=True`) see
`set_epoch` too; with a plain attribute they would keep augmenting with the epoch they
started in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from fundusfm.config.core import AugmentConfig, DataConfig, SplitConfig
from fundusfm.data.manifest import Manifest, TaskSpec, encode_labels, load_manifest
from fundusfm.data.preprocess import ImageCache, build_cache, open_cache
from fundusfm.data.splits import fold_sets, labelled_counts, make_splits
from fundusfm.data.transforms import to_tensor
from fundusfm.errors import ConfigError, DataError


def augment(image: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Flip, rotate/scale about the centre, brightness and contrast, all from `rng`."""
    if cfg.flip and rng.random() < 0.5:
        image = TF.horizontal_flip(image)
    angle = float(rng.uniform(-cfg.rotate, cfg.rotate))
    scale = float(rng.uniform(*cfg.scale))
    if angle or scale != 1.0:
        image = TF.affine(
            image,
            angle=angle,
            translate=[0, 0],
            scale=scale,
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
    if cfg.brightness:
        image = TF.adjust_brightness(
            image, float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
        )
    if cfg.contrast:
        image = TF.adjust_contrast(image, float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)))
    return image


class CachedImages(Dataset):
    """(image, label, row) triples read from the cache; augmented when `augment` is given."""

    def __init__(
        self,
        cache: ImageCache,
        sources: list[Path],
        labels: np.ndarray,
        augment_cfg: AugmentConfig | None = None,
        seed: int = 0,
    ):
        self.cache, self.sources, self.labels = cache, sources, labels
        self.augment_cfg, self.seed = augment_cfg, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by workers

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        image = to_tensor(self.cache.read(self.sources[i]))
        if self.augment_cfg is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            image = augment(image, self.augment_cfg, rng)
        return image, torch.as_tensor(self.labels[i]), i


@dataclass
class FoldData:
    """Everything a training run needs from the data side."""

    manifest: Manifest
    task_name: str
    task: TaskSpec
    cache: ImageCache
    labels: np.ndarray  # per manifest row
    parts: dict[str, np.ndarray]  # train / val / test (/ holdout) -> manifest row indices
    labelled: dict = field(default_factory=dict)  # splits.labelled_counts of the fold

    def sources(self, rows: np.ndarray) -> list[Path]:
        paths = self.manifest.table["path"].to_numpy()[rows]
        return [self.manifest.image_path(p).resolve() for p in paths]

    def dataset(self, part: str, augment_cfg: AugmentConfig | None = None, seed: int = 0):
        rows = self.parts[part]
        return CachedImages(self.cache, self.sources(rows), self.labels[rows], augment_cfg, seed)


def rows_of_parts(ids: np.ndarray, parts_ids: dict[str, list[str]], cfg: DataConfig):
    """Manifest row indices of the train / val / test image ids of one fold and fraction."""
    row_of = {iid: i for i, iid in enumerate(ids)}
    unknown = [i for part in parts_ids.values() for i in part if i not in row_of]
    if unknown:
        raise DataError(
            f"{cfg.splits}: {len(unknown)} image ids are not in {cfg.manifest} "
            f"(first: {unknown[0]}); were the splits made from another manifest?"
        )
    parts = {
        p: np.array([row_of[i] for i in parts_ids.get(p, [])], dtype=int)
        for p in ("train", "val", "test", "holdout")
        if p != "holdout" or parts_ids.get(p)
    }
    if len(parts["train"]) == 0 or len(parts["val"]) == 0:
        raise DataError(
            f"fold {cfg.fold} at fraction {cfg.fraction} has no training or validation images"
        )
    return parts


def load_fold(cfg: DataConfig, val_fraction: float | None = None, progress: bool = True):
    """Load manifest, labels and cache, and pick the fold's parts at the configured fraction.

    Without `cfg.splits`, when `val_fraction` is given (pretraining), a patient-grouped
    stratified validation part of that size is carved out and there is no test part.
    """
    if cfg.manifest is None:
        raise ConfigError("data.manifest is not set (e.g. --set data.manifest=PATH/manifest.csv)")
    manifest = load_manifest(cfg.manifest)
    manifest.require("image_id", "path", "patient_id")
    manifest.require_unique_ids()  # rows are found by id: a repeated id would hide one
    name, task = manifest.task(cfg.task)
    labels = encode_labels(manifest, task)
    ids = manifest.table["image_id"].to_numpy()
    if cfg.splits is not None:
        splits = pd.read_csv(cfg.splits, dtype={"image_id": str, "patient_id": str})
        parts_ids = fold_sets(splits, cfg.fold, cfg.fraction)
        labelled = labelled_counts(splits, cfg.fold, cfg.fraction)
    elif val_fraction is not None:
        folds = max(2, round(1 / val_fraction))
        splits = make_splits(
            manifest, SplitConfig(folds=folds, fractions=[cfg.fraction], val_fraction=0, task=name)
        )
        held = fold_sets(splits, 0, cfg.fraction)
        parts_ids = {"train": held["train"], "val": held["test"], "test": []}
        labelled = {"train_images": len(held["train"]), "val_images": len(held["test"])}
    else:
        raise ConfigError("data.splits is not set; make one with `fundusfm split MANIFEST`")
    parts = rows_of_parts(ids, parts_ids, cfg)
    pre = cfg.preprocess()
    cache_root = cfg.cache or Path(cfg.manifest).parent / "cache"
    report = build_cache(manifest, pre, cache_root, progress=progress)
    if report.errors:
        _iid, path, reason = report.errors[0]
        raise DataError(
            f"{len(report.errors)} images could not be preprocessed (first: "
            f"{path}: {reason}); run `fundusfm data check {cfg.manifest}`"
        )
    cache = open_cache(manifest, pre, cache_root)
    return FoldData(manifest, name, task, cache, labels, parts, labelled)
