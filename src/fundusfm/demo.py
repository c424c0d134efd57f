"""`fundusfm demo`: the whole data path on generated images, on a CPU, in a minute or two.

Generates a synthetic fundus set, validates its manifest, builds the preprocessing cache and
writes patient-grouped splits, leaving every intermediate file in the output folder so a
new user can open each one. Model training joins this story as the toolkit grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import DemoConfig, dump_config
from .manifest import load_manifest
from .preprocess import BuildReport, build_cache
from .splits import make_splits, summarise
from .synthetic import generate
from .validate import check_manifest


@dataclass
class DemoResult:
    manifest: Path
    problems: int
    cache: BuildReport
    splits: Path
    summary: pd.DataFrame


def run_demo(cfg: DemoConfig, out: Path, progress: bool = True, say=print) -> DemoResult:
    """Run every data stage on a generated set inside `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")

    say(f"[1/4] generating {cfg.synth.n} synthetic fundus images at {cfg.synth.size} px")
    manifest_path = generate(cfg.synth, out / "data", progress=progress)
    manifest = load_manifest(manifest_path)

    say("[2/4] checking the manifest (files, decoding, duplicates, labels)")
    report = check_manifest(manifest, progress=progress)
    for problem in report.problems:
        say(f"  {problem}")

    say(f"[3/4] building the {cfg.preprocess.resolution} px preprocessing cache")
    cache = build_cache(manifest, cfg.preprocess, out / "cache", progress=progress)

    say(f"[4/4] {cfg.split.folds}-fold patient-grouped splits, fractions {cfg.split.fractions}")
    splits = make_splits(manifest, cfg.split)
    splits_path = out / "splits.csv"
    splits.to_csv(splits_path, index=False)
    summary = summarise(splits, manifest, cfg.split.task)
    summary.to_csv(out / "splits_summary.csv", index=False)
    return DemoResult(manifest_path, len(report.problems), cache, splits_path, summary)
