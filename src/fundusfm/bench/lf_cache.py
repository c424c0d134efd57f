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
from fundusfm.engine.loop import make_loss, resolve_device, set_trainable, train_mode
from fundusfm.errors import ConfigError
from fundusfm.models.heads import Classifier, make_head
from fundusfm.models.inits import create_backbone
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


def bench_lf(
    cfg: FinetuneConfig, fractions: list[float], folds: list[int], epochs_baseline: int = 50
) -> dict:
    """LF via the feature cache vs training heads on a frozen backbone every epoch.

    Measured in one run: one feature-extraction pass over the dataset; fitting the
    logistic-regression probes of every fold x fraction on those features; and one epoch of
    frozen-backbone head training (fold 0, fraction 1), whose per-image cost is multiplied
    out to `epochs_baseline` epochs of every fold x fraction training part (stated as such).
    """

    device = resolve_device(cfg.train.device)
    data = load_fold(cfg.data, progress=False)
    m = cfg.model
    torch.manual_seed(0)
    backbone = create_backbone(
        m.arch, m.init_name, m.imagenet_version, m.imagenet_file, m.init_bundle
    )
    rows = np.arange(len(data.manifest.table))
    dataset = CachedImages(data.cache, data.sources(rows), data.labels[rows])
    start = time.perf_counter()
    features = extract(backbone, dataset, cfg.train.batch_size, device, progress=False)
    t_extract = time.perf_counter() - start

    kind, n_classes = data.task.kind, len(data.task.class_names)
    splits = pd.read_csv(cfg.data.splits, dtype={"image_id": str})
    ids = data.manifest.table["image_id"].to_numpy()
    start, train_sizes = time.perf_counter(), []
    for fold in folds:
        for fraction in fractions:
            part = rows_of_parts(ids, fold_sets(splits, fold, fraction), cfg.data)
            tr, va = part["train"], part["val"]
            train_sizes.append(len(tr))
            fit_probe(
                kind,
                features[tr],
                data.labels[tr],
                features[va],
                data.labels[va],
                n_classes,
                ProbeConfig().Cs,
            )
    t_probes = time.perf_counter() - start

    # Baseline: one epoch of head training on the frozen backbone (fold 0, fraction 1),
    # timing the training batches only (no validation, checkpoints or loader start-up).
    train_rows = rows_of_parts(ids, fold_sets(splits, folds[0], 1.0), cfg.data)["train"]
    full = CachedImages(
        data.cache,
        data.sources(train_rows),
        data.labels[train_rows],
        cfg.train.augment,
        cfg.train.seed,
    )
    model = Classifier(backbone, make_head("linear", backbone.num_features, n_classes))
    frozen = set_trainable(model, "lf")
    model.to(device)
    train_mode(model, frozen)
    criterion = make_loss(kind, cfg.train, data.labels[train_rows], n_classes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(
        full, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.workers
    )
    batches = iter(loader)
    first = next(batches)  # loader start-up is not counted
    start = time.perf_counter()
    for images, y, _ in itertools.chain([first], batches):
        target = y.float() if kind == "multilabel" else y
        loss = criterion(model(normalise(images.to(device))), target.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_image = (time.perf_counter() - start) / len(train_rows)
    t_baseline = per_image * epochs_baseline * sum(train_sizes)
    lf_total = t_extract + t_probes
    return {
        "images": len(rows),
        "cells": len(train_sizes),
        "extract_s": t_extract,
        "probes_s": t_probes,
        "lf_via_features_s": lf_total,
        "lf_cost_vs_one_extraction": lf_total / t_extract,
        "frozen_epoch_s_per_train_image": per_image,
        f"frozen_backbone_{epochs_baseline}_epochs_s_extrapolated": t_baseline,
        "speedup_vs_frozen_backbone_training": t_baseline / lf_total,
    }
