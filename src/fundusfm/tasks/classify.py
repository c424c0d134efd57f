"""Classification runs: `pretrain` and `finetune` (FF, partial, or LF through the feature cache).

A run directory (`engine.runs`) holds `config.yaml` (the resolved settings), `checkpoint.pt` and
`best.safetensors` while training, then `predictions.csv` (one row per validation and test
image: image_id, fold, split, y_true, one score column per class), `metrics.json` (every
metric of every part, per-class tables, the training history) and `bundle/`. Once those are
written the checkpoint files go (the bundle holds the best weights) unless
`run.keep_checkpoint` is set: a grid of hundreds of ResNet-50 cells would otherwise keep
hundreds of gigabytes of optimiser state.
Every figure is recomputable from `predictions.csv`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from fundusfm.bundle import BundleMeta, provenance, save_bundle
from fundusfm.config.core import FinetuneConfig, PretrainConfig
from fundusfm.config.grid import ProbeConfig
from fundusfm.data.datasets import FoldData, load_fold
from fundusfm.data.preprocess import FOV_RULE
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.engine import distributed as ddp
from fundusfm.engine.device import resolve_device
from fundusfm.engine.loop import fit, runtime
from fundusfm.engine.predict import predict
from fundusfm.engine.runs import is_finished, prediction_frame, prepare_run
from fundusfm.errors import ConfigError
from fundusfm.evaluation.metrics import (
    Thresholds,
    choose_thresholds,
    classification_metrics,
    per_class_table,
)
from fundusfm.io import write_csv, write_json
from fundusfm.models.heads import Classifier, make_head
from fundusfm.models.inits import config_backbone
from fundusfm.tasks.classify_job import classification_job
from fundusfm.tasks.features import cached_features
from fundusfm.tasks.probe import fit_probe
from fundusfm.tasks.shift import reference_of, save_reference

STRATEGY_INIT = {"fundus": "scratch", "imagenet+fundus": "imagenet"}


def _build_model(cfg: FinetuneConfig, init: str, n_classes: int) -> Classifier:
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    backbone = config_backbone(m, cfg.data.resolution, init)
    head = make_head(m.head, backbone.num_features, n_classes, m.hidden, m.dropout)
    return Classifier(backbone, head)


def _bundle_meta(
    cfg: FinetuneConfig, data: FoldData, thresholds: Thresholds, extra: dict, backbone
) -> BundleMeta:
    origin = getattr(backbone, "origin", None)
    raw = {
        "architecture": {
            **backbone.spec(),
            "head": cfg.model.head,
            "hidden": cfg.model.hidden,
            "dropout": cfg.model.dropout,
            "outputs": len(data.task.class_names),
        },
        "task": {
            "name": data.task_name,
            "kind": data.task.kind,
            "classes": data.task.class_names,
            "thresholds": thresholds.values,
            "thresholds_validated": thresholds.validated,
            "thresholds_note": thresholds.note,
        },
        "preprocessing": {
            "resolution": cfg.data.resolution,
            "crop": cfg.data.crop.model_dump(),
            "fov_rule": FOV_RULE,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "provenance": {
            **provenance(cfg.model_dump(mode="json"), Path(cfg.data.manifest)),
            "init_source": origin,
        },
        **extra,
    }
    return BundleMeta.model_validate(raw)


def train_and_report(
    cfg: FinetuneConfig, init: str, val_fraction: float | None, extra: dict, on_epoch_end=None
) -> Path:
    """Shared body of pretrain and finetune: train, predict, score, bundle."""
    rt = runtime(cfg.train)  # joins torchrun's group, if any
    out = prepare_run(cfg)
    if is_finished(out):
        return out
    progress = cfg.run.progress and ddp.is_main()
    with ddp.main_first():  # rank 0 builds the preprocessing cache; the others then read it
        data = load_fold(cfg.data, val_fraction=val_fraction, progress=progress)
    model = _build_model(cfg, init, len(data.task.class_names))
    job = classification_job(model, data, cfg.train, cfg.method, cfg.partial_stages)
    result = fit(job, cfg.train, out, cfg.run.resume, progress, on_epoch_end)
    parts = {}
    for part in ("val", "test", "holdout"):
        if len(data.parts.get(part, [])):
            scores, labels, index = ddp.gather_predictions(
                *predict(model, ddp.shard(data.dataset(part)), rt, data.task.kind)
            )
            parts[part] = (scores, labels, data.parts[part][index])
    summary = {"best_epoch": result.best_epoch, "history": result.history}
    if ddp.is_main():
        write_run(cfg, data, out, model, parts, extra, summary)
        if not cfg.run.keep_checkpoint:
            for name in ("checkpoint.pt", "best.safetensors"):
                (out / name).unlink(missing_ok=True)
    ddp.barrier()  # every rank returns once the run folder is complete
    return out


def _shift_entry(cfg, data: FoldData, out: Path, model: Classifier, val_features) -> dict:
    """The bundle's shift reference (`tasks.shift`): the validation images' pooled features
    with the best weights (`val_features` when already extracted) and image stats."""
    reference = reference_of(
        model.backbone,
        data.dataset("val"),
        IMAGENET_MEAN,
        IMAGENET_STD,
        cfg.train.batch_size,
        val_features,
    )
    if reference is None:  # too few validation images: the bundle's shift is unavailable
        return {}
    return {"shift": save_reference(reference, out / "bundle").model_dump()}


def write_run(
    cfg,
    data: FoldData,
    out: Path,
    model: Classifier,
    parts: dict,
    extra: dict,
    summary: dict,
    val_features=None,
) -> Path:
    """predictions.csv, metrics.json and the bundle of a finished cell.

    `parts` maps "val"/"test"/"holdout" to (scores, labels, manifest rows); thresholds are
    chosen on the validation scores and applied unchanged to the other parts. metrics.json
    also states the labelled images the cell used (`labelled`: training and validation, and
    their share of the fold's pools) and whether its thresholds were chosen on data. The
    bundle also stores what the validation images looked like (`tasks.shift`).
    """
    kind, classes = data.task.kind, data.task.class_names
    ids = data.manifest.table["image_id"].to_numpy()
    val_scores, val_labels, _ = parts["val"]
    chosen = choose_thresholds(kind, val_labels, val_scores)
    frames, metrics = [], {**summary, "labelled": data.labelled, "thresholds": chosen.record()}
    for part, (scores, labels, rows) in parts.items():
        frames.append(
            prediction_frame(ids[rows], cfg.data.fold, part, kind, classes, labels, scores)
        )
        metrics[part] = classification_metrics(kind, labels, scores, chosen.values)
        metrics[f"{part}_per_class"] = per_class_table(
            kind, labels, scores, classes, chosen.values
        ).to_dict("records")
    write_csv(out / "predictions.csv", pd.concat(frames))
    extra = {**extra, **_shift_entry(cfg, data, out, model, val_features)}
    save_bundle(model, out / "bundle", _bundle_meta(cfg, data, chosen, extra, model.backbone))
    write_json(out / "metrics.json", metrics)
    return out


def run_notes(metrics: dict) -> list[str]:
    """Warnings a finished run's metrics.json carries, to print (never to hide)."""
    notes = []
    thresholds = metrics.get("thresholds") or {}
    if thresholds.get("validated") is False:
        notes.append(f"threshold not validated: {thresholds.get('note')}")
    probe = metrics.get("probe") or {}
    if probe.get("convergence_warnings"):
        notes.append(
            f"{probe['convergence_warnings']} of {probe['fits']} probe fits stopped at "
            "probe.max_iter before converging; raise it or check the features"
        )
    return notes


def probe_finetune(cfg: FinetuneConfig, probe: ProbeConfig, features_root: Path) -> Path:
    """LF through the feature cache: logistic regression on frozen features of every image.

    Gives the same outputs as `finetune(method=lf)` (its bundle holds the backbone and the
    probe as a linear head) at the cost of one feature extraction per init and resolution.
    """
    out = prepare_run(cfg)
    if is_finished(out):
        return out
    data = load_fold(cfg.data, progress=cfg.run.progress)
    kind, n_classes = data.task.kind, len(data.task.class_names)
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    backbone = config_backbone(m, cfg.data.resolution)
    device = resolve_device(cfg.train.device)
    features, _ = cached_features(
        backbone, data, features_root, cfg.train.batch_size, device, cfg.run.progress
    )
    tr, va = data.parts["train"], data.parts["val"]
    fitted = fit_probe(
        kind,
        features[tr],
        data.labels[tr],
        features[va],
        data.labels[va],
        n_classes,
        probe.Cs,
        probe.max_iter,
    )
    model = Classifier(backbone.cpu(), fitted.as_head())
    parts = {
        p: (fitted.scores(features[r], kind), data.labels[r], r)
        for p, r in data.parts.items()
        if p != "train" and len(r)
    }
    linear = cfg.model.model_copy(update={"head": "linear", "dropout": 0.0})
    cfg = cfg.model_copy(update={"model": linear})
    summary = {
        "probe": {
            "C": fitted.C,
            "val_loss": fitted.val_loss,
            "convergence_warnings": fitted.convergence_warnings,
            "fits": fitted.fits,
        }
    }
    extra = {"method": "lf", "probe": "logreg"}
    return write_run(cfg, data, out, model, parts, extra, summary, features[va])


def finetune(cfg: FinetuneConfig, on_epoch_end=None) -> Path:
    """Downstream training on one fold and fraction from any init; returns the run folder."""
    return train_and_report(cfg, cfg.model.init_name, None, {"method": cfg.method}, on_epoch_end)


def pretrain(cfg: PretrainConfig, on_epoch_end=None) -> Path:
    """Upstream supervised pretraining; `strategy` decides the starting weights."""
    init = STRATEGY_INIT[cfg.strategy]
    if cfg.model.init is not None and cfg.model.init != init:
        raise ConfigError(
            f"strategy={cfg.strategy} starts from {init!r}; "
            f"model.init={cfg.model.init!r} contradicts it (leave it unset)"
        )
    val_fraction = None if cfg.data.splits else cfg.val_fraction
    return train_and_report(
        cfg, init, val_fraction, {"pretraining": {"strategy": cfg.strategy}}, on_epoch_end
    )
