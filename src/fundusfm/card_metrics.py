"""The model card's evaluation section: metrics as recorded (a run's metrics.json beside the
bundle, point estimates; `fundusfm evaluate` output, with patient-bootstrap intervals), never
computed here. `card.model_card` puts it in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import PurePath

from fundusfm.bundle import BundleMeta

NOT_RECORDED = "not recorded in this bundle"
RUN_PARTS = {"val": "validation", "test": "test", "holdout": "held-out test"}
RUN_METRICS = ("auroc", "auprc", "sensitivity", "specificity", "balanced_accuracy", "f1_macro")


def evaluation_section(meta: BundleMeta, metrics: Sequence[dict]) -> str:
    lines = ["## Evaluation", ""]
    if meta.segmentation:
        lines.append(
            f"Metrics: {NOT_RECORDED}; `fundusfm segment eval BUNDLE MANIFEST --out OUT` "
            "scores it on images with vessel masks (Dice, clDice, per image)."
        )
    elif not metrics:
        lines.append(
            f"Metrics: {NOT_RECORDED}. `fundusfm evaluate BUNDLE MANIFEST --out OUT` scores "
            "it on a labelled set with 95% patient-bootstrap intervals; `fundusfm weights "
            "info BUNDLE --metrics OUT/metrics.json` adds them to this card."
        )
    for m in metrics:
        lines += _external(m) if "external_ci" in m else _run(meta, m)
        lines.append("")
    return "\n".join(lines).rstrip()


def short_path(path: str | None) -> str:
    """A recorded path as its folder and name: what a reader needs, not this machine's."""
    if not path:
        return "manifest"
    where = PurePath(path)
    return f"{where.parent.name}/{where.name}" if where.parent.name else where.name


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _interval(entry: dict) -> str:
    low, high = _fmt(entry.get("ci_low")), _fmt(entry.get("ci_high"))
    return f"{_fmt(entry.get('value'))} ({low} to {high})"


def _external(m: dict) -> list[str]:
    ci = m["external_ci"]
    name = short_path(m.get("manifest")) if m.get("manifest") else "an external set"
    level = round(100 * float(ci.get("level", 0.95)))
    lines = [
        f"### External validation: {name}",
        "",
        f"{ci.get('images', m.get('images'))} images of {ci.get('patients', 'n/a')} patients; "
        f"{level}% intervals from {ci.get('n_boot', 'n/a')} bootstrap resamples of patients.",
        "",
        f"| metric | value ({level}% CI) |",
        "|---|---|",
    ]
    names = ("auroc", "auprc", "sensitivity", "specificity")
    lines += [f"| {k} | {_interval(ci[k])} |" for k in names if k in ci]
    per_class = ci.get("per_class") or []
    if len(per_class) > 2:  # binary: the positive class is the headline already
        lines += ["", f"| class | images | AUROC ({level}% CI) |", "|---|---|---|"]
        lines += [f"| {c['class']} | {c['n']} | {_interval(c['auroc'])} |" for c in per_class]
    return lines


def _run(meta: BundleMeta, m: dict) -> list[str]:
    fold = config_summary(meta.provenance.config or {}).get("Fold")
    parts = [p for p in RUN_PARTS if isinstance(m.get(p), dict)]
    shown = [k for k in RUN_METRICS if any(k in m[p] for p in parts)]
    lines = [f"### The training run's own parts (fold {fold if fold is not None else 'n/a'})", ""]
    labelled = m.get("labelled") or {}
    if "train_images" in labelled:
        val = labelled.get("val_images")
        selected = f", selected on {val}" if val is not None else ""
        lines += [f"Trained on {labelled['train_images']} images{selected}.", ""]
    lines += [
        "| part | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
        *(
            f"| {RUN_PARTS[p]} | " + " | ".join(_fmt(m[p].get(k)) for k in shown) + " |"
            for p in parts
        ),
        "",
        "Point estimates only: the run's metrics.json records no confidence intervals; "
        "`fundusfm evaluate` on a held-out set gives patient-bootstrap intervals.",
    ]
    return lines


def config_summary(config: dict) -> dict[str, object]:
    """The settings a reader asks first, from the resolved config the bundle records."""
    keys = {
        "Task": ("data", "task"),
        "Fold": ("data", "fold"),
        "Labelled fraction": ("data", "fraction"),
        "Init": ("model", "init"),
        "Method": ("method",),
        "Strategy": ("strategy",),
        "Epochs": ("train", "epochs"),
        "Batch size": ("train", "batch_size"),
        "Optimiser": ("train", "optimizer"),
        "Learning rate": ("train", "lr"),
        "Seed": ("train", "seed"),
    }
    out = {}
    for label, path in keys.items():
        value = config
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            out[label] = value
    return out
