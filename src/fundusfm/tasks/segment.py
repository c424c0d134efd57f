"""Vessel segmentation runs: `fundusfm segment train` and `fundusfm segment eval`.

A run folder holds `config.yaml`, `checkpoint.pt` while training (resumable with
--resume), then `per_image.csv` (every metric of every test image, and of the second
observer where the dataset has one), `metrics.json` (pooled and mean metrics, history),
`probabilities/<image_id>.png` (8-bit vessel probability at the image's own size) and
`bundle/` (task kind `segmentation`). Loss: BCE + soft Dice, both inside the FOV only.

Images are framed as `data.fov_diameter` says (`data.vessel_frame`: a square resize, or the
FOV scaled to a fixed width), fed in the `data.input` form, predicted with the test-time
flips of `eval.tta_flips`, and mapped back to native pixels before scoring; the bundle
records all three, so `segment eval` treats another dataset the same way. Images are
binarised with the threshold chosen after training and stored in the bundle
(`tasks.seg_threshold`). Rows without a vessel mask (a partial copy of a dataset) are left
out of training and scoring, and the run says how many ("skipped 3 images without a vessel
mask"; metrics.json `skipped_no_mask`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fundusfm.bundle import BundleMeta, bundle_notes, provenance, save_bundle
from fundusfm.config.segment import InputMode, SegmentConfig
from fundusfm.data.decode import read_mask
from fundusfm.data.manifest import Manifest, load_manifest
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.data.vessel_frame import back_to_native
from fundusfm.data.vessel_images import (
    TEST_NAMES,
    VesselImage,
    VesselTrainSet,
    has_vessel_mask,
    load_images,
    native_masks,
    rows_without_fov,
    seg_parts,
)
from fundusfm.engine import distributed as ddp
from fundusfm.engine.device import Runtime, resolve_device
from fundusfm.engine.loop import Job, fit, runtime
from fundusfm.engine.predict import predict_vessels, predict_vessels_sharded
from fundusfm.engine.runs import is_finished, prepare_run
from fundusfm.errors import ConfigError, DataError, WeightsError
from fundusfm.evaluation.seg_metrics import NAMES, Counts, count, scores, summary
from fundusfm.io import write_csv, write_json
from fundusfm.models.loaded import load_bundle
from fundusfm.models.unet import create_unet
from fundusfm.tasks.seg_threshold import (
    check_choosable,
    choose_threshold_on,
    optimistic_best,
    task_thresholds,
    threshold_part,
    threshold_record,
)


def seg_loss(logits, vessel, fov, bce_weight: float, dice_weight: float) -> torch.Tensor:
    """BCE averaged over FOV pixels plus 1 - soft Dice over the batch's FOV pixels."""
    logits = logits[:, 0].float()
    inside = fov.sum().clamp(min=1.0)
    bce = (F.binary_cross_entropy_with_logits(logits, vessel, reduction="none") * fov).sum()
    p = torch.sigmoid(logits) * fov
    dice = 1 - (2 * (p * vessel).sum() + 1) / (p.sum() + (vessel * fov).sum() + 1)
    return bce_weight * bce / inside + dice_weight * dice


def _val_dice(
    model, images: list[VesselImage], rt: Runtime, threshold: float, input: InputMode = "rgb"
) -> float:
    """Pooled validation Dice (at the training size, no test-time flips); under torchrun each
    rank counts its share and all are summed."""
    mine = images[ddp.rank() :: ddp.world_size()]
    probs = predict_vessels(model, mine, rt, input=input)
    total = Counts()
    for c in ddp.gather_list(
        [count(p, s.vessel, s.fov, threshold) for s, p in zip(mine, probs, strict=True)]
    ):
        total = total + c
    return scores(total)["dice"]


def segmentation_job(model, train_images, val_images, cfg: SegmentConfig) -> Job:
    """The loop's job: BCE + Dice inside the FOV, the best validation Dice kept (or, with no
    validation part, the last epoch). `encoder=frozen` uses smp's own freeze: no gradients,
    and the encoder's BatchNorm statistics stay fixed in train()."""
    t = cfg.train
    if t.patience and not val_images:
        raise ConfigError(
            f"train.patience={t.patience} needs a validation part to stop on; set "
            "data.val_fraction (official split) or use splits with validation parts"
        )
    if cfg.model.encoder == "frozen":
        model.freeze_encoder()

    def loss(logits: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        vessel, fov = targets
        return seg_loss(logits, vessel, fov, t.bce_weight, t.dice_weight)

    def validate(m, rt: Runtime) -> dict[str, float]:
        return {"dice": _val_dice(m, val_images, rt, t.threshold.value, cfg.data.input)}

    d = cfg.data
    train_set = VesselTrainSet(
        train_images, t.augment, d.patch, d.patches_per_image, t.seed, d.input
    )
    return Job(
        model=model,
        train_set=train_set,
        loss=loss,
        validate=validate if val_images else None,
        select="dice",
        lower_is_better=False,
    )


def score_images(
    manifest: Manifest,
    rows: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    out: Path,
    split: str = "test",
    fov_diameter: int | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Map probabilities to native size (framed with `fov_diameter`), save PNGs, score
    against observer 1 (and 2)."""
    (out / "probabilities").mkdir(parents=True, exist_ok=True)
    t = manifest.table
    second = "vessel2_path" in t.columns
    table, model_counts, observer_counts = [], [], []
    for row, prob in zip(rows, probs, strict=True):
        vessel, fov = native_masks(manifest, row)
        at = f"{manifest.path} line {manifest.line(row)}"
        native = back_to_native(prob, fov, fov_diameter, at)
        iid = str(t.iloc[row]["image_id"])
        Image.fromarray(np.round(native * 255).astype(np.uint8)).save(
            out / "probabilities" / f"{iid}.png"
        )
        c = count(native, vessel, fov, threshold)
        model_counts.append(c)
        table.append({"image_id": iid, "split": split, "reference": "model", **scores(c)})
        rel = str(t.iloc[row]["vessel2_path"] or "") if second else ""
        if rel:
            other = read_mask(manifest.image_path(rel))
            c2 = count(other.astype(np.float32), vessel, fov, 0.5)
            observer_counts.append(c2)
            table.append({"image_id": iid, "split": split, "reference": "observer2", **scores(c2)})
    metrics = {split: summary(model_counts), "images": len(model_counts)}
    metrics["optimistic_best"] = optimistic_best(model_counts)
    if not table:  # keep the columns, so reports can read an empty table
        return pd.DataFrame(columns=["image_id", "split", "reference", *NAMES]), metrics
    if observer_counts:
        metrics["observer2"] = summary(observer_counts)
        metrics["observer2_images"] = len(observer_counts)
    return pd.DataFrame(table), metrics


def _say(line: str | None) -> None:
    """One line of the run's own notes, from rank 0 only."""
    if line and ddp.is_main():
        tqdm.write(line)


def note_derived_fov(manifest: Manifest, rows: np.ndarray) -> int:
    """Count the rows scored inside a FOV derived from the image, and say so once per run."""
    n = rows_without_fov(manifest, rows)
    _say(f"{n} images had no fov_path: FOV derived from the image" if n else None)
    return n


RESIZE = {
    "square": "pad to a centred square, then resize",
    "fov": "scale so the FOV is fov_diameter px wide, then the centred resolution square",
}


def _bundle_meta(cfg: SegmentConfig, thresholds: dict) -> BundleMeta:
    """bundle.json of a U-Net run; `thresholds`: `seg_threshold.task_thresholds`."""
    raw = {
        "architecture": {
            "arch": cfg.model.arch,
            "type": "unet",
            "decoder_channels": cfg.model.decoder_channels,
            "outputs": 1,
        },
        "task": {
            "name": "vessels",
            "kind": "segmentation",
            "classes": ["vessel"],
            **thresholds,
        },
        "preprocessing": {
            "resolution": cfg.data.resolution,
            "resize": RESIZE["square" if cfg.data.fov_diameter is None else "fov"],
            "fov_diameter": cfg.data.fov_diameter,
            "input": cfg.data.input,
            "tta_flips": cfg.eval.tta_flips,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "provenance": provenance(cfg.model_dump(mode="json"), Path(cfg.data.manifest)),
        "encoder": cfg.model.encoder,
        "init": cfg.model.init_name,
    }
    return BundleMeta.model_validate(raw)


def _chosen_thresholds(
    cfg: SegmentConfig,
    manifest: Manifest,
    parts: dict[str, np.ndarray],
    images: dict[str, list[VesselImage]],
    model: torch.nn.Module,
    rt: Runtime,
    part: str | None,
) -> dict:
    """The bundle's threshold fields: chosen by max Dice on the best weights' probabilities
    of `part` (`threshold_part`: the images `train.threshold.choose_on` names; None: fixed).
    Every rank predicts its share; rank 0 chooses (the others' result is never written)."""
    pick = None
    if part is not None:
        probs = predict_vessels_sharded(model, images[part], rt, *_fed(cfg))
        if ddp.is_main():
            pick = choose_threshold_on(manifest, parts[part], probs, cfg.data.fov_diameter)
    return task_thresholds(cfg.train.threshold, part, pick)


def _fed(cfg: SegmentConfig) -> tuple[InputMode, bool]:
    """How the run's model is fed at prediction time: (input form, test-time flips)."""
    return cfg.data.input, cfg.eval.tta_flips


def _inference_record(fov_diameter: int | None, input: InputMode, tta_flips: bool) -> dict:
    """metrics.json's `inference`: how the scored images were framed, fed and predicted."""
    return {"fov_diameter": fov_diameter, "input": input, "tta_flips": tta_flips}


def _load_parts(cfg: SegmentConfig, manifest: Manifest, parts: dict, progress: bool) -> dict:
    """Every part's images, framed as `data` says."""
    d = cfg.data
    return {
        p: load_images(manifest, rows, d.resolution, progress, d.fov_diameter)
        for p, rows in parts.items()
    }


def train_segmentation(cfg: SegmentConfig) -> Path:
    """Train a U-Net on the configured part, choose its threshold, test it, write the run
    folder; returns it."""
    if cfg.data.manifest is None:
        raise ConfigError("data.manifest is not set (e.g. --set data.manifest=PATH/manifest.csv)")
    rt = runtime(cfg.train)  # joins torchrun's group, if any
    out = prepare_run(cfg)
    if is_finished(out):
        return out
    manifest = load_manifest(cfg.data.manifest)
    manifest.require_unique_ids()
    split = seg_parts(cfg.data, manifest, cfg.train.seed)
    parts = split.rows
    _say(split.skipped_line())
    progress = cfg.run.progress and ddp.is_main()
    fov_derived = note_derived_fov(manifest, np.concatenate(list(parts.values())))
    images = _load_parts(cfg, manifest, parts, progress)
    part = threshold_part(cfg.train.threshold, parts)  # settings the data cannot meet fail
    check_choosable(part, images.get(part or "", []))  # before training, not after
    torch.manual_seed(cfg.train.seed)
    model = create_unet(cfg.model)
    job = segmentation_job(model, images["train"], images["val"], cfg)
    result = fit(job, cfg.train, out, cfg.run.resume, progress)
    thresholds = _chosen_thresholds(cfg, manifest, parts, images, model, rt, part)
    probs = predict_vessels_sharded(model, images["test"], rt, *_fed(cfg))
    if not ddp.is_main():
        ddp.barrier()  # rank 0 scores and writes the run folder
        return out
    meta = _bundle_meta(cfg, thresholds)
    metrics = _score_test(cfg, manifest, parts["test"], probs, meta, out)
    metrics.update(best_epoch=result.best_epoch, history=result.history)
    metrics.update(skipped_no_mask=split.skipped, fov_derived=fov_derived)
    metrics.update(parts={p: len(r) for p, r in parts.items()})
    save_bundle(model.cpu(), out / "bundle", meta)
    write_json(out / "metrics.json", metrics)
    if not cfg.run.keep_checkpoint:
        for name in ("checkpoint.pt", "best.safetensors"):
            (out / name).unlink(missing_ok=True)
    ddp.barrier()
    return out


def _score_test(
    cfg: SegmentConfig, manifest: Manifest, rows: np.ndarray, probs, meta: BundleMeta, out: Path
) -> dict:
    """Score the run's test images with its chosen threshold; writes per_image.csv."""
    d = cfg.data
    threshold = meta.task.thresholds[0]
    table, metrics = score_images(manifest, rows, probs, threshold, out, "test", d.fov_diameter)
    write_csv(out / "per_image.csv", table)
    metrics.update(threshold=threshold_record(meta.task))
    metrics["inference"] = _inference_record(d.fov_diameter, *_fed(cfg))
    return metrics


def _scored_rows(manifest: Manifest, split: str | None) -> tuple[np.ndarray, int]:
    """The rows with a vessel mask in `split` (every row with one when None or no column),
    and how many rows of it were left out for having none."""
    manifest.require("image_id", "path", "vessel_path")
    manifest.require_unique_ids()  # probability PNGs and per_image rows are keyed on image_id
    t = manifest.table
    chosen = np.ones(len(t), bool)
    if split and "split" in t.columns:
        names = TEST_NAMES if split.lower() in TEST_NAMES else {split.lower()}
        chosen = t["split"].astype(str).str.lower().isin(names).to_numpy()
    has_mask = has_vessel_mask(manifest)
    rows = np.flatnonzero(chosen & has_mask)
    if len(rows) == 0:
        raise DataError(
            f"{manifest.path}: no images with vessel masks in split {split!r}; choose "
            "another --split (all: every row) or a manifest with vessel_path filled in"
        )
    return rows, int((chosen & ~has_mask).sum())


def evaluate_segmentation(
    bundle_path: Path,
    manifest_path: Path,
    out: Path,
    split: str | None = "test",
    device: str = "auto",
    progress: bool = True,
    tta_flips: bool | None = None,
) -> dict:
    """Score a segmentation bundle on a manifest's images with vessel masks (all or one
    split), framed and fed as the bundle records and binarised with its stored threshold;
    `tta_flips` None: the bundle's own setting."""
    bundle = load_bundle(bundle_path)
    if bundle.kind != "segmentation":
        raise WeightsError(f"{bundle_path} is a {bundle.kind} bundle; use `fundusfm evaluate`")
    manifest = load_manifest(manifest_path)
    rows, skipped = _scored_rows(manifest, split)
    _say(f"skipped {skipped} images without a vessel mask" if skipped else None)
    fov_derived = note_derived_fov(manifest, rows)
    pre = bundle.preprocessing
    flips = pre.tta_flips if tta_flips is None else tta_flips
    images = load_images(manifest, rows, pre.resolution, progress, pre.fov_diameter)
    rt = Runtime.of(resolve_device(device), "auto", "auto", batch_size=4)
    model = bundle.model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    probs = predict_vessels(model, images, rt, pre.mean, pre.std, pre.input, flips)
    record = threshold_record(bundle.meta.task)
    table, metrics = score_images(
        manifest, rows, probs, record["value"], Path(out), "external", pre.fov_diameter
    )
    write_csv(Path(out) / "per_image.csv", table)
    metrics["bundle"], metrics["manifest"] = str(bundle_path), str(manifest_path)
    metrics.update(threshold=record, skipped_no_mask=skipped, fov_derived=fov_derived)
    metrics["inference"] = _inference_record(pre.fov_diameter, pre.input, flips)
    metrics["notes"] = bundle_notes(bundle.meta) + _flip_note(pre.tta_flips, flips)
    write_json(Path(out) / "metrics.json", metrics)
    return metrics


def _flip_note(recorded: bool, used: bool) -> list[str]:
    """A note when test-time flips differ from those the bundle's threshold was chosen with."""
    if recorded == used:
        return []
    how = "with" if used else "without"
    made = "with" if recorded else "without"
    return [
        f"predicted {how} test-time flips; the bundle's threshold was chosen {made} them, "
        "so it may not be the best for these probabilities"
    ]
