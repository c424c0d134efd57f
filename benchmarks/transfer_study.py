"""Real-data transfer study on the 4-class eye-disease set, sized for a CPU (about an hour).

1. Import `eye_diseases_classification` (augmented copies dropped, duplicates grouped).
2. Split its patients in two, stratified on the class: an upstream and a downstream part.
3. Pretrain a Fundus model (normal vs abnormal, from scratch) on the upstream part.
4. On the downstream part run the grid: tasks disease (4 classes) and abnormal, Scratch vs
   Fundus, LF and FF, labelled fractions 10/30/100%, 5 patient-grouped folds; the report
   gives pooled AUROC with patient-level 95% intervals and clustered DeLong / paired
   patient-bootstrap tests.
   Every cell keeps its bundle (`fundusfm evaluate` takes it to other datasets).

    python benchmarks/transfer_study.py ../shared/data/eye_diseases_classification \
        --out runs/transfer

Rerunning the same command resumes (finished cells are skipped). Prints the figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from fundusfm.config.core import PretrainConfig, SplitConfig, load_config
from fundusfm.config.grid import GridConfig
from fundusfm.data.adapters.registry import import_dataset
from fundusfm.data.manifest import load_manifest, save_manifest
from fundusfm.data.splits import make_splits
from fundusfm.grid.report import build_report
from fundusfm.grid.runner import run_grid
from fundusfm.tasks.classify import pretrain


def subset(manifest_path: Path, ids: set[str], out: Path) -> Path:
    m = load_manifest(manifest_path)
    return save_manifest(m.table[m.table.image_id.isin(ids)], m.spec, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="eye_diseases_classification folder")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3, help="downstream FF epochs")
    args = parser.parse_args()
    out, started = args.out, time.time()
    data = out / "data"

    full = data / "manifest.csv"
    if not full.is_file():
        _, notes = import_dataset("eye_diseases", args.root, full)
        print("\n".join(notes))
    halves = make_splits(
        load_manifest(full), SplitConfig(folds=2, val_fraction=0.0, task="disease", seed=0)
    )
    up = subset(full, set(halves.image_id[halves.fold == 0]), data / "upstream.csv")
    down = subset(full, set(halves.image_id[halves.fold == 1]), data / "downstream.csv")
    fractions = [0.1, 0.3, 1.0]
    splits = make_splits(
        load_manifest(down),
        SplitConfig(folds=5, fractions=fractions, val_fraction=0.15, task="disease", seed=0),
    )
    splits.to_csv(data / "downstream_splits.csv", index=False)
    print(f"upstream {len(load_manifest(up).table)} images, downstream {len(splits)} images")

    common = [
        f"data.resolution={args.resolution}",
        f"data.cache={data / 'cache'}",
        "model.arch=resnet18",
        "model.head=mlp",
        "train.batch_size=32",
        "train.lr=0.001",
        "train.warmup_epochs=0.5",
    ]
    pre_out = out / "pretrain_fundus"
    cfg = load_config(
        PretrainConfig,
        None,
        [
            *common,
            f"data.manifest={up}",
            "data.task=abnormal",
            "strategy=fundus",
            f"train.epochs={args.pretrain_epochs}",
            f"run.out={pre_out}",
            "run.resume=true",
        ],
    )
    t0 = time.time()
    pretrain(cfg)
    print(f"pretraining: {time.time() - t0:.0f} s")

    grid = load_config(
        GridConfig,
        None,
        [
            "name=eye_diseases_transfer",
            f"out={out / 'grid'}",
            f"base.data.manifest={down}",
            f"base.data.splits={data / 'downstream_splits.csv'}",
            *(f"base.{c}" for c in common),
            f"base.train.epochs={args.epochs}",
            "axes.task=[disease, abnormal]",
            f"axes.init={{scratch: scratch, fundus: {pre_out / 'bundle'}}}",
            "axes.method=[lf, ff]",
            f"axes.resolution=[{args.resolution}]",
            f"axes.fraction={fractions}",
            "axes.fold=[0, 1, 2, 3, 4]",
        ],
    )
    t0 = time.time()
    counts = run_grid(grid, progress=False)
    print(f"grid: {counts} in {time.time() - t0:.0f} s")
    report = build_report(grid)
    summary = pd.read_csv(report.parent / "summary.csv")
    cols = ["task", "init", "method", "labelled_share", "labelled_images_mean",
            "pooled_auroc", "pooled_auroc_ci_low", "pooled_auroc_ci_high",
            "test_auroc_mean", "test_auroc_sd"]  # fmt: skip
    print(summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    comparisons = pd.read_csv(report.parent / "comparisons.csv")
    print(comparisons.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"report: {report}\ntotal: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
