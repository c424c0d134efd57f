"""`fundusfm segment eval BUNDLE M1 M2 ...`: each dataset scored as alone, one transfer table
and figure; one manifest keeps the single-dataset layout."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.config.core import SynthConfig
from fundusfm.data.manifest import load_manifest, save_manifest
from fundusfm.synthetic.generate import generate
from fundusfm.tasks.seg_transfer import METRICS, dataset_name, unique_names
from fundusfm.tasks.segment import train_segmentation
from tests.fakes import tiny_segment_config


@pytest.fixture(scope="module")
def tiny_bundle(synth_set: Path, tmp_path_factory) -> Path:
    """A ResNet-10 U-Net trained one epoch at 64 px on the synthetic set."""
    out = tmp_path_factory.mktemp("seg_bundle")
    return train_segmentation(tiny_segment_config(synth_set, out)) / "bundle"


@pytest.fixture(scope="module")
def other_set(tmp_path_factory) -> Path:
    """Six images of another generated set (also named `synthetic`), one without its mask."""
    root = tmp_path_factory.mktemp("other")
    m = load_manifest(generate(SynthConfig(n=6, size=96, seed=21, workers=1), root, False))
    table = m.table.copy()
    table.loc[0, "vessel_path"] = ""
    return save_manifest(table, m.spec, root / "manifest.csv")


def segment_eval(bundle: Path, manifests: list[Path], out: Path):
    args = ["segment", "eval", str(bundle), *map(str, manifests), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--split", "all", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return result


def test_several_manifests_give_one_row_each_equal_to_scoring_each_alone(
    tiny_bundle: Path, synth_set: Path, other_set: Path, tmp_path: Path
):
    both = segment_eval(tiny_bundle, [synth_set, other_set], tmp_path / "both")
    table = pd.read_csv(tmp_path / "both" / "transfer.csv")
    # both sidecars name the set `synthetic`: the second folder is numbered, not overwritten
    assert list(table.dataset) == ["synthetic", "synthetic-2"]
    assert list(table.manifest) == [str(synth_set), str(other_set)]
    assert (tmp_path / "both" / "transfer.png").stat().st_size > 0
    assert "synthetic-2" in both.output and "dice_own_best" in both.output
    for row, manifest in zip(table.to_dict("records"), [synth_set, other_set], strict=True):
        alone = tmp_path / f"alone_{row['dataset']}"
        segment_eval(tiny_bundle, [manifest], alone)
        metrics = json.loads((alone / "metrics.json").read_text())
        inside = json.loads((tmp_path / "both" / row["dataset"] / "metrics.json").read_text())
        assert inside["external"] == metrics["external"]
        assert (row["images"], row["skipped_no_mask"]) == (
            metrics["images"],
            metrics["skipped_no_mask"],
        )
        for name in METRICS:
            assert row[name] == pytest.approx(metrics["external"][name]), name
        assert row["threshold"] == pytest.approx(metrics["threshold"]["value"])
        best = metrics["optimistic_best"]
        assert row["dice_at_own_best_threshold"] == pytest.approx(best["dice"])
        assert row["own_best_threshold"] == pytest.approx(best["threshold"])
        ids = {p.stem for p in (tmp_path / "both" / row["dataset"] / "probabilities").glob("*")}
        assert ids == {p.stem for p in (alone / "probabilities").glob("*.png")}
    assert table.skipped_no_mask.tolist() == [0, 1] and table.images.tolist() == [40, 5]
    # the threshold is the bundle's, the same for every dataset
    assert table.threshold.nunique() == 1


def test_one_manifest_keeps_the_single_dataset_layout(
    tiny_bundle: Path, other_set: Path, tmp_path: Path
):
    result = segment_eval(tiny_bundle, [other_set], tmp_path / "one")
    made = {p.name for p in (tmp_path / "one").iterdir()}
    assert made == {"metrics.json", "per_image.csv", "probabilities"}
    assert "5 images (pooled inside the FOV)" in result.output


def test_dataset_names_come_from_the_sidecar_else_the_folder_and_are_unique(
    synth_set: Path, tmp_path: Path
):
    m = load_manifest(synth_set)
    spec = m.spec.model_copy(update={"root": str(m.root), "name": ""})
    bare = save_manifest(m.table.head(2), spec, tmp_path / "clinic_b" / "manifest.csv")
    assert (dataset_name(synth_set), dataset_name(bare)) == ("synthetic", "clinic_b")
    names = ["drive", "DRIVE", "drive", "my set/2", "transfer.csv", "..", "drive-2"]
    assert unique_names(names) == [
        "drive",
        "DRIVE-2",
        "drive-3",
        "my_set_2",
        "transfer.csv-2",
        "dataset",
        "drive-2-2",
    ]


def test_a_manifest_can_name_its_own_split(tiny_bundle: Path, synth_set: Path, other_set: Path,
                                          tmp_path: Path):  # fmt: skip
    """`PATH:SPLIT` (PATH:all: every row) beside --split: one call scores DRIVE's test part
    and the whole of CHASE_DB1."""
    m = load_manifest(synth_set)
    table = m.table.assign(split=["test"] * 10 + ["train"] * (len(m.table) - 10))
    split_set = save_manifest(table, m.spec.model_copy(update={"root": str(m.root)}),
                              tmp_path / "split" / "manifest.csv")  # fmt: skip
    args = ["segment", "eval", str(tiny_bundle), str(split_set), f"{other_set}:all"]
    result = CliRunner().invoke(
        app, [*args, "--out", str(tmp_path / "t"), "--split", "test", "--device", "cpu", "-q"]
    )
    assert result.exit_code == 0, result.output
    scored = pd.read_csv(tmp_path / "t" / "transfer.csv")
    assert scored.images.tolist() == [10, 5]  # 10 test rows; all 6 rows, one without a mask
    assert list(scored.manifest) == [str(split_set), str(other_set)]
