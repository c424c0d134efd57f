"""Benchmarks that print measured figures (never pass/fail): `fundusfm bench ...`.

`bench_lf` measures the linear protocol through the feature cache (see its docstring).
`bench_cache` measures the preprocessing cache: how fast it is built from the originals, and
how fast a training loader gets normalised tensors from it compared with decoding and
preprocessing the originals every time (what a loader without a cache would do).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fundusfm.config.core import FinetuneConfig, PreprocessConfig
from fundusfm.config.grid import ProbeConfig
from fundusfm.data.datasets import CachedImages, load_fold, rows_of_parts
from fundusfm.data.manifest import Manifest
from fundusfm.data.preprocess import ImageCache, build_cache, preprocess_image
from fundusfm.data.splits import fold_sets
from fundusfm.data.transforms import normalise, to_tensor
from fundusfm.engine.device import Runtime, resolve_device
from fundusfm.engine.loop import Job, Trainer, batches_per_epoch, training_loader
from fundusfm.errors import ConfigError
from fundusfm.models.heads import Classifier, make_head
from fundusfm.models.inits import config_backbone
from fundusfm.tasks.classify_job import classification_loss, make_loss, set_trainable
from fundusfm.tasks.features import extract
from fundusfm.tasks.probe import fit_probe


def _rate(fn, items, min_seconds: float = 2.0) -> float:
    """Items per second of `fn` over `items`, repeated until at least `min_seconds` passed."""
    done, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def bench_cache(manifest: Manifest, cfg: PreprocessConfig, limit: int | None = None) -> dict:
    """Build a fresh cache in a temporary folder and time building and reading it."""
    table = manifest.table.head(limit) if limit else manifest.table
    sub = Manifest(path=manifest.path, table=table, spec=manifest.spec, root=manifest.root)
    sources = [sub.image_path(p).resolve() for p in table["path"]]
    with tempfile.TemporaryDirectory() as tmp:
        report = build_cache(sub, cfg, Path(tmp), progress=False)
        if report.errors:
            _, path, reason = report.errors[0]
            raise ConfigError(
                f"{len(report.errors)} images could not be cached (first: {path}: {reason}); "
                "run `fundusfm data check` on the manifest"
            )
        cache = ImageCache(report.directory)
        cached = _rate(lambda s: normalise(to_tensor(cache.read(s))), sources)
        original = _rate(
            lambda s: normalise(to_tensor(preprocess_image(s, cfg)[0])), sources, min_seconds=3.0
        )
    return {
        "images": len(sources),
        "resolution": cfg.resolution,
        "build_images_per_s": report.built / report.seconds,
        "build_workers": cfg.workers,
        "read_cache_images_per_s": cached,
        "decode_preprocess_images_per_s": original,
        "speedup": cached / original,
    }


def _time_probes(cfg: FinetuneConfig, data, features, fractions, folds) -> tuple[float, list]:
    """Seconds to fit the logistic-regression probe of every fold x fraction; training sizes."""
    kind, n_classes = data.task.kind, len(data.task.class_names)
    splits = pd.read_csv(cfg.data.splits, dtype={"image_id": str})
    ids = data.manifest.table["image_id"].to_numpy()
    start, train_sizes = time.perf_counter(), []
    for fold in folds:
        for fraction in fractions:
            part = rows_of_parts(ids, fold_sets(splits, fold, fraction), cfg.data)
            tr, va = part["train"], part["val"]
            train_sizes.append(len(tr))
            x_tr, x_va = features[tr], features[va]
            y_tr, y_va = data.labels[tr], data.labels[va]
            fit_probe(kind, x_tr, y_tr, x_va, y_va, n_classes, ProbeConfig().Cs)
    return time.perf_counter() - start, train_sizes


def _time_frozen_epoch(cfg: FinetuneConfig, data, backbone, device, train_rows) -> float:
    """Seconds per training image of one epoch of head training on the frozen backbone
    (on `train_rows`), through the engine's own `Trainer.epoch`; the loader's start-up
    (first batch) is not counted."""
    kind, n_classes = data.task.kind, len(data.task.class_names)
    model = Classifier(backbone, make_head("linear", backbone.num_features, n_classes))
    criterion = make_loss(kind, cfg.train, data.labels[train_rows], n_classes)
    t = cfg.train
    images = CachedImages(
        data.cache, data.sources(train_rows), data.labels[train_rows], t.augment, t.seed
    )
    job = Job(
        model=model,
        train_set=images,
        loss=classification_loss(kind, criterion),
        frozen=set_trainable(model, "lf"),
    )
    rt = Runtime(device, batch_size=t.batch_size, workers=t.workers)
    trainer = Trainer(job, t, rt, batches_per_epoch(len(images), t.batch_size)[0])
    loader, _ = training_loader(job, cfg.train, rt, drop_last=False)
    batches = iter(loader)
    first = next(batches)
    start = time.perf_counter()
    trainer.epoch(_Counted(itertools.chain([first], batches), len(loader)))
    trainer.sync()
    return (time.perf_counter() - start) / len(train_rows)


class _Counted:
    """An iterator with the length the training epoch needs for its last accumulation step."""

    def __init__(self, items, n: int):
        self.items, self.n = items, n

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return self.n


def bench_lf(
    cfg: FinetuneConfig, fractions: list[float], folds: list[int], epochs_baseline: int = 50
) -> dict:
    """LF via the feature cache vs training heads on a frozen backbone every epoch.

    Measured in one run: one feature-extraction pass over the dataset (of `cfg.model.arch`,
    any timm:NAME too, built for `cfg.data.resolution` inputs); fitting the
    logistic-regression probes of every fold x fraction on those features; and one epoch of
    frozen-backbone head training (fold 0, fraction 1), whose per-image cost is multiplied
    out to `epochs_baseline` epochs of every fold x fraction training part (stated as such).
    `lf_cost_vs_one_extraction`: the whole grid through the features over the one pass.
    """
    device = resolve_device(cfg.train.device)
    data = load_fold(cfg.data, progress=False)
    m = cfg.model
    torch.manual_seed(0)
    backbone = config_backbone(m, cfg.data.resolution)
    rows = np.arange(len(data.manifest.table))
    dataset = CachedImages(data.cache, data.sources(rows), data.labels[rows])
    start = time.perf_counter()
    features = extract(backbone, dataset, cfg.train.batch_size, device, progress=False)
    t_extract = time.perf_counter() - start
    t_probes, train_sizes = _time_probes(cfg, data, features, fractions, folds)
    splits = pd.read_csv(cfg.data.splits, dtype={"image_id": str})
    ids = data.manifest.table["image_id"].to_numpy()
    train_rows = rows_of_parts(ids, fold_sets(splits, folds[0], 1.0), cfg.data)["train"]
    per_image = _time_frozen_epoch(cfg, data, backbone, device, train_rows)
    t_baseline = per_image * epochs_baseline * sum(train_sizes)
    lf_total = t_extract + t_probes
    return {
        "arch": backbone.arch,
        "resolution": cfg.data.resolution,
        "images": len(rows),
        "feature_dim": int(features.shape[1]),
        "cells": len(train_sizes),
        "extract_s": t_extract,
        "extract_images_per_s": len(rows) / t_extract,
        "probes_s": t_probes,
        "lf_via_features_s": lf_total,
        "lf_cost_vs_one_extraction": lf_total / t_extract,
        "frozen_epoch_s_per_train_image": per_image,
        f"frozen_backbone_{epochs_baseline}_epochs_s_extrapolated": t_baseline,
        "speedup_vs_frozen_backbone_training": t_baseline / lf_total,
    }
