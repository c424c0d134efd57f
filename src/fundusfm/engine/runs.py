"""Run folders: created once (or reopened by --resume with the same settings), their
`config.yaml`, and the rows of `predictions.csv` every task writes first."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundusfm.config.core import changed_settings, dump_config
from fundusfm.engine import distributed as ddp
from fundusfm.errors import ConfigError
from fundusfm.io import read_json


def prediction_frame(ids, fold: int, split: str, kind: str, classes, labels, scores):
    """Rows of predictions.csv: y_true is a class index (multilabel: one y_ column per class)."""
    frame = pd.DataFrame({"image_id": ids, "fold": fold, "split": split})
    if kind == "multilabel":
        for j, c in enumerate(classes):
            frame[f"y_{c}"] = labels[:, j]
    else:
        frame["y_true"] = labels
    for j, c in enumerate(classes):
        frame[f"score_{c}"] = scores[:, j]
    return frame


def prepare_run(cfg) -> Path:
    """Create (or reopen, with --resume and the same settings) a run folder; save the config."""
    out = Path(cfg.run.out)
    with ddp.main_first():  # under torchrun only rank 0 checks and writes; the others wait
        if ddp.is_main():
            _check_and_create(cfg, out)
    return out


def _check_and_create(cfg, out: Path) -> None:
    if (out / "metrics.json").exists() and not cfg.run.resume:
        raise ConfigError(f"{out} already holds a finished run; choose another run.out")
    if (out / "checkpoint.pt").exists() and not cfg.run.resume:
        raise ConfigError(
            f"{out} holds an unfinished run: add --resume to continue it, or choose another run.out"
        )
    previous = out / "config.yaml"
    changed = changed_settings(cfg, previous, ignore=("run",)) if cfg.run.resume else []
    if changed:  # a resumed run must be the same run: only run.* settings may change
        raise ConfigError(
            f"--resume with settings that differ from {previous} in {', '.join(changed)}; "
            "resume with the same settings, or start a new run.out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if cfg.run.resume:  # a process killed mid-write (kill -9) leaves its temporary files:
        # io.write_atomic's .NAME.<random>.tmp, and safetensors' own .tmp<random> inside it
        for tmp in {*out.glob(".*.tmp"), *out.glob(".tmp*")}:
            if tmp.is_file():
                tmp.unlink()
    dump_config(cfg, previous)


def is_finished(out: Path) -> bool:
    """A resumed run whose outputs are all written has nothing left to do."""
    return (out / "metrics.json").is_file() and (out / "bundle").is_dir()


def run_metrics(out: Path) -> dict:
    """A finished run's metrics.json (what `train`, `segment train` and reports print)."""
    return read_json(Path(out) / "metrics.json")
