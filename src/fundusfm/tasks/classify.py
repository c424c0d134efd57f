"""The three model commands: `pretrain`, `finetune` and `evaluate` (external validation).

A run directory holds `config.yaml` (the resolved settings), `checkpoint.pt` and
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

import numpy as np
import pandas as pd
import torch
import yaml

from fundusfm.bundle import BundleMeta, bundle_notes, provenance, save_bundle
from fundusfm.config.core import FinetuneConfig, PretrainConfig, changed_settings, dump_config
from fundusfm.config.grid import ProbeConfig
from fundusfm.data.datasets import CachedImages, FoldData, load_fold
from fundusfm.data.labels import mapping_file
from fundusfm.data.manifest import encode_labels, load_manifest, patient_of
from fundusfm.data.preprocess import FOV_RULE, build_cache, open_cache
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.engine import distributed as ddp
from fundusfm.engine.loop import amp_dtype, fit, predict, resolve_device
from fundusfm.errors import ConfigError, DataError
from fundusfm.evaluation.metrics import (
    Thresholds,
    choose_thresholds,
    classification_metrics,
    per_class_table,
)
from fundusfm.evaluation.stats import metric_intervals
from fundusfm.io import write_json
from fundusfm.models.heads import Classifier, make_head
from fundusfm.models.inits import create_backbone
from fundusfm.models.loaded import load_bundle
from fundusfm.tasks.features import cached_features
from fundusfm.tasks.probe import fit_probe

STRATEGY_INIT = {"fundus": "scratch", "imagenet+fundus": "imagenet"}


def prediction_frame(ids, fold: int, split: str, kind: str, classes, labels, scores):
    """Rows of predictions.csv: y_true is a class index (multilabel: one y_ column per class)."""
    frame = pd.DataFrame({"image_id": ids, "fold": fold, "split": split})
    if kind == "multilabel":
        for j, c in enumerate(classes):
            frame[f"y_{c}"] = labels[:, j]
    else:
        frame["y_true"] = labels
    for j, c in enumerate(classes):
        frame[f"score_{c}"] = scores[:, j]
    return frame


def prepare_run(cfg) -> Path:
    """Create (or reopen, with --resume and the same settings) a run folder; save the config."""
    out = Path(cfg.run.out)
    with ddp.main_first():  # under torchrun only rank 0 checks and writes; the others wait
        if ddp.is_main():
            _check_and_create(cfg, out)
    return out


def _check_and_create(cfg, out: Path) -> None:
    if (out / "metrics.json").exists() and not cfg.run.resume:
        raise ConfigError(f"{out} already holds a finished run; choose another run.out")
    if (out / "checkpoint.pt").exists() and not cfg.run.resume:
        raise ConfigError(
            f"{out} holds an unfinished run: add --resume to continue it, or choose another run.out"
        )
    previous = out / "config.yaml"
    changed = changed_settings(cfg, previous, ignore=("run",)) if cfg.run.resume else []
    if changed:  # a resumed run must be the same run: only run.* settings may change
        raise ConfigError(
            f"--resume with settings that differ from {previous} in {', '.join(changed)}; "
            "resume with the same settings, or start a new run.out"
        )
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, previous)


def is_finished(out: Path) -> bool:
    """A resumed run whose outputs are all written has nothing left to do."""
    return (out / "metrics.json").is_file() and (out / "bundle").is_dir()


def _build_model(cfg: FinetuneConfig, init: str, n_classes: int) -> Classifier:
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    backbone = create_backbone(m.arch, init, m.imagenet_version, m.imagenet_file, m.init_bundle)
    head = make_head(m.head, backbone.num_features, n_classes, m.hidden, m.dropout)
    return Classifier(backbone, head)


def _bundle_meta(
    cfg: FinetuneConfig, data: FoldData, thresholds: Thresholds, extra: dict
) -> BundleMeta:
    raw = {
        "architecture": {
            "arch": cfg.model.arch,
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
        "provenance": provenance(cfg.model_dump(mode="json"), Path(cfg.data.manifest)),
        **extra,
    }
    return BundleMeta.model_validate(raw)


def train_and_report(
    cfg: FinetuneConfig, init: str, val_fraction: float | None, extra: dict, on_epoch_end=None
) -> Path:
    """Shared body of pretrain and finetune: train, predict, score, bundle."""
    device = ddp.setup(resolve_device(cfg.train.device))  # joins torchrun's group, if any
    out = prepare_run(cfg)
    if is_finished(out):
        return out
    progress = cfg.run.progress and ddp.is_main()
    with ddp.main_first():  # rank 0 builds the preprocessing cache; the others then read it
        data = load_fold(cfg.data, val_fraction=val_fraction, progress=progress)
    kind, classes = data.task.kind, data.task.class_names
    model = _build_model(cfg, init, len(classes))
    result = fit(
        model,
        data,
        cfg.train,
        out,
        cfg.method,
        cfg.partial_stages,
        cfg.run.resume,
        progress,
        on_epoch_end,
    )
    amp = amp_dtype(cfg.train.amp, device)
    eval_batch, parts = ddp.local_batch(cfg.train.batch_size), {}
    for part in ("val", "test", "holdout"):
        if len(data.parts.get(part, [])):
            scores, labels, index = ddp.gather_predictions(
                *predict(model, ddp.shard(data.dataset(part)), eval_batch, device, kind, amp)
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


def write_run(
    cfg, data: FoldData, out: Path, model: Classifier, parts: dict, extra: dict, summary: dict
) -> Path:
    """predictions.csv, metrics.json and the bundle of a finished cell.

    `parts` maps "val"/"test"/"holdout" to (scores, labels, manifest rows); thresholds are
    chosen on the validation scores and applied unchanged to the other parts. metrics.json
    also states the labelled images the cell used (`labelled`: training and validation, and
    their share of the fold's pools) and whether its thresholds were chosen on data.
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
    pd.concat(frames).to_csv(out / "predictions.csv", index=False)
    save_bundle(model, out / "bundle", _bundle_meta(cfg, data, chosen, extra))
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
    backbone = create_backbone(
        m.arch, m.init_name, m.imagenet_version, m.imagenet_file, m.init_bundle
    )
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
    return write_run(cfg, data, out, model, parts, {"method": "lf", "probe": "logreg"}, summary)


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


def _external_labels(manifest, bundle, task_name: str | None, label_map: Path | None):
    """Labels of an external manifest in the bundle's classes, and the rows that have one."""
    kind, classes = bundle.kind, bundle.classes
    if label_map is None:
        name, task = manifest.task(task_name)
        if task.kind != kind or task.class_names != classes:
            raise DataError(
                f"task {name!r} ({task.kind}, {task.class_names}) differs from the bundle's "
                f"({kind}, {classes}); pass --label-map FILE to map one onto the other"
            )
        return encode_labels(manifest, task), np.arange(len(manifest.table))

    label_map = mapping_file(label_map)  # a file, or the name of a shipped map
    # BaseLoader keeps every key and value a string: `no`, `01` or `1.0` stay as written
    spec = yaml.load(Path(label_map).read_text(), Loader=yaml.BaseLoader) or {}
    column = spec.get("column")
    nulls = ("", "null", "~", "None")
    mapping = {k: None if v in nulls else v for k, v in (spec.get("map") or {}).items()}
    default = spec.get("default")  # for values the map does not name; unset: left out
    default = None if default in nulls else default
    if kind == "multilabel":
        raise ConfigError("label maps are for binary and multiclass bundles")
    if column not in manifest.table.columns:
        raise DataError(f"{label_map}: column {column!r} is not in {manifest.path}")
    bad = sorted({str(v) for v in [*mapping.values(), default] if v is not None} - set(classes))
    if bad:
        raise ConfigError(f"{label_map}: {bad} are not classes of the bundle {classes}")
    target = manifest.table[column].map(lambda v: mapping.get(v, default))
    keep = np.flatnonzero(target.notna().to_numpy())
    if len(keep) == 0:
        seen = sorted(manifest.table[column].unique())[:10]
        raise DataError(
            f"{label_map}: no value of column {column!r} is mapped to a bundle "
            f"class; the column holds {seen}"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    return target.map(lambda v: lookup.get(v, -1)).to_numpy(), keep


def evaluate(
    bundle_path: Path,
    manifest_path: Path,
    out: Path,
    label_map: Path | None = None,
    task: str | None = None,
    cache: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    n_boot: int = 1000,
) -> dict:
    """External validation: score a bundle on another manifest with its own thresholds.

    Every figure comes with a 95% bootstrap interval that resamples patients (`external_ci`,
    `stats.metric_intervals`): an AUROC on fifty external images says little without one.
    """
    dev = resolve_device(device)
    bundle = load_bundle(bundle_path, device=str(dev))
    if bundle.kind == "segmentation":
        raise ConfigError(f"{bundle_path} segments vessels; score it with `fundusfm segment eval`")
    manifest = load_manifest(manifest_path)
    manifest.require("image_id", "path")
    manifest.require_unique_ids()  # predictions are keyed on image_id
    labels, keep = _external_labels(manifest, bundle, task, label_map)
    norm = bundle.preprocessing
    pre = norm.config()
    cache_root = cache or Path(manifest_path).parent / "cache"
    report = build_cache(manifest, pre, cache_root, progress=progress)
    failed = {e[0] for e in report.errors}
    keep = np.array([i for i in keep if manifest.table["image_id"].iat[i] not in failed], int)
    kept = type(manifest)(manifest.path, manifest.table.iloc[keep], manifest.spec, manifest.root)
    image_cache = open_cache(kept, pre, cache_root)
    sources = [manifest.image_path(p).resolve() for p in manifest.table["path"].iloc[keep]]
    dataset = CachedImages(image_cache, sources, labels[keep])
    scores, y, index = predict(
        bundle.model, dataset, 32, dev, bundle.kind, mean=norm.mean, std=norm.std
    )
    thresholds = bundle.thresholds or None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = manifest.table["image_id"].to_numpy()[keep][index]
    prediction_frame(ids, -1, "external", bundle.kind, bundle.classes, y, scores).to_csv(
        out / "predictions.csv", index=False
    )
    rows = manifest.table.iloc[keep].iloc[index]
    patients = patient_of(rows)
    metrics = {
        "external": classification_metrics(bundle.kind, y, scores, thresholds),
        "external_per_class": per_class_table(
            bundle.kind, y, scores, bundle.classes, thresholds
        ).to_dict("records"),
        "external_ci": metric_intervals(
            bundle.kind, y, scores, bundle.classes, thresholds, patients.to_numpy(), n_boot
        ),
        "thresholds_validated": bundle.thresholds_validated,
        "notes": bundle_notes(bundle.meta),
        "images": len(y),
        "unmapped_or_unreadable": int(len(manifest.table) - len(y)),
        "bundle": str(bundle_path),
        "manifest": str(manifest_path),
    }
    write_json(out / "metrics.json", metrics)
    return metrics
