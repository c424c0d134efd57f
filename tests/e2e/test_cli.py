from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from fundusfm import __version__
from fundusfm.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ["synth", "preprocess", "split", "demo", "data", "bench"]:
        assert command in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_synth_writes_set_and_config(tmp_path: Path):
    out = tmp_path / "s"
    result = invoke("synth", out, "--n", 4, "--size", 64, "--seed", 5, "-q")
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "manifest.csv")) == 4
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 5
    again = invoke("synth", out, "--n", 4, "-q")
    assert again.exit_code == 2 and "already holds" in again.output


def test_bad_override_is_clear_error(tmp_path: Path):
    result = invoke("synth", tmp_path / "s", "--set", "camera.blurr=1")
    assert result.exit_code == 2
    assert "camera.blurr" in result.output and "unknown key" in result.output


def test_data_check_exit_codes(synth_set: Path, tmp_path: Path):
    ok = invoke("data", "check", synth_set, "-q")
    assert ok.exit_code in (0, 1)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    table = pd.read_csv(synth_set).head(4)
    table["path"] = [str(synth_set.parent / p) for p in table["path"]]  # outside the new root
    table.loc[1, "image_id"] = table.loc[0, "image_id"]
    table.to_csv(bad_dir / "manifest.csv", index=False)
    result = invoke(
        "data", "check", bad_dir / "manifest.csv", "-q", "--report", tmp_path / "problems.csv"
    )
    assert result.exit_code == 1
    assert "duplicate image_id" in result.output and "outside the data root" in result.output
    assert len(pd.read_csv(tmp_path / "problems.csv")) >= 5
    missing = invoke("data", "check", tmp_path / "nope.csv")
    assert missing.exit_code == 2 and "manifest not found" in missing.output


def test_preprocess_and_split(synth_set: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    first = invoke("preprocess", synth_set, "--resolution", 32, "--cache", cache, "-q")
    assert first.exit_code == 0 and "40 built" in first.output
    second = invoke("preprocess", synth_set, "--resolution", 32, "--cache", cache, "-q")
    assert "0 built" in second.output and "40 unchanged" in second.output
    (written,) = cache.glob("32px-*")
    assert yaml.safe_load((written / "config.yaml").read_text())["resolution"] == 32

    out = tmp_path / "splits.csv"
    result = invoke(
        "split",
        synth_set,
        "--folds",
        4,
        "--fractions",
        "0.25,0.5,1",
        "--seed",
        2,
        "--out",
        out,
        "--task",
        "abnormal",
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert set(table.fold) == {0, 1, 2, 3}
    wanted = {f"frac_{f}_fold{k}" for f in ("0.25", "0.5", "1") for k in range(4)}
    assert wanted <= set(table.columns)
    assert yaml.safe_load(out.with_suffix(".config.yaml").read_text())["seed"] == 2
    summary = pd.read_csv(out.with_suffix(".summary.csv"))  # the sidecar: realised shares
    assert len(summary) == 12 and (summary.share[summary.fraction == 1] == 1).all()
    assert "share = training images / the fold's training pool" in result.output
    assert "validation is scaled" in result.output
    bad = invoke("split", synth_set, "--fractions", "a,b")
    assert bad.exit_code == 2 and "--fractions" in bad.output


def test_scan_folder(synth_set: Path, tmp_path: Path):
    out = tmp_path / "m" / "scan.csv"
    result = invoke("data", "scan", synth_set.parent, "--pattern", "images/*", "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert len(table) == 40 and (table.eye == "unknown").all()
    assert invoke("data", "check", out, "-q").exit_code == 0


@pytest.fixture
def two_threads():
    """The golden results were computed on 2 intra-op threads (2 cores): CPU reductions
    split by thread, so another thread count moves FF scores in the 6th decimal."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _difference(results: pd.DataFrame, golden: pd.DataFrame) -> str | None:
    """None when the frames are equal to 1e-6, else the first difference."""
    try:
        pd.testing.assert_frame_equal(results, golden, check_exact=False, rtol=0, atol=1e-6)
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, two_threads):
    """The demo's whole pipeline on a reduced preset (tiny sets, 1 epoch, 3 folds, offline),
    and its results.csv equal to the one the code wrote before the package was restructured."""
    out = tmp_path / "demo"
    sets = [
        "upstream.n=40",
        "upstream.size=96",
        "downstream.n=36",
        "downstream.size=96",
        "external.n=10",
        "external.size=96",
        "pretrain.model.arch=resnet18",  # the arch the golden file was made with
        "grid.base.model.arch=resnet18",
        "pretrain.data.resolution=64",
        "pretrain.train.epochs=1",
        "pretrain.train.select_metric=loss",
        "grid.base.data.resolution=64",
        "grid.axes.resolution=[64]",
        "grid.base.train.epochs=1",
        "grid.base.train.select_metric=loss",
        "grid.axes.fold=[0, 1, 2]",
        "split.folds=3",
        "split.val_fraction=0.25",
        "grid.axes.fraction=[0.5, 1.0]",
        "split.fractions=[0.5, 1.0]",
        "n_boot=20",
    ]
    demo_yaml = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"  # the defaults
    args = ["--config", demo_yaml, *[a for s in sets for a in ("--set", s)]]
    result = invoke("demo", "--out", out, "--offline", "-q", *args)
    assert result.exit_code == 0, result.output
    assert "ImageNet arms skipped: offline" in result.output
    report = out / "runs" / "grid" / "report" / "report.html"
    assert f"report: {report}" in result.output and report.is_file()
    summary = pd.read_csv(report.parent / "summary.csv")
    assert set(summary.init) == {"scratch", "fundus"} and set(summary.method) == {"lf", "ff"}
    assert (summary.folds == 3).all()
    external = pd.read_csv(report.parent / "external.csv")
    assert "ext_shifted_camera_auroc_mean" in external.columns
    page = report.read_text("utf-8")  # the demo ran Grad-CAM and t-SNE for the report
    assert '<section id="gradcam">' in page and '<section id="tsne">' in page
    explained = out / "runs" / "grid" / "explain"
    for label in ("scratch", "fundus"):
        shown = sorted(p.stem for p in (explained / "gradcam" / label / "overlays").glob("*.png"))
        assert shown and shown == sorted(
            p.stem for p in (explained / "gradcam" / "scratch" / "overlays").glob("*.png")
        )
    assert set(pd.read_csv(explained / "tsne" / "separation.csv").model) == {
        "scratch",
        "pretrain_fundus",
    }
    # behaviour kept across the package restructure: results.csv as the flat package wrote it
    # (commit 329b36a, the last before it, same preset), on one of the machines whose output
    # is recorded (golden/README.md: CPU float reductions differ between machines)
    results = pd.read_csv(report.parent / "results.csv")
    goldens = sorted((Path(__file__).parent / "golden").glob("demo_reduced_results_*.csv"))
    differences = [_difference(results, pd.read_csv(g)) for g in goldens]
    assert goldens and None in differences, "results.csv equals no golden file:\n" + "\n".join(
        f"{g.name}: {d}" for g, d in zip(goldens, differences, strict=True)
    )
    rerun = invoke("demo", "--out", out, "--offline", "-q", *args)  # resumes: nothing to redo
    assert rerun.exit_code == 0 and "pretraining" not in rerun.output
    assert "Grad-CAM" not in rerun.output and "t-SNE" not in rerun.output


def test_user_errors_are_one_line_not_tracebacks(synth_set: Path, tmp_path: Path):
    for args in (
        ["preprocess", tmp_path / "nope.csv"],
        ["split", tmp_path / "nope.csv"],
        ["bench", "cache", tmp_path / "nope.csv"],
    ):
        result = invoke(*args)
        assert result.exit_code == 2 and "manifest not found" in result.output, args
    table = pd.read_csv(synth_set).drop(columns=["patient_id"])
    table.to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "m.yaml").write_text((synth_set.with_suffix(".yaml")).read_text())
    result = invoke("split", tmp_path / "m.csv")
    assert result.exit_code == 2 and "missing column(s) patient_id" in result.output
    (tmp_path / "afile").write_text("x")
    result = invoke("preprocess", synth_set, "--cache", tmp_path / "afile", "-q")
    assert result.exit_code == 2 and "error:" in result.output


def test_a_bad_option_value_is_typers_usage_error_not_a_bug_report(tmp_path: Path):
    """typer checks option types itself; its error must pass through as a usage error
    naming the option (typer 0.29 raises its own bundled click's exceptions)."""
    result = invoke("synth", tmp_path / "s", "--n", "abc")
    assert result.exit_code == 2 and "--n" in result.output
    assert "it is a bug" not in result.output and "failed:" not in result.output


def test_cpu_presets_run_end_to_end(synth_set: Path, tmp_path: Path):
    """Every shipped CPU preset runs through the CLI (shrunk: 1 epoch, 64 px)."""
    configs = Path(__file__).resolve().parents[2] / "configs"
    splits = tmp_path / "splits.csv"
    assert (
        invoke(
            "split",
            synth_set,
            "--out",
            splits,
            "--folds",
            3,
            "--task",
            "abnormal",
            "--set",
            "val_fraction=0.2",
        ).exit_code
        == 0
    )
    shrink = [
        "--set",
        "train.epochs=1",
        "--set",
        "data.resolution=64",
        "--set",
        f"data.cache={tmp_path / 'cache'}",
        "-q",
    ]
    pre = invoke(
        "pretrain",
        "--config",
        configs / "pretrain_cpu.yaml",
        "--set",
        f"data.manifest={synth_set}",
        "--set",
        f"run.out={tmp_path / 'pre'}",
        *shrink,
    )
    assert pre.exit_code == 0, pre.output
    assert "bundle:" in pre.output
    for method in ("lf", "ff"):
        result = invoke(
            "finetune",
            "--config",
            configs / f"finetune_cpu_{method}.yaml",
            "--set",
            f"data.manifest={synth_set}",
            "--set",
            f"data.splits={splits}",
            "--set",
            f"model.init={tmp_path / 'pre' / 'bundle'}",
            "--set",
            f"run.out={tmp_path / method}",
            *shrink,
        )
        assert result.exit_code == 0, result.output
        assert "test: auroc" in result.output
    again = invoke(
        "finetune",
        "--config",
        configs / "finetune_cpu_lf.yaml",
        "--set",
        f"data.manifest={synth_set}",
        "--set",
        f"data.splits={splits}",
        "--set",
        f"run.out={tmp_path / 'lf'}",
        *shrink,
    )
    assert again.exit_code == 2 and "finished run" in again.output
    ev = invoke(
        "evaluate",
        tmp_path / "lf" / "bundle",
        synth_set,
        "--out",
        tmp_path / "ev",
        "--task",
        "abnormal",
        "--cache",
        tmp_path / "cache",
        "--device",
        "cpu",
        "-q",
    )
    assert ev.exit_code == 0, ev.output
    assert (tmp_path / "ev" / "metrics.json").is_file()
    missing = invoke(
        "finetune", "--set", "data.manifest=null", "--set", f"run.out={tmp_path / 'm'}", "-q"
    )
    assert missing.exit_code == 2 and "data.manifest is not set" in missing.output


def test_demo_refuses_other_settings_in_the_same_folder(tmp_path: Path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.yaml").write_text("n_boot: 7\n")
    result = invoke("demo", "--out", out, "--offline", "-q")
    assert result.exit_code == 2 and "holds a demo with other settings" in result.output


def test_data_import_command(tmp_path: Path):
    bad = invoke("data", "import", "messidor", tmp_path, "--out", tmp_path / "m.csv")
    assert bad.exit_code == 2 and "choose one of" in bad.output
    from tests.fakes import fundus, mask

    for stem in ("01_h", "02_g"):
        fundus(tmp_path / "HRF" / "images" / f"{stem}.jpg", seed=int(stem[:2]))
        mask(tmp_path / "HRF" / "manual1" / f"{stem}.tif")
    result = invoke("data", "import", "hrf", tmp_path / "HRF", "--out", tmp_path / "m" / "h.csv")
    assert result.exit_code == 0, result.output
    assert "2 images" in result.output and "2 FOV masks derived" in result.output


def test_debug_shows_the_traceback_of_a_value_error(synth_set: Path, monkeypatch):
    import fundusfm.data.splits as splits
    from fundusfm.cli.common import DEBUG

    def broken(*args, **kwargs):
        raise ValueError("shapes (3,) and (4,) not aligned")

    monkeypatch.setattr(splits, "make_splits", broken)
    plain = invoke("split", synth_set, "--out", "/nonexistent/never/splits.csv")
    assert plain.exit_code == 2 and plain.output.strip() == (
        "error: shapes (3,) and (4,) not aligned"
    )
    try:
        debug = runner.invoke(app, ["--debug", "split", str(synth_set), "--out", "/x/s.csv"])
    finally:
        DEBUG["traceback"] = False
    assert isinstance(debug.exception, ValueError)
