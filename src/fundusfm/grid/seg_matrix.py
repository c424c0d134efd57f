"""The segmentation report's cross-dataset matrix ("Across datasets", `report/transfer.csv`):
does a vessel model trained on one dataset hold on others, and does its initialisation change
that (do disease-focused features help vessels elsewhere)?

Every fold's model of a cell segments each external set with the threshold stored in its
bundle (`grid.runner`: `<cell>/external/<name>/metrics.json`). Per group (KEYS: init,
encoder mode, resolution, fraction) and per dataset (`test`: each fold's own test part;
`ext_<name>`: each external set, in the grid's order) the matrix holds the mean and sd over
the folds' models of the pooled Dice and AUROC inside the FOV (`<dataset>_dice_mean`,
`_dice_sd`, `_auroc_mean`, `_auroc_sd`), the folds that scored the dataset (`_folds`) and the
images a fold's model scored there (`_images`, mean over folds). Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fundusfm.config.grid import SegmentationGrid
from fundusfm.grid.html import Section, mean_sd, paragraph, table
from fundusfm.grid.tables import KEYS
from fundusfm.io import read_json

MATRIX = {"dice": "Dice", "auroc": "AUROC"}  # metric -> its name in the report
SHOWN_KEYS = ["init", "method", "resolution", "fraction"]  # the task is always vessels


def datasets(cfg: SegmentationGrid) -> dict[str, str]:
    """Column prefix -> the dataset in words: the folds' own test parts, then each external set."""
    return {"test": "own test set", **{f"ext_{e.name}": e.name for e in cfg.external}}


def external_images(cfg: SegmentationGrid, d: Path) -> dict[str, int]:
    """`ext_<set>_images` of a cell folder: the images it scored on each external set."""
    row = {}
    for ext in cfg.external:
        path = d / "external" / ext.name / "metrics.json"
        if path.is_file():
            row[f"ext_{ext.name}_images"] = read_json(path).get("images")
    return row


def _column(group: pd.DataFrame, name: str) -> pd.Series:
    if name not in group:
        return pd.Series(np.nan, index=group.index, dtype=float)
    return pd.to_numeric(group[name], errors="coerce")


def _dataset_cells(group: pd.DataFrame, prefix: str) -> dict:
    """One dataset's columns of one group: mean and sd over folds, folds scored, images."""
    out: dict = {}
    for metric in MATRIX:
        values = _column(group, f"{prefix}_{metric}")
        out[f"{prefix}_{metric}_mean"] = values.mean()
        out[f"{prefix}_{metric}_sd"] = values.std(ddof=1)
    out[f"{prefix}_folds"] = int(_column(group, f"{prefix}_dice").notna().sum())
    out[f"{prefix}_images"] = _column(group, f"{prefix}_images").mean()
    return out


def transfer_matrix(results: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """One row per group (KEYS) of the done cells in `results` (the report's results.csv),
    with its folds and, for each dataset of `names` (`datasets`), its columns."""
    rows = []
    for key, group in results.groupby(KEYS, sort=False):
        row = {**dict(zip(KEYS, key, strict=True)), "folds": len(group)}
        for prefix in names:
            row.update(_dataset_cells(group, prefix))
        rows.append(row)
    return pd.DataFrame(rows)


def transfer_view(matrix: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """The matrix as shown: a row per init and method (and size, fraction), a column per
    dataset, Dice columns first, then AUROC, each 'mean ± sd' over folds (3 decimals)."""
    matrix = matrix.reset_index(drop=True)
    view = matrix[SHOWN_KEYS].copy()
    view["fraction"] = [f"{v:g}" for v in view["fraction"]]
    view["folds"] = matrix["folds"]
    for metric, label in MATRIX.items():
        for prefix, name in names.items():
            means, sds = matrix[f"{prefix}_{metric}_mean"], matrix[f"{prefix}_{metric}_sd"]
            view[f"{name}: {label}"] = [mean_sd(a, b) for a, b in zip(means, sds, strict=True)]
    return view


def _sizes(matrix: pd.DataFrame, names: dict[str, str]) -> str:
    """'drive (20 images), stare (20 images)': what each external set's models scored."""
    shown = []
    for prefix, name in list(names.items())[1:]:
        n = matrix[f"{prefix}_images"].max()
        shown.append(name if pd.isna(n) else f"{name} ({int(n)} images)")
    return ", ".join(shown)


def transfer_section(matrix: pd.DataFrame, names: dict[str, str]) -> Section:
    """'Across datasets': what the matrix is, then the matrix."""
    intro = (
        "Every fold's model segmented each external set with the threshold stored in its "
        "bundle (chosen on its own training dataset, never on the external masks). Each "
        "value is the pooled Dice or AUROC inside the field of view, as mean \u00b1 sd over "
        "the folds' models (a spread over models, not a confidence interval). The own test "
        "set is each fold's held-out patients of the training dataset; the other columns "
        "are new datasets (cameras, populations, annotators). The fall from the first "
        "column to the others is the transfer gap; the rows ask whether an initialisation "
        f"narrows it. External sets: {_sizes(matrix, names)}. As a table: transfer.csv."
    )
    body = paragraph(intro, "note") + table(transfer_view(matrix, names))
    return Section("transfer", "Across datasets", body)
