"""Resume equals an uninterrupted run, for every task the one loop trains.

Each in-process case trains once without interruption and once interrupted right after its
first checkpoint (the loop's own `save_atomic` raises), refuses to reuse the folder without
--resume, then resumes, training only the epochs left; weights, history and outputs must be
equal. The `ddp` case runs under
torchrun with two processes, kill -9s the whole job after its first checkpoint and resumes it
under torchrun; it must equal the uninterrupted one-process run (up to float summation order),
leave no checkpoint behind and write the same files.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import fundusfm.engine.loop as loop
from fundusfm.config.core import FinetuneConfig, SplitConfig, dump_config, load_config
from fundusfm.config.segment import SegmentConfig
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import make_splits
from fundusfm.errors import ConfigError
from fundusfm.tasks.classify import finetune
from fundusfm.tasks.segment import train_segmentation
from tests.conftest import TINY_ARCH
from tests.engine.test_distributed import (
    assert_same_run,
    finished,
    kill_after_first_checkpoint,
    torchrun,
)


@pytest.fixture(scope="module")
def fold(synth_set: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("resume")
    split = SplitConfig(folds=3, val_fraction=0.2, task="abnormal")
    make_splits(load_manifest(synth_set), split).to_csv(out / "splits.csv", index=False)
    return {"manifest": synth_set, "splits": out / "splits.csv", "cache": out / "cache"}


def common(fold: dict, out: Path) -> dict:
    return {
        "data.manifest": fold["manifest"],
        "data.splits": fold["splits"],
        "data.resolution": 64,
        "model.arch": TINY_ARCH,
        "model.init": "scratch",
        "train.batch_size": 8,
        "train.device": "cpu",
        "run.out": out,
        "run.keep_checkpoint": True,
        "run.progress": False,
    }


def classification(fold: dict, out: Path, **extra) -> FinetuneConfig:
    sets = common(fold, out) | {
        "data.cache": fold["cache"],
        "data.task": "abnormal",
        "model.hidden": 16,
        "train.epochs": 3,
        "train.grad_accum": 2,
        "train.lr": 0.001,
        "train.select_metric": "loss",
    }
    return load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in (sets | extra).items()])


def segmentation(fold: dict, out: Path) -> SegmentConfig:
    sets = common(fold, out) | {
        "model.decoder_channels": "[64, 32, 16, 16, 8]",
        "train.epochs": 3,
        "train.grad_accum": 2,
        "train.patience": 2,  # early stopping on validation Dice is on (the setting resumes)
    }
    return load_config(SegmentConfig, None, [f"{k}={v}" for k, v in sets.items()])


def resumed(cfg):
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})})


def interrupt_after_first_checkpoint(monkeypatch, train, cfg, when=lambda state: True) -> None:
    """Kill the run right after the first checkpoint whose state meets `when`."""
    real = loop.save_atomic

    def stop(obj, path):
        real(obj, path)
        if when(obj):
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_atomic", stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop, "save_atomic", real)
    assert when(torch.load(Path(cfg.run.out) / "checkpoint.pt", weights_only=True))
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)


def resume_counting_epochs(monkeypatch, train, cfg) -> int:
    """Resume `cfg` and return how many epochs the resumed run trained (a resume that
    silently started over would train them all and still end equal: CPU runs are exact)."""
    real, trained = loop.Trainer.epoch, []

    def counted(self, *args, **kwargs):
        trained.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "epoch", counted)
    train(resumed(cfg))
    monkeypatch.setattr(loop.Trainer, "epoch", real)
    return len(trained)


def epochs_left(whole: Path, cut: Path) -> int:
    """Epochs the uninterrupted run trained after the cut run's checkpoint."""
    done = torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] + 1
    return len(torch.load(whole / "checkpoint.pt", weights_only=True)["history"]) - done


def assert_same_weights_and_history(a: Path, b: Path) -> None:
    x = torch.load(a / "checkpoint.pt", weights_only=True)
    y = torch.load(b / "checkpoint.pt", weights_only=True)
    for k, v in x["model"].items():
        assert torch.equal(v, y["model"][k]), k
    pd.testing.assert_frame_equal(pd.DataFrame(x["history"]), pd.DataFrame(y["history"]))
    assert len(x["history"]) == x["epoch"] + 1


TASKS = [
    "classification",
    "classification-early-stopping",
    "segmentation",
    pytest.param("ddp", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("task", TASKS)
def test_resume_equals_uninterrupted(task, fold, tmp_path, monkeypatch):
    if task == "segmentation":
        whole = train_segmentation(segmentation(fold, tmp_path / "whole"))
        cut = segmentation(fold, tmp_path / "cut")
        interrupt_after_first_checkpoint(monkeypatch, train_segmentation, cut)
        left = epochs_left(whole, tmp_path / "cut")
        assert resume_counting_epochs(monkeypatch, train_segmentation, cut) == left
        assert_same_weights_and_history(whole, tmp_path / "cut")
        a, b = (pd.read_csv(d / "per_image.csv") for d in (whole, tmp_path / "cut"))
        pd.testing.assert_frame_equal(a, b)
        return
    lf = {}  # classification: full fine-tuning
    if task == "ddp":  # LF: frozen BatchNorm, so 1 and 2 processes agree to rounding
        lf = {"method": "lf", "model.head": "linear", "train.lr": 0.01, "train.epochs": 6}
        lf["run.keep_checkpoint"] = False
    later = lambda state: True  # noqa: E731
    if task == "classification-early-stopping":  # killed after an epoch that did not improve
        lf = {"train.epochs": 8, "train.patience": 2, "train.lr": 0.01}
        later = lambda state: state["bad_epochs"] > 0  # noqa: E731
    whole = finetune(classification(fold, tmp_path / "whole", **lf))
    cut = classification(fold, tmp_path / "cut", **lf)
    if task == "ddp":  # two processes, killed -9 mid-run, resumed by two processes
        args = ["finetune", "-q", "--config", str(dump_config(cut, tmp_path / "cut.yaml"))]
        kill_after_first_checkpoint(args, tmp_path / "cut")
        assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] < 5
        finished(torchrun([*args, "--resume"]))
        assert_same_run(whole, tmp_path / "cut")  # LF: BatchNorm frozen, equal to rounding
        assert not (tmp_path / "cut" / "checkpoint.pt").exists()  # rank 0 cleaned up
        files = [sorted(p.name for p in d.iterdir()) for d in (whole, tmp_path / "cut")]
        assert files[0] == files[1]
        return
    interrupt_after_first_checkpoint(monkeypatch, finetune, cut, later)
    left = epochs_left(whole, tmp_path / "cut")
    assert left > 0 and resume_counting_epochs(monkeypatch, finetune, cut) == left
    assert_same_weights_and_history(whole, tmp_path / "cut")
    state = torch.load(whole / "checkpoint.pt", weights_only=True)
    if task == "classification-early-stopping":  # it did stop, after the interruption
        assert state["stopped_early"] and len(state["history"]) < 8
    a, b = (pd.read_csv(d / "predictions.csv") for d in (whole, tmp_path / "cut"))
    pd.testing.assert_frame_equal(a, b)
