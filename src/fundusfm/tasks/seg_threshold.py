"""The vessel threshold of a segmentation run: chosen after training, stored, reported.

`segment train` with `train.threshold.rule: max_dice` (the default) predicts the images of
`train.threshold.choose_on` (auto: the validation part when the split has one, else the
training part) with the best weights, maps the probabilities back to each image's own size
and keeps the threshold (0.01 .. 0.99) of maximum Dice over their FOV pixels pooled
(`evaluation.seg_metrics.best_threshold`). The bundle stores it (`task.thresholds`,
`thresholds_validated`, `thresholds_note`, `threshold_choice`), the run's test images and
`segment eval` on every other dataset are binarised with it, and metrics.json reports it
(`threshold`) beside the best threshold of the scored images' own masks (`optimistic_best`,
which no model could know in advance).
"""

from __future__ import annotations

import numpy as np

from fundusfm.bundle import TaskInfo, ThresholdChoice
from fundusfm.config.segment import SegThresholdConfig
from fundusfm.data.manifest import Manifest
from fundusfm.data.vessel_frame import back_to_native
from fundusfm.data.vessel_images import VesselImage, native_masks
from fundusfm.errors import ConfigError, DataError
from fundusfm.evaluation.seg_metrics import (
    BINS,
    Counts,
    ThresholdPick,
    best_threshold,
    fov_histograms,
)

OPTIMISTIC_NOTE = "chosen on this dataset's own masks: optimistic"
PART_NAMES = {"val": "validation", "train": "training"}


def threshold_part(cfg: SegThresholdConfig, parts: dict[str, np.ndarray]) -> str | None:
    """The part the threshold is chosen on (None: a fixed threshold)."""
    if cfg.rule == "fixed":
        return None
    has_val = len(parts.get("val", [])) > 0
    if cfg.choose_on == "val" and not has_val:
        raise ConfigError(
            "train.threshold.choose_on=val, but this split has no validation images: set "
            "data.val_fraction (official split), use splits with validation parts, or "
            "train.threshold.choose_on=train"
        )
    if cfg.choose_on == "auto":
        return "val" if has_val else "train"
    return cfg.choose_on


def check_choosable(part: str | None, images: list[VesselImage]) -> None:
    """Before training: the images the threshold will be chosen on hold a vessel pixel."""
    if part is not None and not any((s.vessel & s.fov).any() for s in images):
        raise DataError(
            f"the {len(images)} {PART_NAMES[part]} images have no vessel pixel inside their "
            "FOV, so no threshold can be chosen on them: set train.threshold.choose_on to "
            "the other part, or train.threshold.rule=fixed"
        )


def choose_threshold_on(
    manifest: Manifest, rows: np.ndarray, probs: np.ndarray, fov_diameter: int | None = None
) -> ThresholdPick:
    """The max-Dice threshold of these rows' probability maps (framed with `fov_diameter`,
    `data.vessel_frame`), scored at each image's own size against its masks as shipped (as
    every metric is)."""
    pos, neg = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
    for row, prob in zip(rows, probs, strict=True):
        vessel, fov = native_masks(manifest, int(row))
        p, n = fov_histograms(back_to_native(prob, fov, fov_diameter), vessel, fov)
        pos, neg = pos + p, neg + n
    return best_threshold(pos, neg, images=len(rows))


def task_thresholds(cfg: SegThresholdConfig, part: str | None, pick: ThresholdPick | None) -> dict:
    """The bundle's `task` fields of the threshold: value, validated, note and choice."""
    if part is None or pick is None:
        return {
            "thresholds": [cfg.value],
            "thresholds_validated": False,
            "thresholds_note": "fixed by train.threshold (rule fixed), not chosen on data",
            "threshold_choice": {"rule": "fixed", "chosen_on": "none"},
        }
    note = (
        f"maximum pooled Dice ({pick.dice:.4f}) over thresholds 0.01-0.99 on the "
        f"{pick.images} {PART_NAMES[part]} images"
    )
    if part == "train":  # the images it was fitted on: not a validated threshold
        note += "; not validated on held-out images (the split has no validation part)"
    choice = {"rule": "max_dice", "chosen_on": part, "images": pick.images, "dice": pick.dice}
    return {
        "thresholds": [pick.threshold],
        "thresholds_validated": part == "val",
        "thresholds_note": note,
        "threshold_choice": choice,
    }


def threshold_record(task: TaskInfo) -> dict:
    """metrics.json's `threshold`: the stored value, the rule and the images it was chosen on."""
    choice = task.threshold_choice or ThresholdChoice(rule="fixed", chosen_on="none")
    return {
        "value": float((task.thresholds or [0.5])[0]),
        "rule": choice.rule,
        "chosen_on": choice.chosen_on,
        "chosen_on_images": choice.images,
        "validated": task.thresholds_validated,
        "note": task.thresholds_note,
    }


def optimistic_best(per_image: list[Counts]) -> dict | None:
    """The threshold of maximum pooled Dice on the scored images themselves (None when they
    hold no vessel pixel): an upper reference, not a result."""
    total = sum(per_image, Counts())
    if not total.pos_hist.sum():
        return None
    pick = best_threshold(total.pos_hist, total.neg_hist, images=len(per_image))
    return {"threshold": pick.threshold, "dice": pick.dice, "note": OPTIMISTIC_NOTE}
