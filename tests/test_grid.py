"""The grid: expansion, shards, skip-if-done, failures, resume of a killed cell, the report."""

from pathlib import Path

import pandas as pd
import pytest

from fundusfm.config import SplitConfig, load_config
from fundusfm.config_grid import GridConfig
from fundusfm.grid import cell_dir, expand, parse_shard, run_grid, shard, status
from fundusfm.manifest import load_manifest
from fundusfm.report import build_report
from fundusfm.splits import make_splits


@pytest.fixture(scope="module")
def setup(synth_set: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grid")
    splits = make_splits(
        load_manifest(synth_set),
        SplitConfig(folds=3, fractions=[0.5, 1.0], val_fraction=0.2, task="abnormal"),
    )
    splits.to_csv(root / "splits.csv", index=False)
    return {"manifest": synth_set, "splits": root / "splits.csv", "root": root}


def grid_config(setup: dict, out: Path, **sets) -> GridConfig:
    base = {
        "name": "t",
        "out": out,
        "base.data.manifest": setup["manifest"],
        "base.data.splits": setup["splits"],
        "base.data.task": "abnormal",
        "base.data.cache": setup["root"] / "cache",
        "base.model.arch": "resnet18",
        "base.model.hidden": 16,
        "base.train.epochs": 1,
        "base.train.batch_size": 8,
        "base.train.select_metric": "loss",
        "axes.init": "{a: scratch}",
        "axes.method": "[lf]",
        "axes.resolution": "[64]",
        "axes.fraction": "[0.5, 1.0]",
        "axes.fold": "[0, 1, 2]",
    }
    base.update(sets)
    return load_config(GridConfig, None, [f"{k}={v}" for k, v in base.items()])


def test_expansion_and_shards(setup, tmp_path):
    cfg = grid_config(
        setup,
        tmp_path,
        **{
            "axes.init": "[scratch, runs/x/bundle]",
            "axes.method": "[lf, ff]",
            "axes.resolution": "[64, 128]",
        },
    )
    cells = expand(cfg)
    assert len(cells) == 2 * 2 * 2 * 2 * 3
    assert len({c.id for c in cells}) == len(cells)
    assert cells[0].id == "task=abnormal/init=scratch/method=lf/res=64/frac=0.5/fold=0"
    assert {c.init_label for c in cells} == {"scratch", "runs_x_bundle"}
    parts = [shard(cells, i, 5) for i in range(5)]
    ids = [c.id for p in parts for c in p]
    assert sorted(ids) == sorted(c.id for c in cells) and len(ids) == len(set(ids))
    assert parse_shard("3/4") == (3, 4)
    with pytest.raises(ValueError, match=r"0\.\.N-1"):
        parse_shard("4/4")


def test_run_skip_fail_status_and_report(setup, tmp_path):
    ext = [{"name": "same", "manifest": str(setup["manifest"]), "task": "abnormal"}]
    cfg = grid_config(
        setup,
        tmp_path / "g",
        **{"axes.init": "{a: scratch, broken: no/such/bundle}", "external": str(ext)},
    )
    said: list[str] = []
    dry = run_grid(cfg, dry_run=True, say=said.append)
    assert dry["pending"] == 12 and len(said) == 12
    counts = run_grid(cfg, say=lambda _: None)
    assert counts == {"done": 0, "ran": 6, "failed": 6, "pending": 0}
    table = status(cfg)
    assert (table.state == "done").sum() == 6 and (table.state == "failed").sum() == 6
    failed = table[table.state == "failed"].iloc[0]
    error = (tmp_path / "g" / "cells" / failed.cell / "error.txt").read_text()
    assert "unknown init" in error
    again = run_grid(cfg, say=lambda _: None)
    assert again["done"] == 6 and again["ran"] == 0 and again["failed"] == 6
    done_cell = table[table.state == "done"].iloc[0].cell
    assert (tmp_path / "g" / "cells" / done_cell / "external" / "same" / "metrics.json").exists()
    # features were extracted once for the init, then reused by every fold x fraction cell
    assert len(list((tmp_path / "g" / "features").glob("*.npy"))) == 1

    report = build_report(cfg, n_boot=50)
    html = report.read_text()
    assert "data:image/png;base64," in html and "Summary" in html
    summary = pd.read_csv(report.parent / "summary.csv")
    assert len(summary) == 2 and (summary.folds == 3).all()
    assert (summary.pooled_auroc_ci_low <= summary.pooled_auroc_ci_high).all()
    assert summary.pooled_images.iloc[0] == 40  # every image is a test image exactly once
    results = pd.read_csv(report.parent / "results.csv")
    assert len(results) == 6 and "ext_same_auroc" in results.columns


def test_killed_training_cell_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
    sets = {
        "axes.method": "[ff]",
        "axes.fraction": "[1.0]",
        "axes.fold": "[0]",
        "base.train.epochs": 2,
    }
    whole = grid_config(setup, tmp_path / "whole", **sets)
    run_grid(whole, say=lambda _: None)

    import fundusfm.experiment as experiment

    real = experiment.finetune

    def killed_after_first_epoch(cfg, on_epoch_end=None):
        def stop(epoch, model):
            if epoch == 1:
                raise KeyboardInterrupt

        return real(cfg, on_epoch_end=stop)

    cut = grid_config(setup, tmp_path / "cut", **sets)
    monkeypatch.setattr(experiment, "finetune", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cut, say=lambda _: None)
    monkeypatch.setattr(experiment, "finetune", real)
    assert run_grid(cut, say=lambda _: None)["ran"] == 1
    (cell,) = expand(cut)
    a = pd.read_csv(cell_dir(whole, cell) / "predictions.csv")
    b = pd.read_csv(cell_dir(cut, cell) / "predictions.csv")
    pd.testing.assert_frame_equal(a, b)


def test_changed_settings_make_cells_stale_and_rerun_fresh(setup, tmp_path):
    ext = [{"name": "ext", "manifest": str(setup["manifest"])}]  # task comes from the cell
    sets = {
        "axes.task": "[abnormal, disease]",
        "axes.fraction": "[1.0]",
        "axes.fold": "[0]",
        "external": str(ext),
    }
    cfg = grid_config(setup, tmp_path / "g", **sets)
    assert run_grid(cfg, say=lambda _: None) == {"done": 0, "ran": 2, "failed": 0, "pending": 0}
    changed = grid_config(setup, tmp_path / "g", **sets, **{"probe.Cs": "[0.5]"})
    assert set(status(changed).state) == {"stale"}
    assert run_grid(changed, say=lambda _: None)["ran"] == 2
    assert set(status(changed).state) == {"done"}
    # a cell that failed on a wrong init runs fresh once the YAML is fixed
    broken = grid_config(setup, tmp_path / "b", **{**sets, "axes.init": "{a: no/such/bundle}"})
    assert run_grid(broken, say=lambda _: None)["failed"] == 2
    fixed = grid_config(setup, tmp_path / "b", **{**sets, "axes.init": "{a: scratch}"})
    assert run_grid(fixed, say=lambda _: None)["ran"] == 2


def test_axes_reject_duplicates_and_unsafe_labels(setup, tmp_path):
    with pytest.raises(ValueError, match="repeated values"):
        grid_config(setup, tmp_path, **{"axes.fold": "[0, 0]"})
    with pytest.raises(ValueError, match="init label"):
        grid_config(setup, tmp_path, **{"axes.init": "{'../x': scratch}"})
    with pytest.raises(ValueError, match="same label"):
        grid_config(setup, tmp_path, **{"axes.init": "[runs/a_b, runs/a/b]"})
    cells = expand(grid_config(setup, tmp_path, **{"axes.task": "[null, abnormal]"}))
    assert len(cells) == len({c.id for c in cells}) == 6  # null means the base task
