"""Segmentation grid results -> tables, figures and an HTML report (`fundusfm grid report`).

Writes into `<grid out>/report/`:
    results.csv      one row per finished cell: coordinates, pooled and mean test metrics
                     (inside the FOV), and every external set's
    per_image.csv    every test image of every cell, with the cell's coordinates
    summary.csv      per (init, encoder mode, resolution, fraction): folds found and expected,
                     `complete` and the folds not done (as `report.completeness`); mean and
                     sd over folds, and the mean per-image Dice over all folds' test images
                     with a 95% patient-level bootstrap interval
    comparisons.csv  every pair of inits on the same test images: mean per-image Dice
                     difference, its patient-level bootstrap interval, Wilcoxon's p and
                     `p_holm`, Wilcoxon's p adjusted by Holm's method within its family (the
                     pairs of inits at one method, resolution and fraction); incomplete
                     groups are left out unless `allow_incomplete`
    observer.csv     the second observer scored like a model (the human reference line)
    transfer.csv     with external sets: per group, the mean and sd over folds of pooled Dice
                     and AUROC on the folds' own test parts and on each external set (the
                     "Across datasets" matrix, `grid.seg_matrix`)
    dice_vs_fraction.png (the paper's Fig. 4), dice_vs_resolution.png (mean per-image Dice
                     with its 95% interval band), report.html (headline, figures, tables,
                     methods paragraph: as the classification report's)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from fundusfm.config.grid import SegmentationGrid
from fundusfm.data.manifest import load_manifest, patient_of
from fundusfm.evaluation.stats import bootstrap_ci
from fundusfm.grid.cells import cell_dir, expand, state
from fundusfm.grid.figures import curve_figures
from fundusfm.grid.findings import DICE, comparison_view, headline, sections, summary_view
from fundusfm.grid.html import PROTOCOL, page
from fundusfm.grid.methods import segmentation_methods, split_facts
from fundusfm.grid.seg_matrix import datasets, external_images, transfer_matrix, transfer_section
from fundusfm.grid.tables import (
    KEYS,
    add_holm,
    completeness,
    external_metrics,
    in_groups,
    incomplete_lines,
)
from fundusfm.io import read_json, write_csv, write_text_atomic

COLUMNS = ["task", "method", "resolution", "fraction", "init_a", "init_b", "images", "complete"]
COLUMNS += ["dice_a", "dice_b", "difference", "ci_low", "ci_high", "wilcoxon_p"]
SHOWN = ("dice", "dice_mean", "auroc", "auprc", "cldice", "sensitivity", "specificity")
SHOWN_MEANS = {"test_dice": "pooled Dice per fold", "test_cldice": "clDice", "test_auroc": "AUROC"}


def collect(cfg: SegmentationGrid) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """results, per-image test rows and second-observer rows of every done cell."""
    rows, images, observer = [], [], []
    for cell in expand(cfg):
        if state(cfg, cell) != "done":
            continue
        d = cell_dir(cfg, cell)
        metrics = read_json(d / "metrics.json")
        row = {"cell": cell.id, **cell.coordinates(), "test_images": metrics.get("images")}
        row.update({f"test_{k}": v for k, v in metrics.get("test", {}).items()})
        rows.append({**row, **external_metrics(cfg, d), **external_images(cfg, d)})
        table = pd.read_csv(d / "per_image.csv", dtype={"image_id": str})
        for key, value in cell.coordinates().items():
            table[key] = value
        images.append(table[table.reference == "model"])
        observer.append(table[table.reference == "observer2"])
    empty = pd.DataFrame()
    return (
        pd.DataFrame(rows),
        pd.concat(images, ignore_index=True) if images else empty,
        pd.concat(observer, ignore_index=True) if observer else empty,
    )


def _mean_ci(values: np.ndarray, groups: np.ndarray, n_boot: int) -> tuple[float, float]:
    return bootstrap_ci(lambda r: float(np.nanmean(values[r])), len(values), groups, n_boot)


def summarise(results, images, patients: dict, n_boot: int) -> pd.DataFrame:
    out = []
    for key, group in results.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, key, strict=True))
        for name in SHOWN:
            values = pd.to_numeric(group.get(f"test_{name}"), errors="coerce")
            row[f"test_{name}_mean"], row[f"test_{name}_sd"] = values.mean(), values.std(ddof=1)
        frame = images[np.logical_and.reduce([images[k] == row[k] for k in KEYS])]
        dice = frame["dice"].to_numpy(float)
        groups = frame["image_id"].map(lambda i: patients.get(i, i)).to_numpy()
        row["image_dice"] = float(np.nanmean(dice)) if len(dice) else float("nan")
        row["image_dice_ci_low"], row["image_dice_ci_high"] = _mean_ci(dice, groups, n_boot)
        row["images"] = len(dice)
        out.append(row)
    return pd.DataFrame(out)


def compare(images: pd.DataFrame, patients: dict, n_boot: int, lacking=frozenset()) -> pd.DataFrame:
    """Paired per-image Dice of every two inits at the same encoder mode, size and fraction;
    `complete` is False where either init's group (KEYS) is in `lacking`."""
    rows = []
    fixed = ["task", "method", "resolution", "fraction"]
    for key, group in images.groupby(fixed, sort=False):
        wide = group.pivot_table(index=["image_id", "fold"], columns="init", values="dice")
        for a, b in itertools.combinations(wide.columns, 2):
            pair = wide[[a, b]].dropna()
            if len(pair) < 2:
                continue
            diff = (pair[a] - pair[b]).to_numpy()
            groups = pair.index.get_level_values("image_id").map(patients).to_numpy()
            low, high = _mean_ci(diff, groups, n_boot)
            p = wilcoxon(diff).pvalue if np.any(diff != 0) else 1.0
            rows.append(
                {
                    **dict(zip(fixed, key, strict=True)),
                    "init_a": a,
                    "init_b": b,
                    "images": len(pair),
                    "complete": all((key[0], i, *key[1:]) not in lacking for i in (a, b)),
                    "dice_a": pair[a].mean(),
                    "dice_b": pair[b].mean(),
                    "difference": diff.mean(),
                    "ci_low": low,
                    "ci_high": high,
                    "wilcoxon_p": float(p),
                }
            )
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=COLUMNS)


def observer_table(observer: pd.DataFrame) -> pd.DataFrame:
    """Second observer against the first, once per test image (it does not depend on cells)."""
    if observer.empty:
        return observer
    unique = observer.drop_duplicates("image_id")
    metrics = [c for c in ("dice", "auroc", "cldice", "sensitivity", "specificity") if c in unique]
    return pd.DataFrame([{"images": len(unique), **unique[metrics].mean().to_dict()}])


def _transfer(cfg: SegmentationGrid, results: pd.DataFrame, out: Path) -> list:
    """The 'Across datasets' section, with transfer.csv, when the grid has external sets
    (without, none: a transfer.csv of an earlier report is removed)."""
    if not cfg.external:
        (out / "transfer.csv").unlink(missing_ok=True)
        return []
    names = datasets(cfg)
    matrix = transfer_matrix(results, names)
    write_csv(out / "transfer.csv", matrix)
    return [transfer_section(matrix, names)]


def build_seg_report(
    cfg: SegmentationGrid, n_boot: int = 1000, allow_incomplete: bool = False
) -> Path:
    """Write every table, figure and the HTML report of a segmentation grid.

    Groups with failed, stale or missing folds are marked in the summary and left out of
    the comparisons unless `allow_incomplete`.
    """
    out = Path(cfg.out) / "report"
    out.mkdir(parents=True, exist_ok=True)
    results, images, observer = collect(cfg)
    if results.empty:
        raise FileNotFoundError(f"no finished cells under {cfg.out}; run `fundusfm grid run`")
    manifest = load_manifest(cfg.segment.data.manifest)
    patients = dict(zip(manifest.table["image_id"], patient_of(manifest.table), strict=True))
    groups = completeness(cfg)
    summary = groups.merge(summarise(results, images, patients, n_boot), how="left")
    incomplete = groups[~groups["complete"]]
    compared = images if allow_incomplete else images[~in_groups(images, incomplete)]
    lacking = set(incomplete[KEYS].itertuples(index=False, name=None))
    comparisons = add_holm(compare(compared, patients, n_boot, lacking), "wilcoxon_p")
    human = observer_table(observer)
    tables = {
        "results": results,
        "per_image": images,
        "summary": summary,
        "comparisons": comparisons,
        "observer": human,
    }
    for name, table in tables.items():
        write_csv(out / f"{name}.csv", table)
    shown = summary[summary["folds"] > 0]
    figures = curve_figures(shown, out, "image_dice", "mean per-image test Dice", "dice", n_boot)
    facts = split_facts(cfg.segment.data.splits)
    parts = sections(
        Path(cfg.out),
        headline(summary, comparisons, DICE),
        figures,
        {
            "Summary (inside the FOV; pooled Dice per fold, mean per-image Dice with 95% CI)": (
                summary_view(summary, DICE, SHOWN_MEANS)
            ),
            "Paired comparisons of initialisations (per-image Dice)": comparison_view(
                comparisons, DICE
            ),
            "Second observer (the human reference)": human,
        },
        None,
        lambda extra: segmentation_methods(cfg, facts, n_boot),
        incomplete_lines(groups),
        allow_incomplete,
    )
    parts[3:3] = _transfer(cfg, results, out)
    html = page(f"fundusfm segmentation grid report: {cfg.name}", PROTOCOL, parts)
    return write_text_atomic(out / "report.html", html)
