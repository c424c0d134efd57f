from pathlib import Path

import pytest
import yaml

from fundusfm.config.core import SplitConfig, dump_config, load_config
from fundusfm.config.grid import DemoConfig
from fundusfm.errors import ConfigError


def test_yaml_then_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("folds: 3\nfractions: [0.5, 1.0]\nseed: 4\n")
    cfg = load_config(SplitConfig, path, ["seed=9", "fractions=[0.1,1]"])
    assert cfg.folds == 3
    assert cfg.seed == 9
    assert cfg.fractions == [0.1, 1.0]


def test_nested_override():
    cfg = load_config(DemoConfig, None, ["downstream.n=12", "external.camera.blur_max=0.5"])
    assert cfg.downstream.n == 12
    assert cfg.external.camera.blur_max == 0.5


def test_unknown_key_names_key_and_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("folds: 3\nfoldz: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(SplitConfig, path)
    assert "foldz" in str(err.value)
    assert str(path) in str(err.value)
    assert "unknown key" in str(err.value)


def test_wrong_type_names_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("downstream:\n  n: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, path)
    assert "downstream.n" in str(err.value)
    assert str(path) in str(err.value)


def test_override_unknown_key_is_error():
    with pytest.raises(ConfigError, match=r"split\.fold"):
        load_config(DemoConfig, None, ["split.fold=3"])


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(SplitConfig, None, ["folds"])


def test_dump_round_trip(tmp_path: Path):
    cfg = load_config(DemoConfig, None, ["split.folds=4", "grid.axes.fold=[0, 1, 2, 3]"])
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["split"]["folds"] == 4
    assert load_config(DemoConfig, path) == cfg


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path: Path):
    from fundusfm.config import core as c
    from fundusfm.config import grid as g
    from fundusfm.config import segment as sc

    models = {
        "synth": c.SynthConfig,
        "preprocess": c.PreprocessConfig,
        "split": c.SplitConfig,
        "demo": g.DemoConfig,
        "pretrain": c.PretrainConfig,
        "finetune": c.FinetuneConfig,
        "grid": g.GridConfig,
        "segment": sc.SegmentConfig,
    }
    model = models[path.stem.split("_")[0]]
    cfg = load_config(model, path)
    if path.stem in models:  # the plain-named files document the defaults or the paper's setting
        changed = differences(cfg.model_dump(mode="json"), model().model_dump(mode="json"))
        assert changed == PAPER_SETTINGS.get(path.stem, {})


# Where configs/pretrain.yaml and finetune.yaml (the paper's GPU setting: ResNet-50 at 512 px,
# already the defaults) and segment.yaml (the FOV scaled to DRIVE's 540 px, on 576 px) differ
# from the defaults, and nowhere else.
PAPER_SETTINGS = {
    "segment": {"data.resolution": 576, "data.fov_diameter": 540},
    "pretrain": {"data.task": "abnormal", "train.epochs": 30, "train.workers": 8},
    "finetune": {
        "model.init": "imagenet",
        "train.lr": 0.0001,
        "train.patience": 5,
        "train.workers": 8,
    },
}


def differences(a: dict, b: dict, prefix: str = "") -> dict:
    """Dotted keys whose values differ between two nested config dumps, with a's value."""
    out = {}
    for key, value in a.items():
        if isinstance(value, dict) and isinstance(b.get(key), dict):
            out |= differences(value, b[key], f"{prefix}{key}.")
        elif value != b.get(key):
            out[f"{prefix}{key}"] = value
    return out


def test_demo_cpu_grid_config_matches_what_the_demo_runs():
    """configs/grid_cpu.yaml documents the demo's grid: same axes and training settings."""
    from fundusfm.config.grid import DemoConfig, GridConfig

    shipped = load_config(GridConfig, CONFIGS / "grid_cpu.yaml")
    demo = DemoConfig().grid
    for field in ("method", "resolution", "fraction", "fold"):
        assert getattr(shipped.axes, field) == getattr(demo.axes, field), field
    assert (shipped.name, shipped.out.parts[-2:]) == (demo.name, ("runs", "grid"))  # resumes
    assert shipped.base.train == demo.base.train
    assert shipped.base.model.arch == demo.base.model.arch
    assert shipped.base.data.resolution == demo.base.data.resolution


@pytest.mark.parametrize(
    ("stem", "kind"),
    [
        ("grid_cpu", "ClassificationGrid"),
        ("grid_paper", "ClassificationGrid"),
        ("grid_segment", "SegmentationGrid"),
    ],
)
def test_each_shipped_grid_loads_as_its_kind(stem: str, kind: str):
    """grid_cpu and grid_paper have no `kind:` and load as classification grids, as before."""
    from fundusfm.config import grid as g

    cfg = load_config(g.GridConfig, CONFIGS / f"{stem}.yaml")
    assert type(cfg) is getattr(g, kind)
    assert cfg.kind == {"ClassificationGrid": "classification"}.get(kind, "segmentation")


def test_grid_kind_without_kind_follows_the_section_given():
    from fundusfm.config.grid import ClassificationGrid, GridConfig, SegmentationGrid

    assert type(load_config(GridConfig, None, [])) is ClassificationGrid
    segment = ["segment.data.patch=64", "axes.fold=[0]"]
    assert type(load_config(GridConfig, None, segment)) is SegmentationGrid


@pytest.mark.parametrize(
    ("sets", "named"),
    [
        (["kind=classification", "segment.train.epochs=2"], "segment"),
        (["kind=segmentation", "axes.fold=[0]", "base.train.epochs=2"], "base"),
        (["kind=segmentation", "axes.fold=[0]", "probe.mode=train"], "probe"),
        (["kind=segmentation", "axes.fold=[0]", "axes.task=[abnormal]"], "axes.task"),
        (["external=[{name: e, manifest: m.csv, split: test}]"], "external.0.split"),
        (
            [
                "kind=segmentation",
                "axes.fold=[0]",
                "external=[{name: e, manifest: m.csv, task: t}]",
            ],
            "external.0.task",
        ),
    ],
)
def test_a_setting_of_the_other_grid_kind_is_refused_by_name(sets: list[str], named: str):
    with pytest.raises(ConfigError) as err:
        from fundusfm.config.grid import GridConfig

        load_config(GridConfig, None, sets)
    other = "classification" if "kind=segmentation" in sets else "segmentation"
    assert f"{named}: read by a {other} grid" in str(err.value)
    assert f"set kind: {other}" in str(err.value)


def test_grid_methods_of_the_other_kind_are_refused():
    from fundusfm.config.grid import GridConfig

    with pytest.raises(ConfigError, match=r"\['frozen'\] do not fit a classification grid"):
        load_config(GridConfig, None, ["axes.method=[frozen]"])


def test_an_unknown_grid_kind_is_refused_listing_the_kinds(tmp_path: Path):
    from fundusfm.config.grid import GridConfig

    path = tmp_path / "grid.yaml"
    path.write_text("kind: detection\n")
    with pytest.raises(ConfigError) as err:
        load_config(GridConfig, path)
    assert str(path) in str(err.value)
    assert "kind: 'detection' is not one of: classification, segmentation" in str(err.value)


def test_a_grid_config_round_trips_as_its_kind(tmp_path: Path):
    from fundusfm.config.grid import GridConfig, SegmentationGrid

    cfg = load_config(GridConfig, CONFIGS / "grid_segment.yaml")
    again = load_config(GridConfig, dump_config(cfg, tmp_path / "grid.yaml"))
    assert isinstance(again, SegmentationGrid) and again == cfg


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("grid.axes.fraction=[0.1, 1.0]", "not in split.fractions"),
        ("grid.axes.fold=[0, 1, 2, 3, 4, 5]", "needs split.folds > 5"),
        ("grid.base.model.arch=resnet18", "differs from pretrain.model.arch"),
    ],
)
def test_the_demos_settings_stated_twice_must_agree(setting: str, words: str):
    """A grid fraction the splits lack, a fold they do not have or a grid arch other than
    the pretrained one would fail every such cell only at the end of the demo."""
    from fundusfm.config.grid import DemoConfig

    with pytest.raises(ConfigError, match=words):
        load_config(DemoConfig, None, [setting])
