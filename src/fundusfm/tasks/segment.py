"""Vessel segmentation runs: `fundusfm segment train` and `fundusfm segment eval`.

A run folder holds `config.yaml`, `checkpoint.pt` while training (resumable with
--resume), then `per_image.csv` (every metric of every test image, and of the second
observer where the dataset has one), `metrics.json` (pooled and mean metrics, history),
`probabilities/<image_id>.png` (8-bit vessel probability at the image's own size) and
`bundle/` (task kind `segmentation`). Loss: BCE + soft Dice, both inside the FOV only.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from fundusfm.bundle import BundleMeta, provenance, save_bundle
from fundusfm.config.segment import SegmentConfig
from fundusfm.data.decode import read_mask
from fundusfm.data.manifest import Manifest, load_manifest
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise
from fundusfm.data.vessel_images import (
    TEST_NAMES,
    VesselImage,
    VesselTrainSet,
    batch_of,
    load_images,
    native_masks,
    rows_without_fov,
    seg_parts,
    to_native,
)
from fundusfm.engine import distributed as ddp
from fundusfm.engine.checkpoint import save_atomic, save_weights
from fundusfm.engine.loop import amp_dtype, cosine_with_warmup, resolve_device
from fundusfm.engine.runs import is_finished, prepare_run
from fundusfm.errors import TrainingDiverged
from fundusfm.evaluation.seg_metrics import NAMES, Counts, count, scores, summary
from fundusfm.io import write_json
from fundusfm.models.loaded import load_bundle
from fundusfm.models.unet import create_unet


def seg_loss(logits, vessel, fov, bce_weight: float, dice_weight: float) -> torch.Tensor:
    """BCE averaged over FOV pixels plus 1 - soft Dice over the batch's FOV pixels."""
    logits = logits[:, 0].float()
    inside = fov.sum().clamp(min=1.0)
    bce = (F.binary_cross_entropy_with_logits(logits, vessel, reduction="none") * fov).sum()
    p = torch.sigmoid(logits) * fov
    dice = 1 - (2 * (p * vessel).sum() + 1) / (p.sum() + (vessel * fov).sum() + 1)
    return bce_weight * bce / inside + dice_weight * dice


@torch.no_grad()
def predict_probs(
    model,
    images: list[VesselImage],
    batch_size,
    device,
    amp,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """Vessel probabilities (N x R x R) at the training size; `mean`/`std`: a bundle's own."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x, _, _ = batch_of(images[i : i + batch_size])
        x = normalise(x.to(device), mean, std)
        with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
            out.append(torch.sigmoid(model(x)[:, 0].float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def _val_dice(model, images, cfg: SegmentConfig, device, amp) -> float:
    """Pooled validation Dice; under torchrun each rank counts its share and all are summed."""
    mine = images[ddp.rank() :: ddp.world_size()]
    probs = predict_probs(model, mine, ddp.local_batch(cfg.train.batch_size), device, amp)
    total = Counts()
    for c in ddp.gather_list(
        [count(p, s.vessel, s.fov, cfg.train.threshold) for s, p in zip(mine, probs, strict=True)]
    ):
        total = total + c
    return scores(total)["dice"]


def predict_all(model, images: list[VesselImage], batch_size, device, amp) -> np.ndarray:
    """`predict_probs` of every image; under torchrun each rank predicts a share."""
    rows = np.arange(ddp.rank(), len(images), ddp.world_size())
    probs = predict_probs(model, [images[i] for i in rows], batch_size, device, amp)
    return ddp.gather_predictions(probs, rows, rows)[0]


def fit_unet(model, train_images, val_images, cfg: SegmentConfig, out: Path) -> dict:
    """Train; keep the best validation Dice (or the last epoch without a validation part)."""
    t = cfg.train
    device = ddp.setup(resolve_device(t.device))
    progress = cfg.run.progress and ddp.is_main()
    amp = amp_dtype(t.amp, device)
    channels_last = t.channels_last == "on" or (t.channels_last == "auto" and device.type == "cuda")
    frozen = cfg.model.encoder == "frozen"
    if frozen:  # smp's own: no gradients, and BatchNorm statistics stay fixed in train()
        model.freeze_encoder()
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    trained = ddp.wrap(model, device, t.sync_batchnorm)  # `model` itself with one process
    batch_size = ddp.local_batch(t.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    data = VesselTrainSet(train_images, t.augment, cfg.data.patch, cfg.data.patches_per_image)
    drop_last = len(data) > t.batch_size
    if len(data) < ddp.world_size():
        raise ValueError(f"{len(data)} training images for {ddp.world_size()} processes")
    steps = len(data) // t.batch_size if drop_last else 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps * t.epochs, round(steps * t.warmup_epochs))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)  # fp16 underflows
    checkpoint, best_file = out / "checkpoint.pt", out / "best.safetensors"
    state = {"epoch": 0, "best_epoch": 0, "best_dice": -1.0, "history": []}
    if cfg.run.resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        ddp.restore_rng(saved.get("rank_rng", []), saved["torch_rng"])
        state = saved["state"]
    else:
        torch.manual_seed(t.seed + ddp.rank())  # patches and augmentation differ by rank
    for epoch in range(state["epoch"], t.epochs):
        model.train()
        sampler = None
        if ddp.world_size() > 1:
            sampler = DistributedSampler(data, shuffle=True, seed=t.seed, drop_last=True)
            sampler.set_epoch(epoch)
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=t.workers,
        )
        total, seen = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not progress,
            leave=False,
            unit="batch",
        )
        for images, vessel, fov in bar:
            x = normalise(images.to(device))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                logits = trained(x)
            loss = seg_loss(logits, vessel.to(device), fov.to(device), t.bce_weight, t.dice_weight)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss.item()} at epoch {epoch + 1}; try a lower train.lr"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total, seen = total + loss.item() * len(images), seen + len(images)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        total, seen = ddp.sum_all(total, seen)
        record = {"epoch": epoch + 1, "train_loss": total / max(seen, 1)}
        if val_images:
            record["val_dice"] = _val_dice(model, val_images, cfg, device, amp)
        state["history"].append(record)
        dice = record.get("val_dice", float(epoch))  # no validation part: the last epoch wins
        if math.isnan(dice):
            dice = -1.0
        improved = dice > state["best_dice"]
        if improved:
            state["best_dice"], state["best_epoch"] = dice, epoch + 1
        state["epoch"] = epoch + 1
        rank_rng = ddp.rng_states()  # collective: every rank takes part
        if ddp.is_main():
            if improved:
                save_weights(model, best_file)
            saved = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "rank_rng": rank_rng,
                "state": state,
            }
            save_atomic(saved, checkpoint)
        if progress:
            tqdm.write(", ".join(f"{k} {v:.4g}" for k, v in record.items()))
    ddp.barrier()  # rank 0 has written the best weights
    model.load_state_dict(load_file(best_file))
    return {"best_epoch": state["best_epoch"], "history": state["history"]}


def score_images(
    manifest: Manifest,
    rows: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    out: Path,
    split: str = "test",
) -> tuple[pd.DataFrame, dict]:
    """Map probabilities to native size, save PNGs, score against observer 1 (and 2)."""
    (out / "probabilities").mkdir(parents=True, exist_ok=True)
    t = manifest.table
    second = "vessel2_path" in t.columns
    table, model_counts, observer_counts = [], [], []
    for row, prob in zip(rows, probs, strict=True):
        vessel, fov = native_masks(manifest, row)
        native = to_native(prob, vessel.shape)
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
    if not table:  # keep the columns, so reports can read an empty table
        return pd.DataFrame(columns=["image_id", "split", "reference", *NAMES]), metrics
    if observer_counts:
        metrics["observer2"] = summary(observer_counts)
        metrics["observer2_images"] = len(observer_counts)
    return pd.DataFrame(table), metrics


def note_derived_fov(manifest: Manifest, rows: np.ndarray) -> int:
    """Count the rows scored inside a FOV derived from the image, and say so once per run."""
    n = rows_without_fov(manifest, rows)
    if n and ddp.is_main():
        tqdm.write(f"{n} images had no fov_path: FOV derived from the image")
    return n


def _bundle_meta(cfg: SegmentConfig, threshold: float) -> BundleMeta:
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
            "thresholds": [threshold],
        },
        "preprocessing": {
            "resolution": cfg.data.resolution,
            "resize": "pad to a centred square, then resize",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "provenance": provenance(cfg.model_dump(mode="json"), Path(cfg.data.manifest)),
        "encoder": cfg.model.encoder,
        "init": cfg.model.init_name,
    }
    return BundleMeta.model_validate(raw)


def train_segmentation(cfg: SegmentConfig) -> Path:
    """Train a U-Net on the configured part, test it, write the run folder; returns it."""
    if cfg.data.manifest is None:
        raise ValueError("data.manifest is not set (e.g. --set data.manifest=PATH/manifest.csv)")
    device = ddp.setup(resolve_device(cfg.train.device))  # joins torchrun's group, if any
    out = prepare_run(cfg)
    if is_finished(out):
        return out
    manifest = load_manifest(cfg.data.manifest)
    manifest.require_unique_ids()
    parts = seg_parts(cfg.data, manifest, cfg.train.seed)
    parts = {p: parts.get(p, np.array([], int)) for p in ("train", "val", "test")}
    size, progress = cfg.data.resolution, cfg.run.progress and ddp.is_main()
    fov_derived = note_derived_fov(manifest, np.concatenate(list(parts.values())))
    images = {p: load_images(manifest, rows, size, progress) for p, rows in parts.items()}
    torch.manual_seed(cfg.train.seed)
    model = create_unet(cfg.model)
    fitted = fit_unet(model, images["train"], images.get("val", []), cfg, out)
    amp, batch = amp_dtype(cfg.train.amp, device), ddp.local_batch(cfg.train.batch_size)
    probs = predict_all(model, images["test"], batch, device, amp)
    if not ddp.is_main():
        ddp.barrier()  # rank 0 scores and writes the run folder
        return out
    table, metrics = score_images(manifest, parts["test"], probs, cfg.train.threshold, out)
    table.to_csv(out / "per_image.csv", index=False)
    metrics.update(fitted, parts={p: len(r) for p, r in parts.items()}, fov_derived=fov_derived)
    save_bundle(model.cpu(), out / "bundle", _bundle_meta(cfg, cfg.train.threshold))
    write_json(out / "metrics.json", metrics)
    if not cfg.run.keep_checkpoint:
        for name in ("checkpoint.pt", "best.safetensors"):
            (out / name).unlink(missing_ok=True)
    ddp.barrier()
    return out


def evaluate_segmentation(
    bundle_path: Path,
    manifest_path: Path,
    out: Path,
    split: str | None = "test",
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Score a segmentation bundle on a manifest's images with vessel masks (all or one split)."""
    bundle = load_bundle(bundle_path)
    if bundle.kind != "segmentation":
        raise ValueError(f"{bundle_path} is a {bundle.kind} bundle; use `fundusfm evaluate`")
    manifest = load_manifest(manifest_path)
    manifest.require("image_id", "path", "vessel_path")
    manifest.require_unique_ids()  # probability PNGs and per_image rows are keyed on image_id
    t = manifest.table
    keep = (t["vessel_path"].astype(str) != "").to_numpy()
    if split and "split" in t.columns:
        names = TEST_NAMES if split.lower() in TEST_NAMES else {split.lower()}
        keep &= t["split"].astype(str).str.lower().isin(names).to_numpy()
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise ValueError(f"{manifest_path}: no images with vessel masks in split {split!r}")
    fov_derived = note_derived_fov(manifest, rows)
    images = load_images(manifest, rows, bundle.resolution, progress)
    dev = resolve_device(device)
    model = bundle.model.to(dev)
    pre = bundle.preprocessing
    probs = predict_probs(model, images, 4, dev, amp_dtype("auto", dev), pre.mean, pre.std)
    table, metrics = score_images(
        manifest, rows, probs, bundle.thresholds[0], Path(out), "external"
    )
    table.to_csv(Path(out) / "per_image.csv", index=False)
    metrics["bundle"], metrics["manifest"] = str(bundle_path), str(manifest_path)
    metrics["fov_derived"] = fov_derived
    write_json(Path(out) / "metrics.json", metrics)
    return metrics
