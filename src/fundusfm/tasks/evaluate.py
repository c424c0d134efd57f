"""`fundusfm evaluate`: external validation of a bundle on another dataset.

The bundle is scored with its own preprocessing and thresholds; labels come from the
manifest's task (or through a label map onto the bundle's classes). Writes
`predictions.csv`, then `metrics.json` with a 95% patient-level bootstrap interval for every
metric (`external_ci`). Each image also gets its shift (`tasks.shift`: how unlike the
bundle's validation images it is); metrics.json's `shift` holds the share flagged and the
metrics with and without the flagged images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from fundusfm.bundle import bundle_notes
from fundusfm.data.datasets import CachedImages
from fundusfm.data.labels import mapping_file
from fundusfm.data.manifest import encode_labels, load_manifest, patient_of
from fundusfm.data.preprocess import build_cache, open_cache
from fundusfm.engine.device import resolve_device
from fundusfm.engine.predict import score_dataset
from fundusfm.engine.runs import prediction_frame
from fundusfm.errors import ConfigError, DataError
from fundusfm.evaluation.metrics import (
    classification_metrics,
    per_class_table,
)
from fundusfm.evaluation.stats import metric_intervals
from fundusfm.inference import scorer
from fundusfm.io import write_csv, write_json
from fundusfm.models.loaded import load_bundle
from fundusfm.tasks.shift import shift_line, shift_scorer, shift_summary


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


def _cached_images(manifest, bundle, labels, keep, cache_root: Path, progress: bool):
    """The kept rows' images, cached with the bundle's preprocessing; rows that cannot be
    read are dropped (and counted as unreadable)."""
    pre = bundle.preprocessing.config()
    report = build_cache(manifest, pre, cache_root, progress=progress)
    failed = {e[0] for e in report.errors}
    keep = np.array([i for i in keep if manifest.table["image_id"].iat[i] not in failed], int)
    kept = type(manifest)(manifest.path, manifest.table.iloc[keep], manifest.spec, manifest.root)
    image_cache = open_cache(kept, pre, cache_root)
    sources = [manifest.image_path(p).resolve() for p in manifest.table["path"].iloc[keep]]
    return CachedImages(image_cache, sources, labels[keep]), keep


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
    engine: str = "torch",
) -> dict:
    """External validation: score a bundle on another manifest with its own thresholds.

    Every figure comes with a 95% bootstrap interval that resamples patients (`external_ci`,
    `stats.metric_intervals`): an AUROC on fifty external images says little without one.
    `engine` (auto, torch, onnxruntime) runs the scoring (`fundusfm.inference`); metrics.json
    records which one ran.
    """
    dev = resolve_device(device)
    bundle = load_bundle(bundle_path, device=str(dev))
    bundle.require_classifier("evaluate")
    manifest = load_manifest(manifest_path)
    manifest.require("image_id", "path")
    manifest.require_unique_ids()  # predictions are keyed on image_id
    labels, keep = _external_labels(manifest, bundle, task, label_map)
    score = scorer(bundle, engine, progress)
    shifter = shift_scorer(bundle, score.engine)
    cache_root = cache or Path(manifest_path).parent / "cache"
    dataset, keep = _cached_images(manifest, bundle, labels, keep, cache_root, progress)
    shifts: list[dict] = []

    def score_and_shift(images):  # one pass over the images: probabilities, then shift
        shifts.extend(shifter(images))
        return score(images)

    scores, y, index = score_dataset(score_and_shift, dataset, batch_size=32)
    thresholds = bundle.thresholds or None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = manifest.table["image_id"].to_numpy()[keep][index]
    frame = prediction_frame(ids, -1, "external", bundle.kind, bundle.classes, y, scores)
    shift_frame = pd.DataFrame(shifts, index=frame.index)
    write_csv(out / "predictions.csv", pd.concat([frame, shift_frame], axis=1))
    labels = shift_frame["shift"].tolist() if "shift" in shift_frame else []
    shift = shift_summary(bundle.kind, y, scores, thresholds, labels)
    shift["notes"] = list(dict.fromkeys([*shifter.notes, shift_line(shift)]))  # the line to print
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
        "engine": score.engine,
        "engine_notes": list(score.notes),
        "images": len(y),
        "unmapped_or_unreadable": int(len(manifest.table) - len(y)),
        "bundle": str(bundle_path),
        "manifest": str(manifest_path),
        "shift": shift,
    }
    write_json(out / "metrics.json", metrics)
    return metrics
