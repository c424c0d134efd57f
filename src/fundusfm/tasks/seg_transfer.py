"""One segmentation bundle scored on several datasets: `fundusfm segment eval BUNDLE M1 M2 ...`.

Each manifest is scored as `segment eval` scores one (`tasks.segment.evaluate_segmentation`:
framed, fed and binarised as the bundle records, with its stored threshold) into
`<out>/<dataset>/` (metrics.json, per_image.csv, probabilities/). A dataset is named by its
manifest's sidecar (`name:`), else by the manifest's folder; names are made safe as folder
names and unique (a second `drive` becomes `drive-2`). Then:

    transfer.csv   one row per dataset: images, skipped_no_mask, pooled Dice, AUROC, AUPRC,
                   clDice, sensitivity and specificity inside the FOV at the stored
                   `threshold`, and apart the best Dice of the dataset's own masks
                   (`dice_at_own_best_threshold` at `own_best_threshold`: optimistic, a
                   ceiling no model could know in advance, never the result)
    transfer.png   Dice and AUROC per dataset, grouped bars
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm import tqdm

from fundusfm.data.manifest import load_manifest
from fundusfm.io import write_atomic, write_csv
from fundusfm.tasks.segment import evaluate_segmentation

METRICS = ("dice", "auroc", "auprc", "cldice", "sensitivity", "specificity")
COLUMNS = ["dataset", "manifest", "images", "skipped_no_mask", *METRICS, "threshold"]
COLUMNS += ["dice_at_own_best_threshold", "own_best_threshold"]
RESERVED = frozenset({"transfer.csv", "transfer.png"})  # the files beside the folders


def dataset_name(manifest_path: Path) -> str:
    """The name a dataset's folder and row get: its sidecar's `name`, else its folder's."""
    name = load_manifest(manifest_path).spec.name.strip()
    return name or Path(manifest_path).resolve().parent.name or Path(manifest_path).stem


def unique_names(names: list[str]) -> list[str]:
    """`names` as safe folder names, the repeats numbered (`drive`, `drive-2`); compared
    without case, so the folders stay apart on case-insensitive file systems."""
    taken, out = set(RESERVED), []
    for name in names:
        safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip(".") or "dataset"
        candidate, k = safe, 2
        while candidate.lower() in taken:
            candidate, k = f"{safe}-{k}", k + 1
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def transfer_row(name: str, manifest_path: Path, metrics: dict) -> dict:
    """One dataset's row of transfer.csv, from the metrics.json `segment eval` wrote for it."""
    pooled = metrics.get("external") or {}
    best = metrics.get("optimistic_best") or {}
    return {
        "dataset": name,
        "manifest": str(manifest_path),
        "images": metrics["images"],
        "skipped_no_mask": metrics.get("skipped_no_mask", 0),
        **{k: pooled.get(k) for k in METRICS},
        "threshold": metrics["threshold"]["value"],
        "dice_at_own_best_threshold": best.get("dice"),
        "own_best_threshold": best.get("threshold"),
    }


def transfer_figure(table: pd.DataFrame, path: Path) -> Path:
    """Grouped bars: pooled Dice (at the stored threshold) and AUROC of each dataset."""
    x = np.arange(len(table))
    width = 0.38
    fig, ax = plt.subplots(figsize=(2.8 + 1.2 * len(table), 3.8))
    for k, (column, label) in enumerate((("dice", "Dice"), ("auroc", "AUROC"))):
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
        bars = ax.bar(x + (k - 0.5) * width, np.nan_to_num(values), width, label=label)
        texts = ["" if np.isnan(v) else f"{v:.3f}" for v in values]
        ax.bar_label(bars, labels=texts, fontsize=7, padding=1)
    ax.set_xticks(x, list(table["dataset"]), rotation=20, ha="right")
    threshold = float(table["threshold"].iloc[0])
    ax.set(ylim=(0.0, 1.08), ylabel="pooled inside the FOV")
    ax.set_title(f"Dice at the bundle's threshold {threshold:g}, and AUROC", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def manifest_split(entry: Path | str, split: str | None) -> tuple[Path, str | None]:
    """`PATH` (scored on `split`) or `PATH:SPLIT`, its own split (`all`: every row), so that
    one call scores DRIVE's test images and all of CHASE_DB1."""
    text = str(entry)
    path, sep, own = text.rpartition(":")
    if sep and own and "/" not in own and not Path(text).exists():
        return Path(path), None if own == "all" else own
    return Path(text), split


def evaluate_transfer(
    bundle_path: Path,
    manifests: list[Path | str],
    out: Path,
    split: str | None = "test",
    device: str = "auto",
    progress: bool = True,
    tta_flips: bool | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Score a segmentation bundle on every manifest (each on `split` or its own, `PATH:SPLIT`)
    into `<out>/<dataset>/`, then write transfer.csv and transfer.png; returns the table and
    the runs' notes (each once)."""
    out = Path(out)
    entries = [manifest_split(m, split) for m in manifests]
    names = unique_names([dataset_name(m) for m, _ in entries])  # every manifest read first
    rows, notes = [], []
    for name, (manifest, own) in zip(names, entries, strict=True):
        if progress:
            tqdm.write(f"{name}: {manifest} ({own or 'all'} rows)")
        metrics = evaluate_segmentation(
            bundle_path, manifest, out / name, own, device, progress, tta_flips
        )
        rows.append(transfer_row(name, manifest, metrics))
        notes += [n for n in metrics.get("notes", []) if n not in notes]
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_csv(out / "transfer.csv", table)
    transfer_figure(table, out / "transfer.png")
    return table, notes
