"""The segmentation report's cross-dataset matrix: a row per init and method, a column per
dataset (the folds' own test parts, then each external set), mean and sd over folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundusfm.config.core import SplitConfig, load_config
from fundusfm.config.grid import GridConfig
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import make_splits
from fundusfm.grid.cells import cell_dir, expand, fingerprint
from fundusfm.grid.seg_report import build_seg_report
from fundusfm.io import write_csv, write_json, write_text_atomic

INITS = {"scratch": 0.50, "fundus": 0.60}
METHODS = {"frozen": 0.00, "full": 0.05}
SETS = {"test": 0.10, "ext_drive": 0.00, "ext_stare": -0.10}  # the own test set transfers best
SHOWN = ("dice", "dice_mean", "auroc", "auprc", "cldice", "sensitivity", "specificity")


def value(init: str, method: str, fold: int, prefix: str, metric: str) -> float:
    """A known figure per cell and dataset: folds differ, so each group has an sd."""
    auroc = 0.2 if metric == "auroc" else 0.0
    return INITS[init] + METHODS[method] + SETS[prefix] + auroc + 0.02 * fold


def metrics_of(cell, prefix: str) -> dict:
    return {m: value(cell.init_label, cell.method, cell.fold, prefix, m) for m in SHOWN}


def fake_grid(root: Path, manifest: Path, external: bool) -> GridConfig:
    """A 2 init x 2 method x 3 fold segmentation grid whose cells are written as done (their
    metrics.json, per_image.csv, external metrics and `done` marker), without training."""
    splits = root / "splits.csv"
    make_splits(load_manifest(manifest), SplitConfig(folds=3)).to_csv(splits, index=False)
    ext = [{"name": n, "manifest": str(manifest)} for n in ("drive", "stare")]
    sets = {
        "kind": "segmentation",
        "out": root / "g",
        "segment.data.manifest": manifest,
        "segment.data.splits": splits,
        "axes.init": "{scratch: scratch, fundus: scratch}",
        "axes.method": "[frozen, full]",
        "axes.resolution": "[64]",
        "axes.fold": "[0, 1, 2]",
        "external": str(ext if external else []),
    }
    cfg = load_config(GridConfig, None, [f"{k}={v}" for k, v in sets.items()])
    ids = load_manifest(manifest).table["image_id"].tolist()
    for cell in expand(cfg):
        d = cell_dir(cfg, cell)
        (d / "external").mkdir(parents=True)
        write_json(d / "metrics.json", {"images": 10, "test": metrics_of(cell, "test")})
        dice = np.linspace(0.4, 0.8, 10) + INITS[cell.init_label]
        rows = {"image_id": ids[:10], "split": "test", "reference": "model", "dice": dice}
        write_csv(d / "per_image.csv", pd.DataFrame(rows))
        for e in cfg.external:
            path = d / "external" / e.name / "metrics.json"
            path.parent.mkdir()
            write_json(path, {"external": metrics_of(cell, f"ext_{e.name}"), "images": 40})
        write_text_atomic(d / "done", fingerprint(cfg, cell))
    return cfg


def test_report_gains_the_matrix_of_every_init_and_method(synth_set: Path, tmp_path: Path):
    cfg = fake_grid(tmp_path, synth_set, external=True)
    report = build_seg_report(cfg, n_boot=20)
    matrix = pd.read_csv(report.parent / "transfer.csv")
    assert len(matrix) == len(INITS) * len(METHODS) and (matrix.folds == 3).all()
    assert set(zip(matrix.init, matrix.method, strict=True)) == {
        (i, m) for i in INITS for m in METHODS
    }
    for r in matrix.to_dict("records"):
        for prefix in SETS:
            assert r[f"{prefix}_folds"] == 3
            for metric in ("dice", "auroc"):
                folds = [value(r["init"], r["method"], f, prefix, metric) for f in range(3)]
                assert r[f"{prefix}_{metric}_mean"] == pytest.approx(np.mean(folds))
                assert r[f"{prefix}_{metric}_sd"] == pytest.approx(np.std(folds, ddof=1))
        assert r["ext_drive_images"] == 40
    html = report.read_text()
    section = html[html.index('<section id="transfer">') :]
    section = section[: section.index("</section>")]
    assert "<h2>Across datasets</h2>" in section and "drive (40 images)" in section
    for header in ("own test set: Dice", "drive: Dice", "stare: AUROC"):
        assert header in section
    fundus_full = 0.6 + 0.05 + 0.0 + 0.02  # drive, mean over folds 0..2 (0.02 per fold)
    assert f"{fundus_full:.3f} \u00b1 0.020" in section
    # it sits after the tables and before the methods
    assert html.index('id="tables"') < html.index('id="transfer"') < html.index('id="methods"')
    assert "beside the folds&#x27; own test sets" in html  # the methods paragraph


def test_without_external_sets_there_is_no_matrix(synth_set: Path, tmp_path: Path):
    cfg = fake_grid(tmp_path, synth_set, external=False)
    old = Path(cfg.out) / "report" / "transfer.csv"
    old.parent.mkdir(parents=True)
    old.write_text("left by a report of another grid\n")
    html = build_seg_report(cfg, n_boot=20).read_text()
    assert 'id="transfer"' not in html and not old.exists()
