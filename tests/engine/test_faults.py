"""A full disk while a checkpoint is written: the previous checkpoint stays, the error says so,
and `--resume` later finishes the run as if nothing had happened."""

from __future__ import annotations

import errno
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.config.core import FinetuneConfig, SplitConfig, load_config
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import make_splits
from fundusfm.engine.checkpoint import save_atomic, save_weights
from fundusfm.errors import CheckpointWriteError, DataError
from fundusfm.tasks.classify import finetune
from tests.conftest import TINY_ARCH

REAL_SAVE = torch.save


def disk_full_after(calls: int):
    """A torch.save that works `calls` times, then writes half a file and fails like ENOSPC."""
    count = {"n": 0}

    def save(obj, f, *args, **kwargs):
        count["n"] += 1
        if count["n"] <= calls:
            return REAL_SAVE(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_failed_write_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"epoch": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", disk_full_after(0))
    with pytest.raises(CheckpointWriteError, match="previous one is intact") as caught:
        save_atomic({"epoch": 2}, path)
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no partial file
    with pytest.raises(CheckpointWriteError, match="none was written before"):
        save_atomic({"epoch": 1}, tmp_path / "other.pt")
    assert not (tmp_path / "other.pt").exists()


def test_failed_weights_write_keeps_the_previous_weights(tmp_path, monkeypatch):
    import fundusfm.engine.checkpoint as checkpoint

    path, model = tmp_path / "best.safetensors", torch.nn.Linear(3, 2)
    save_weights(model, path)
    before = path.read_bytes()

    def full(tensors, filename):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointWriteError, match="intact"):
        save_weights(torch.nn.Linear(3, 2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


@pytest.fixture(scope="module")
def splits(synth_set: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "splits.csv"
    make_splits(load_manifest(synth_set), SplitConfig(folds=3, val_fraction=0.2)).to_csv(
        out, index=False
    )
    return out


def run_sets(synth_set: Path, splits: Path, out: Path) -> list[str]:
    return [
        f"data.manifest={synth_set}",
        f"data.splits={splits}",
        f"data.cache={splits.parent / 'cache'}",
        "data.resolution=64",
        "data.task=abnormal",
        f"model.arch={TINY_ARCH}",
        "model.init=scratch",
        "train.epochs=3",
        "train.batch_size=8",
        "train.select_metric=loss",
        "train.device=cpu",
        f"run.out={out}",
    ]


@pytest.mark.slow  # a fault test that trains twice, as kill -9 does
def test_disk_full_mid_run_then_resume_matches_an_uninterrupted_run(
    synth_set, splits, tmp_path, monkeypatch
):
    whole = finetune(load_config(FinetuneConfig, None, run_sets(synth_set, splits, tmp_path / "a")))

    out = tmp_path / "b"
    args = ["finetune", "-q", *[a for s in run_sets(synth_set, splits, out) for a in ("--set", s)]]
    monkeypatch.setattr(torch, "save", disk_full_after(1))  # epoch 1 saved, epoch 2 fails
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "No space left on device" in result.output and "previous one is intact" in result.output
    kept = torch.load(out / "checkpoint.pt", weights_only=True)  # still loads: not half written
    assert kept["epoch"] == 0
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    monkeypatch.setattr(torch, "save", REAL_SAVE)  # space freed
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(
        pd.read_csv(whole / "predictions.csv"), pd.read_csv(out / "predictions.csv")
    )

    # external validation keys its predictions on image_id: a repeated id is refused by line
    from fundusfm.tasks.evaluate import evaluate

    table = pd.read_csv(synth_set, dtype=str, keep_default_na=False)
    table["path"] = [str(synth_set.parent / p) for p in table["path"]]  # absolute paths
    repeated = pd.concat([table, table.iloc[[0]]])
    bad = tmp_path / "repeated_id.csv"
    repeated.to_csv(bad, index=False)
    with pytest.raises(DataError, match=f"line {len(table) + 2}"):
        evaluate(whole / "bundle", bad, tmp_path / "ext", device="cpu", progress=False)
    assert not (tmp_path / "ext").exists()


def test_failed_manifest_write_keeps_the_previous_manifest(tmp_path, monkeypatch):
    import os

    from fundusfm.data.manifest import DatasetSpec, save_manifest

    table = pd.DataFrame(
        {"image_id": ["a"], "path": ["a.png"], "patient_id": ["a"], "eye": ["left"]}
    )
    path = save_manifest(table, DatasetSpec(), tmp_path / "manifest.csv")
    before = path.read_bytes()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the rename that would publish the new file
    with pytest.raises(OSError, match="No space left"):
        save_manifest(table.assign(path="b.png"), DatasetSpec(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "manifest.yaml"]
