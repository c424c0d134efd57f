"""The grid: expansion, shards, skip-if-done, failures, resume of a killed cell, the feature
cache key, and the report read back (summary with completeness, comparisons, external)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.config.core import (
    CropConfig,
    DataConfig,
    PretrainConfig,
    SplitConfig,
    dump_config,
    load_config,
)
from fundusfm.config.grid import GridConfig
from fundusfm.data.datasets import load_fold
from fundusfm.data.manifest import load_manifest
from fundusfm.data.splits import fold_sets, make_splits
from fundusfm.errors import ConfigError
from fundusfm.evaluation.metrics import binary_auroc
from fundusfm.evaluation.stats import CLUSTERED_DELONG, clustered_delong_test
from fundusfm.grid.cells import cell_dir, expand, fingerprint, parse_shard, shard, status
from fundusfm.grid.report import build_report
from fundusfm.grid.runner import run_grid
from fundusfm.grid.tables import at_axis_resolutions, once_per_pair
from fundusfm.models.inits import create_backbone
from fundusfm.tasks.classify import pretrain
from fundusfm.tasks.features import feature_key
from tests.conftest import TINY_ARCH


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
        "base.model.arch": TINY_ARCH,
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
    with pytest.raises(ConfigError, match=r"0\.\.N-1"):
        parse_shard("4/4")


def test_an_init_at_its_own_resolution_runs_there_and_meets_the_others_at_each(setup, tmp_path):
    """`axes.init_resolution`: its cells run at that size only; the report's comparisons
    see its rows at every axis resolution, fed at its own (`at_axis_resolutions`)."""
    own = {"axes.init": "{a: scratch, vit: scratch}", "axes.resolution": "[64, 128]"}
    cfg = grid_config(setup, tmp_path, **own, **{"axes.init_resolution": "{vit: 32}"})
    res = {(c.init_label, c.resolution) for c in expand(cfg)}
    assert res == {("a", 64), ("a", 128), ("vit", 32)}
    assert len(expand(cfg)) == 3 * 2 * 3  # (a: 2 sizes, vit: 1) x 2 fractions x 3 folds
    preds = pd.DataFrame({"init": ["a", "a", "vit"], "resolution": [64, 128, 32]})
    spread = at_axis_resolutions(preds, cfg)
    rows = set(zip(spread.init, spread.resolution, spread.input_resolution, strict=True))
    assert rows == {("a", 64, 64), ("a", 128, 128), ("vit", 64, 32), ("vit", 128, 32)}
    two = grid_config(
        setup,
        tmp_path,
        **{
            "axes.init": "{a: scratch, v: scratch, w: scratch}",
            "axes.resolution": "[64, 128]",
            "axes.init_resolution": "{v: 32, w: 32}",
        },
    )
    pairs = pd.DataFrame({"init_a": ["a", "a", "v", "v"], "init_b": ["v", "v", "w", "w"],
                          "resolution": [64, 128, 64, 128]})  # fmt: skip
    kept = once_per_pair(pairs, two)  # v and w, both at their own 32 px: tested once
    assert list(zip(kept.init_a, kept.resolution, strict=True)) == [("a", 64), ("a", 128),
                                                                    ("v", 64)]  # fmt: skip
    with pytest.raises(ConfigError, match=r"init_resolution names \['vt'\]"):
        grid_config(setup, tmp_path, **own, **{"axes.init_resolution": "{vt: 32}"})


@pytest.fixture(scope="module")
def pretrained(setup: dict, tmp_path_factory) -> Path:
    """A tiny pretraining bundle (1 epoch, 64 px): an init whose weights are not scratch's."""
    sets = {
        "strategy": "fundus",
        "data.manifest": setup["manifest"],
        "data.cache": setup["root"] / "cache",
        "data.resolution": 64,
        "data.task": "abnormal",
        "model.arch": TINY_ARCH,
        "model.hidden": 16,
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.select_metric": "loss",
        "run.out": tmp_path_factory.mktemp("pre"),
        "run.progress": False,
    }
    return pretrain(load_config(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()]))


@pytest.fixture(scope="module")
def external_set(setup: dict) -> Path:
    """The first 12 images (6 patients, both eyes) of the set: a small external manifest."""
    source = Path(setup["manifest"])
    out = setup["root"] / "external.csv"
    pd.read_csv(source, dtype=str).head(12).to_csv(out, index=False)
    spec = yaml.safe_load(source.with_suffix(".yaml").read_text())
    spec["root"] = str((source.parent / spec.get("root", ".")).resolve())
    out.with_suffix(".yaml").write_text(yaml.safe_dump(spec))
    return out


def cell_frames(cfg: GridConfig, where: dict, part: str = "predictions.csv") -> list[pd.DataFrame]:
    """Every fold's predictions (or `external/<set>/predictions.csv`) of one group, by fold."""
    cells = [c for c in expand(cfg) if all(c.coordinates()[k] == v for k, v in where.items())]
    return [pd.read_csv(cell_dir(cfg, c) / part, dtype={"image_id": str}) for c in cells]


def check_comparisons(cfg: GridConfig, out: Path) -> None:
    """comparisons.csv: one row for the pair (a, b), the clustered test, 20 patients, and the
    p-value the test gives on the cells' own pooled predictions."""
    (got,) = pd.read_csv(out / "comparisons.csv").itertuples()
    assert (got.init_a, got.init_b, got.fraction, got.images) == ("a", "b", 1.0, 40)
    assert got.test == CLUSTERED_DELONG and got.patients == 20 and got.complete
    assert 0 < got.p_value <= 1
    pooled = {
        i: pd.concat(cell_frames(cfg, {"init": i, "fraction": 1.0})).query("split == 'test'")
        for i in "ab"
    }
    pooled["b"] = pooled["b"].set_index("image_id").loc[pooled["a"].image_id].reset_index()
    patients = (
        pooled["a"]
        .image_id.map(
            dict(load_manifest(cfg.base.data.manifest).table[["image_id", "patient_id"]].to_numpy())
        )
        .to_numpy()
    )
    want = clustered_delong_test(
        pooled["a"].y_true, pooled["a"].score_1, pooled["b"].score_1, patients
    )
    assert got.auroc_a == pytest.approx(want["auroc_a"]) and got.auroc_b != got.auroc_a
    assert got.p_value == pytest.approx(want["p_value"], rel=1e-9)


def check_external(cfg: GridConfig, out: Path) -> None:
    """external.csv: mean/sd over the folds' models and their ensemble's AUROC with a CI."""
    external = pd.read_csv(out / "external.csv")
    assert list(external.init) == ["a", "b"]  # broken has no models
    assert (external.ext_same_ensemble_models == 3).all()
    assert (external.ext_same_ensemble_images == 12).all()
    low, high = external.ext_same_ensemble_auroc_ci_low, external.ext_same_ensemble_auroc_ci_high
    assert (
        (low <= external.ext_same_ensemble_auroc) & (external.ext_same_ensemble_auroc <= high)
    ).all()
    frames = cell_frames(cfg, {"init": "b", "fraction": 1.0}, "external/same/predictions.csv")
    mean = pd.concat(frames).groupby("image_id")[["y_true", "score_1"]].mean()
    row = external[(external.init == "b") & (external.fraction == 1.0)].iloc[0]
    assert row.ext_same_ensemble_auroc == pytest.approx(binary_auroc(mean.y_true, mean.score_1))
    per_model = [binary_auroc(f.y_true, f.score_1) for f in frames]
    assert row.ext_same_auroc_mean == pytest.approx(np.mean(per_model))


def test_run_skip_fail_status_and_report(setup, pretrained, external_set, tmp_path):
    ext = [{"name": "same", "manifest": str(external_set), "task": "abnormal"}]
    inits = f"{{a: scratch, b: {pretrained / 'bundle'}, broken: no/such/bundle}}"
    sets = {"axes.init": inits, "axes.fraction": "[1.0]", "external": str(ext)}
    cfg = grid_config(setup, tmp_path / "g", **sets)
    said: list[str] = []
    dry = run_grid(cfg, dry_run=True, say=said.append)
    assert dry["pending"] == 9 and len(said) == 9
    counts = run_grid(cfg, say=lambda _: None)
    assert counts == {"done": 0, "ran": 6, "failed": 3, "pending": 0}
    table = status(cfg)
    assert (table.state == "done").sum() == 6 and (table.state == "failed").sum() == 3
    failed = table[table.state == "failed"].iloc[0]
    error = (tmp_path / "g" / "cells" / failed.cell / "error.txt").read_text()
    assert "unknown init" in error
    again = run_grid(cfg, say=lambda _: None)
    assert again["done"] == 6 and again["ran"] == 0 and again["failed"] == 3
    done_cell = table[table.state == "done"].iloc[0].cell
    assert (tmp_path / "g" / "cells" / done_cell / "external" / "same" / "metrics.json").exists()
    # features were extracted once per init, then reused by every fold's cell
    assert len(list((tmp_path / "g" / "features").glob("*.npy"))) == 2

    report = build_report(cfg, n_boot=50)
    html = report.read_text()
    assert "data:image/png;base64," in html and "Summary" in html
    summary = pd.read_csv(report.parent / "summary.csv", dtype={"failed_folds": str})
    assert list(summary.init) == ["a", "b", "broken"] and (summary.folds_expected == 3).all()
    done = summary[summary.init != "broken"]
    assert (done.folds == 3).all() and done.complete.all()
    assert (done.pooled_auroc_ci_low <= done.pooled_auroc_ci_high).all()
    assert (done.pooled_images == 40).all()  # every image is a test image exactly once
    broken = summary[summary.init == "broken"]
    assert (broken.folds == 0).all() and not broken.complete.any()
    assert (broken.failed_folds == "0 1 2").all()
    results = pd.read_csv(report.parent / "results.csv")
    assert len(results) == 6 and "ext_same_auroc" in results.columns
    check_comparisons(cfg, report.parent)
    check_external(cfg, report.parent)
    check_incomplete_group_left_out(cfg, tmp_path)


def check_incomplete_group_left_out(cfg: GridConfig, tmp_path: Path) -> None:
    """A stale fold marks its group incomplete: out of comparisons unless allowed, and listed
    by `grid report` (which group is left out, of several, tests/test_report.py shows)."""
    (stale,) = [c for c in expand(cfg) if (c.init_label, c.fold) == ("b", 1)]
    (cell_dir(cfg, stale) / "done").write_text("settings of another day")
    out = build_report(cfg, n_boot=20).parent
    summary = pd.read_csv(out / "summary.csv", dtype={"stale_folds": str})
    row = summary[summary.init == "b"].iloc[0]
    assert row.folds == 2 and not row.complete and row.stale_folds == "1"
    assert row.pooled_images < 40
    assert pd.read_csv(out / "comparisons.csv").empty  # the header, no rows
    yaml_path = dump_config(cfg, tmp_path / "grid.yaml")
    result = CliRunner().invoke(
        app, ["grid", "report", str(yaml_path), "--n-boot", "20", "--allow-incomplete"]
    )
    assert result.exit_code == 0, result.output
    assert "2 incomplete groups" in result.output
    assert "init=b method=lf resolution=64 fraction=1.0: 2/3 folds (stale: 1)" in result.output
    assert "init=broken method=lf resolution=64 fraction=1.0: 0/3 folds (failed: 0 1 2)" in (
        result.output
    )
    (allowed,) = pd.read_csv(out / "comparisons.csv").itertuples()
    assert (allowed.init_a, allowed.init_b, allowed.complete) == ("a", "b", False)


def test_feature_key_follows_weights_resolution_crop_and_images(setup):
    """A changed input never returns another's features: each one changes the key."""

    def fold(**data):
        cfg = DataConfig(
            manifest=setup["manifest"], splits=setup["splits"], task="abnormal",
            cache=setup["root"] / "cache", resolution=data.pop("resolution", 64), **data,
        )  # fmt: skip
        return load_fold(cfg, progress=False)

    torch.manual_seed(0)
    net = create_backbone("resnet18", "scratch")
    base = fold()
    key = feature_key(net, base)
    assert feature_key(net, fold()) == key  # the same inputs: the same key
    torch.manual_seed(1)
    assert feature_key(create_backbone("resnet18", "scratch"), base) != key
    assert feature_key(net, fold(resolution=48)) != key
    assert feature_key(net, fold(crop=CropConfig(margin=0.05))) != key
    m = base.manifest
    fewer = type(m)(m.path, m.table.iloc[:-1], m.spec, m.root)
    assert feature_key(net, replace(base, manifest=fewer)) != key


@pytest.mark.slow  # a fault test that trains twice, as kill -9 does
def test_killed_training_cell_resumes_to_the_same_result(setup, tmp_path, monkeypatch):
    sets = {
        "axes.method": "[ff]",
        "axes.fraction": "[1.0]",
        "axes.fold": "[0]",
        "base.train.epochs": 2,
    }
    whole = grid_config(setup, tmp_path / "whole", **sets)
    run_grid(whole, say=lambda _: None)

    import fundusfm.grid.runner as runner

    real = runner.finetune

    def killed_after_first_epoch(cfg, on_epoch_end=None):
        def stop(epoch, model):
            if epoch == 1:
                raise KeyboardInterrupt

        return real(cfg, on_epoch_end=stop)

    cut = grid_config(setup, tmp_path / "cut", **sets)
    monkeypatch.setattr(runner, "finetune", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_grid(cut, say=lambda _: None)
    monkeypatch.setattr(runner, "finetune", real)
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
    with pytest.raises(ConfigError, match="repeated values"):
        grid_config(setup, tmp_path, **{"axes.fold": "[0, 0]"})
    with pytest.raises(ConfigError, match="init label"):
        grid_config(setup, tmp_path, **{"axes.init": "{'../x': scratch}"})
    with pytest.raises(ConfigError, match="same label"):
        grid_config(setup, tmp_path, **{"axes.init": "[runs/a_b, runs/a/b]"})
    cells = expand(grid_config(setup, tmp_path, **{"axes.task": "[null, abnormal]"}))
    assert len(cells) == len({c.id for c in cells}) == 6  # null means the base task


def test_a_split_remade_in_place_makes_done_cells_stale(setup, tmp_path):
    splits = tmp_path / "splits.csv"
    splits.write_bytes(Path(setup["splits"]).read_bytes())
    cfg = grid_config(setup, tmp_path / "g", **{"base.data.splits": splits})
    for cell in expand(cfg):  # as a finished run leaves them
        cell_dir(cfg, cell).mkdir(parents=True)
        (cell_dir(cfg, cell) / "done").write_text(fingerprint(cfg, cell))
    assert set(status(cfg).state) == {"done"}
    manifest = load_manifest(setup["manifest"])
    remade = make_splits(
        manifest, SplitConfig(folds=3, fractions=[0.5, 1.0], val_fraction=0.2, seed=5)
    )
    remade.to_csv(splits, index=False)  # same path, other patients in each fold
    assert set(status(cfg).state) == {"stale"}
    # running it again trains afresh: nothing of the old folder (model, metrics) is reused
    one = grid_config(
        setup,
        tmp_path / "g",
        **{"base.data.splits": splits, "axes.fraction": "[1.0]", "axes.fold": "[0]"},
    )
    (cell,) = expand(one)
    (cell_dir(one, cell) / "metrics.json").write_text("{}")  # as an old finished run
    (cell_dir(one, cell) / "bundle").mkdir()
    assert run_grid(one, say=lambda _: None)["ran"] == 1
    metrics = json.loads((cell_dir(one, cell) / "metrics.json").read_text())
    assert metrics["labelled"]["train_images"] == len(fold_sets(remade, 0, 1.0)["train"])
    assert status(one).state.tolist() == ["done"]
    splits.unlink()  # a grid whose inputs cannot be found is an error, not "stale"
    with pytest.raises(ConfigError, match="not found"):
        status(one)
