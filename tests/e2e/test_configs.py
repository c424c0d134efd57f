"""Every shipped config in configs/ runs end to end through the CLI on generated data.

Each config is run by the command its header comment names, shrunk with --set (a tiny
backbone, 64 px, 1 epoch, one grid cell, data and outputs under tmp_path, CPU), and one real
output of each run is checked. `test_every_shipped_config_has_an_end_to_end_run` fails, naming
the file, when a config is added to configs/ without an entry in RUNS (or in ELSEWHERE).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
import yaml
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.config.core import SplitConfig
from fundusfm.data.manifest import load_manifest, save_manifest
from fundusfm.data.splits import make_splits
from tests.conftest import TINY_ARCH
from tests.models.test_peers import mae_checkpoint, vit_state

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Shipped configs run end to end by other tests, and where.
ELSEWHERE = {
    "pretrain_cpu": "tests/e2e/test_cli.py::test_cpu_presets_run_end_to_end",
    "finetune_cpu_lf": "tests/e2e/test_cli.py::test_cpu_presets_run_end_to_end",
    "finetune_cpu_ff": "tests/e2e/test_cli.py::test_cpu_presets_run_end_to_end",
    # `fundusfm demo --config configs/demo.yaml` (the demo's defaults), shrunk with --set
    "demo": "tests/e2e/test_cli.py::test_demo_runs_end_to_end",
}

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, f"fundusfm {' '.join(map(str, args))}\n{result.output}"
    return result


def sets(*assignments: str) -> list[str]:
    return [part for a in assignments for part in ("--set", a)]


@dataclass
class Ctx:
    manifest: Path  # the session's 40 generated images (read-only)
    splits: Path  # 3 folds, fraction 1, stratified on abnormal
    external: Path  # 8 of those images (4 normal, 4 abnormal): the sets scored after training
    imagenet18: Path  # a ResNet-18 state dict standing in for torchvision's ImageNet file
    cache: Path  # preprocessed images shared by this module's training runs
    tmp: Path  # this test's own folder


@pytest.fixture(scope="module")
def shared(synth_set: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("configs")
    manifest = load_manifest(synth_set)
    splits = make_splits(
        manifest, SplitConfig(folds=3, fractions=[1.0], val_fraction=0.2, task="abnormal")
    )
    splits.to_csv(out / "splits.csv", index=False)
    spec = manifest.spec.model_copy(update={"root": str(manifest.root)})
    few = manifest.table.groupby("abnormal").head(4)
    save_manifest(few, spec, out / "external" / "manifest.csv")
    # resnet10 has no ImageNet weights, so the configs that start from ImageNet (pretrain:
    # strategy imagenet+fundus; finetune and segment: init imagenet) run a ResNet-18 from this
    # file (random weights: only the loading path matters here), keeping their init as shipped.
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), out / "resnet18_imagenet.pth")
    return {
        "manifest": synth_set,
        "splits": out / "splits.csv",
        "external": out / "external" / "manifest.csv",
        "imagenet18": out / "resnet18_imagenet.pth",
        "cache": out / "cache",
    }


# --- commands: each config's command as its header comment names it, shrunk ------------------

Commands = list[list]


def train_shrink(c: Ctx, prefix: str = "") -> list[str]:
    """The classification settings shrunk for CPU (`prefix` base. for a grid's cells)."""
    return [
        f"{prefix}data.manifest={c.manifest}",
        f"{prefix}data.resolution=64",
        f"{prefix}data.cache={c.cache}",
        f"{prefix}train.epochs=1",
        f"{prefix}train.batch_size=16",
        f"{prefix}train.workers=0",  # the GPU configs' 8 loader processes cost seconds here
        f"{prefix}train.device=cpu",
    ]


def seg_shrink(c: Ctx, prefix: str = "") -> list[str]:
    return [
        f"{prefix}data.manifest={c.manifest}",
        f"{prefix}data.splits={c.splits}",
        f"{prefix}model.decoder_channels=[64, 32, 16, 16, 8]",
        f"{prefix}train.epochs=1",
        f"{prefix}train.batch_size=8",
        f"{prefix}train.device=cpu",
    ]


def imagenet18(c: Ctx) -> list[str]:
    return ["model.arch=resnet18", f"model.imagenet_file={c.imagenet18}"]


def one_cell(c: Ctx, method: str) -> list[str]:
    """A grid cut to 1 init (scratch: the shipped bundle paths do not exist) x 1 method x
    64 px x fraction 1 x fold 0, written under tmp_path."""
    return [
        "axes.init={scratch: scratch}",
        f"axes.method=[{method}]",
        "axes.resolution=[64]",
        "axes.fraction=[1.0]",
        "axes.fold=[0]",
        f"out={c.tmp / 'grid'}",
    ]


def grid_commands(stem: str, overrides: list[str]) -> Commands:
    grid = CONFIGS / f"{stem}.yaml"
    return [
        ["grid", "run", grid, *sets(*overrides), "-q"],
        ["grid", "status", grid, *sets(*overrides)],
        ["grid", "report", grid, *sets(*overrides), "--n-boot", 20],
    ]


def synth(c: Ctx) -> Commands:
    config, shrink = CONFIGS / "synth.yaml", sets("n=6", "size=96")
    return [["synth", c.tmp / "set", "--config", config, *shrink, "-q"]]


def preprocess(c: Ctx) -> Commands:
    config, shrink = CONFIGS / "preprocess.yaml", sets("resolution=64")
    return [
        ["preprocess", c.manifest, "--config", config, *shrink, "--cache", c.tmp / "cache", "-q"]
    ]


def split(c: Ctx) -> Commands:
    out = c.tmp / "splits.csv"
    return [["split", c.manifest, "--config", CONFIGS / "split.yaml", "--out", out]]


def pretrain(c: Ctx) -> Commands:
    overrides = [*train_shrink(c), *imagenet18(c), f"run.out={c.tmp / 'run'}"]
    return [["pretrain", "--config", CONFIGS / "pretrain.yaml", *sets(*overrides), "-q"]]


def finetune(c: Ctx) -> Commands:
    overrides = [
        *train_shrink(c),
        f"data.splits={c.splits}",
        *imagenet18(c),
        f"run.out={c.tmp / 'run'}",
    ]
    return [["finetune", "--config", CONFIGS / "finetune.yaml", *sets(*overrides), "-q"]]


def segment(c: Ctx) -> Commands:  # init unset: imagenet, as shipped; FOV scaled, smaller
    small = ["data.resolution=64", "data.fov_diameter=60"]
    overrides = [*seg_shrink(c), *small, *imagenet18(c), f"run.out={c.tmp / 'run'}"]
    return [["segment", "train", "--config", CONFIGS / "segment.yaml", *sets(*overrides), "-q"]]


def segment_cpu(c: Ctx) -> Commands:  # patches as shipped, smaller: 32 px of 64 px images
    overrides = [
        *seg_shrink(c),
        f"model.arch={TINY_ARCH}",
        "data.resolution=64",
        "data.fov_diameter=60",
        "data.patch=32",
        "data.patches_per_image=1",
        f"run.out={c.tmp / 'run'}",
    ]
    config = CONFIGS / "segment_cpu.yaml"
    bundle, scored = c.tmp / "run" / "bundle", ["--split", "all", "--out", c.tmp / "eval"]
    return [
        ["segment", "train", "--config", config, *sets(*overrides), "-q"],
        ["segment", "eval", bundle, c.external, *scored, "--device", "cpu", "-q"],
    ]


def grid_paper(c: Ctx) -> Commands:
    cls = [*train_shrink(c, "base."), f"base.data.splits={c.splits}"]
    overrides = [*cls, f"base.model.arch={TINY_ARCH}", *one_cell(c, "lf")]
    return grid_commands("grid_paper", overrides)


def grid_cpu(c: Ctx) -> Commands:
    external = f"external=[{{name: shifted_camera, manifest: {c.external}, task: abnormal}}]"
    cls = [*train_shrink(c, "base."), f"base.data.splits={c.splits}"]
    overrides = [*cls, f"base.model.arch={TINY_ARCH}", *one_cell(c, "ff"), external]
    return grid_commands("grid_cpu", overrides)


def grid_segment(c: Ctx) -> Commands:
    external = f"external=[{{name: drive, manifest: {c.external}}}]"  # one of the two
    seg = [*seg_shrink(c, "segment."), f"segment.model.arch={TINY_ARCH}"]
    return grid_commands("grid_segment", [*seg, *one_cell(c, "frozen"), external])


def grid_compare_models(c: Ctx) -> Commands:
    """A RETFound-layout checkpoint (random, ViT-Ti width) imported as the header says, then a
    grid of it beside scratch, LF and FF: ResNet and ViT inits mixed in one grid."""
    checkpoint = c.tmp / "RETFound_cfp_weights.pth"
    torch.save(mae_checkpoint(vit_state(width=192, depth=12, patch=16, grid=14)), checkpoint)
    bundle = c.tmp / "weights" / "retfound"
    cls = [*train_shrink(c, "base."), f"base.data.splits={c.splits}"]
    cells = [*one_cell(c, "lf"), "axes.method=[lf, ff]"]
    inits = f"axes.init={{scratch: scratch, retfound: {bundle}}}"
    own = "axes.init_resolution={retfound: 32}"  # the ViT at its own size, the ResNet at 64
    overrides = [*cls, f"base.model.arch={TINY_ARCH}", *cells, inits, own]
    arch = ["--arch", "timm:vit_tiny_patch16_224"]  # the test's ViT-Ti width, not ViT-L
    imported = ["weights", "import", "retfound", checkpoint, "--out", bundle, *arch]
    return [imported, *grid_commands("grid_compare_models", overrides)]


# --- checks: one real output of each run ------------------------------------------------------


def shipped(stem: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{stem}.yaml").read_text())


def check_synth(c: Ctx, outputs: list[str]) -> None:
    assert len(pd.read_csv(c.tmp / "set" / "manifest.csv")) == 6
    assert yaml.safe_load((c.tmp / "set" / "config.yaml").read_text())["size"] == 96


def check_preprocess(c: Ctx, outputs: list[str]) -> None:
    (written,) = (c.tmp / "cache").glob("64px-*")
    assert yaml.safe_load((written / "config.yaml").read_text())["resolution"] == 64
    assert "40 built" in outputs[0]
    assert len(pd.read_csv(written / "index.csv")) == 40
    assert len(list((written / "arrays").glob("*.npy"))) == 40


def check_split(c: Ctx, outputs: list[str]) -> None:
    table, config = pd.read_csv(c.tmp / "splits.csv"), shipped("split")
    assert table.fold.nunique() == config["folds"]  # 5 folds of 20 patients fit
    folds = range(config["folds"])
    fractions = {f"frac_{f:g}_fold{k}" for f in config["fractions"] for k in folds}
    assert fractions <= set(table.columns)


def check_bundle(c: Ctx, outputs: list[str]) -> None:
    assert "bundle:" in outputs[0]
    assert (c.tmp / "run" / "bundle" / "bundle.json").is_file()


def check_pretrain(c: Ctx, outputs: list[str]) -> None:
    check_bundle(c, outputs)
    meta = json.loads((c.tmp / "run" / "bundle" / "bundle.json").read_text())
    assert meta["provenance"]["config"]["strategy"] == shipped("pretrain")["strategy"]


def check_finetune(c: Ctx, outputs: list[str]) -> None:
    check_bundle(c, outputs)
    assert "test: auroc" in outputs[0]


def check_segment(c: Ctx, outputs: list[str]) -> None:
    check_bundle(c, outputs)
    metrics = json.loads((c.tmp / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["test"]["dice"]), metrics["test"]
    meta = json.loads((c.tmp / "run" / "bundle" / "bundle.json").read_text())
    assert meta["preprocessing"]["fov_diameter"] == metrics["inference"]["fov_diameter"] == 60


def check_segment_cpu(c: Ctx, outputs: list[str]) -> None:
    check_segment(c, outputs)
    metrics = json.loads((c.tmp / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 8 and math.isfinite(metrics["external"]["dice"])


def check_grid(c: Ctx, outputs: list[str]) -> None:
    ran, status, report = outputs
    assert "1 ran, 0 failed, 0 pending" in ran
    assert status.split() == ["state", "done", "1"], status
    out = c.tmp / "grid" / "report"
    assert f"report: {out / 'report.html'}" in report and (out / "report.html").is_file()
    assert len(pd.read_csv(out / "summary.csv")) == 1


def check_compare_models(c: Ctx, outputs: list[str]) -> None:
    imported, ran, _status, _report = outputs
    assert "RETFound (MAE, colour fundus)" in imported
    assert "4 ran, 0 failed, 0 pending" in ran, ran
    out = c.tmp / "grid" / "report"
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(zip(summary.init, summary.method, strict=True)) == [
        ("retfound", "ff"), ("retfound", "lf"), ("scratch", "ff"), ("scratch", "lf"),
    ]  # fmt: skip
    pairs = pd.read_csv(out / "comparisons.csv")
    assert {frozenset((a, b)) for a, b in zip(pairs.init_a, pairs.init_b, strict=True)} == {
        frozenset(("retfound", "scratch"))
    }
    assert "p_holm" in pairs.columns and len(pairs) == 2  # one pair per method
    fed = dict(zip(pairs.init_a, pairs.resolution_a, strict=True))
    fed |= dict(zip(pairs.init_b, pairs.resolution_b, strict=True))
    assert fed == {"scratch": 64, "retfound": 32} and set(pairs.resolution) == {64}
    methods = html.unescape((out / "report.html").read_text("utf-8"))
    assert "torchvision's ResNet-10 (timm's vit_tiny_patch16_224 for retfound)" in methods
    assert "64 px; retfound at its own 32 px, compared with the others at each" in methods
    (cell,) = (c.tmp / "grid" / "cells").glob("task=*/init=retfound/method=ff/res=32/*/*")
    meta = json.loads(next(cell.rglob("bundle.json")).read_text())
    assert meta["architecture"]["arch"] == "timm:vit_tiny_patch16_224"
    notes = meta["provenance"]["init_source"]["notes"]
    assert notes == ["position embeddings resampled 14x14 -> 2x2 (bicubic)"]


Check = Callable[[Ctx, list[str]], None]
RUNS: dict[str, tuple[Callable[[Ctx], Commands], Check]] = {
    "synth": (synth, check_synth),
    "preprocess": (preprocess, check_preprocess),
    "split": (split, check_split),
    "pretrain": (pretrain, check_pretrain),
    "finetune": (finetune, check_finetune),
    "segment": (segment, check_segment),
    "segment_cpu": (segment_cpu, check_segment_cpu),
    "grid_paper": (grid_paper, check_grid),
    "grid_cpu": (grid_cpu, check_grid),
    "grid_segment": (grid_segment, check_grid),
    "grid_compare_models": (grid_compare_models, check_compare_models),
}


def header(stem: str) -> str:
    """The comment block a config starts with."""
    lines = (CONFIGS / f"{stem}.yaml").read_text().splitlines()
    return "\n".join(takewhile(lambda line: line.startswith("#"), lines))


def test_every_shipped_config_has_an_end_to_end_run():
    stems = {p.stem for p in CONFIGS.glob("*.yaml")}
    missing = sorted(stems - set(RUNS) - set(ELSEWHERE))
    assert not missing, (
        f"{', '.join(f'configs/{m}.yaml' for m in missing)}: no end-to-end run; add the "
        "command its header names to RUNS in tests/e2e/test_configs.py"
    )
    gone = sorted((set(RUNS) | set(ELSEWHERE)) - stems)
    assert not gone, f"RUNS / ELSEWHERE name configs that are not shipped: {gone}"
    assert not set(RUNS) & set(ELSEWHERE)


@pytest.mark.parametrize("stem", sorted(RUNS))
def test_shipped_config_runs_end_to_end(stem: str, shared: dict, tmp_path: Path):
    build, check = RUNS[stem]
    c = Ctx(tmp=tmp_path, **shared)
    commands = build(c)
    # the command run is the one the config's header documents
    words = " ".join(takewhile(lambda w: isinstance(w, str) and w[0] != "-", commands[0]))
    assert f"fundusfm {words}" in header(stem), f"{stem}.yaml's header names another command"
    outputs = [invoke(*command).output for command in commands]
    check(c, outputs)
