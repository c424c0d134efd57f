"""`fundusfm bench run`: every row present with a finite positive figure; no timed assertions."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fundusfm.bench import screening
from fundusfm.bench.runner import parse_only
from fundusfm.bench.workspace import replicated_cache
from fundusfm.cli import app
from fundusfm.data.preprocess import ImageCache
from fundusfm.errors import ConfigError

QUICK_ROWS = {
    "a.cpu.64",
    "a.cpu.96",
    "a.cpu.64.w1p",
    "b",
    "b.grid",
    "c.64.eager",
    "c.64.onnxruntime",
    "c.64.torch.compile",
    "c.predict.64",
    "d",
}


@pytest.mark.slow
def test_quick_run_prints_table_and_writes_every_row(tmp_path: Path):
    """Rows b and d here; rows a and c run in the GPU check's CPU dry run
    (tests/bench/test_gpu_check.py), which calls `bench run --quick --only a` and `--only c`
    and checks the same things of them (`check_quick_rows`)."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "run", "--quick", "--only", "b,d", "--json", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {r["id"]: r for r in report["rows"]}
    assert set(rows) == {"b", "b.grid", "d"}
    check_quick_rows(rows, ["b", "b.grid", "d"])
    memory = rows["d"]["values"]
    assert memory["peak_mb_small"] > 0 and memory["peak_mb_large"] > 0
    assert rows["b"]["values"]["cells"] == 4  # 2 folds x 2 fractions
    assert report["command"].startswith("fundusfm bench run --quick")
    table = result.stdout
    assert table.splitlines()[0].split() == ["row", "setting", "figure", "ratio", "goal"]
    first_cells = {line.split()[0] for line in table.splitlines()[2:] if line.strip()}
    assert {"b", "d"} <= first_cells  # each row id is a row of its own


def check_quick_rows(rows: dict, wanted) -> None:
    """Every wanted row of `bench run --quick` ran and has its figure, setting and goal (a
    torch.compile row fails by name where there is no C++ compiler for Inductor)."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    for rid in wanted:
        r = rows[rid]
        if rid.endswith("torch.compile") and not compiler:
            assert r["status"] == "failed" and r["reason"]
            continue
        assert r["status"] == "ok", (rid, r["reason"])
        assert r["ratio"] is not None and math.isfinite(r["ratio"]) and r["ratio"] > 0, rid
        assert r["figure"] and r["setting"] and r["goal"]


def test_lf_row_runs_a_timm_arch_at_the_preset_resolution(tmp_path: Path):
    """`--set lf_arch=... --set lf_resolution=...`: row b builds that model at that size and
    names it; b.grid has the extraction's images/s and the grid / one-pass ratio."""
    out = tmp_path / "bench.json"
    sets = ["lf_arch=timm:vit_tiny_patch16_224", "lf_resolution=32", "images=12"]
    args = ["bench", "run", "--quick", "--only", "lf", *(a for s in sets for a in ("--set", s))]
    result = CliRunner().invoke(app, [*args, "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["command"].endswith(" --set ".join(["", *sets]))
    rows = {r["id"]: r for r in report["rows"]}
    assert set(rows) == {"b", "b.grid"}
    check_quick_rows(rows, ["b", "b.grid"])
    for r in rows.values():
        assert r["setting"].startswith("timm:vit_tiny_patch16_224, 32 px, 12 images, 2 folds")
    v = rows["b.grid"]["values"]
    assert (v["arch"], v["resolution"], v["images"], v["cells"]) == (
        "timm:vit_tiny_patch16_224",
        32,
        12,
        4,
    )
    assert v["feature_dim"] == 192  # ViT-Ti/16's width: the timm model was built
    assert v["extract_images_per_s"] > 0 and rows["b.grid"]["ratio"] >= 1
    assert rows["b.grid"]["ratio"] == v["lf_cost_vs_one_extraction"]
    assert rows["b.grid"]["goal"] == "<= 1.30"
    grid_line = next(line for line in result.stdout.splitlines() if line.startswith("b.grid"))
    assert "timm:vit_tiny_patch16_224, 32 px" in grid_line and " img/s " in grid_line


def test_set_changes_preset_fields_by_their_types():
    from fundusfm.bench.presets import PRESETS, with_changes

    changes = ["lf_arch=timm:vit_large_patch16_224", "lf_resolution=224", "lf_fractions=0.5,1"]
    p = with_changes(PRESETS["quick"], [*changes, "memory_sizes=3,30"])
    assert p.lf_arch == "timm:vit_large_patch16_224" and p.lf_resolution == 224
    assert p.lf_fractions == (0.5, 1.0)
    assert p.memory_sizes == (3, 30) and p.arch == "resnet10"  # the rest as the preset has it
    assert with_changes(p, ["lf_arch=none"]).lf_arch is None
    with pytest.raises(ConfigError, match="not a valid int"):
        with_changes(p, ["images=many"])
    with pytest.raises(ConfigError, match="FIELD one of arch, images"):
        with_changes(p, ["lf_size=224"])


def test_screening_rows_say_why_a_backend_cannot_run(monkeypatch):
    def no_compiler(*_):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(screening, "missing_onnx_packages", lambda: ["onnxruntime"])
    monkeypatch.setitem(screening.MAKERS, "torch.compile", no_compiler)
    results = screening.bench_screening(screening.ScreenSetting("resnet18", 32, 1, 1))
    assert results["eager"]["status"] == "ok" and results["eager"]["ratio"] == 1.0
    assert results["onnxruntime"]["status"] == "not installed"
    assert "pip install 'fundusfm[onnx]'" in results["onnxruntime"]["reason"]
    assert results["torch.compile"] == {
        "backend": "torch.compile",
        "setting": "resnet18, 32 px, batch 1, cpu",
        "status": "failed",
        "reason": "RuntimeError: InvalidCxxCompiler: no working C++ compiler found",
    }


def test_replicated_cache_holds_one_array(tmp_path: Path, synth_set: Path):
    image = sorted((synth_set.parent / "images").iterdir())[0]
    cache = replicated_cache(tmp_path / "cache", image, 64, 50)
    reread = ImageCache(cache.dir)  # a valid cache as `ImageCache` reads it
    assert len(reread.index) == 50 and reread.resolution == 64
    sources = list(reread.index)
    first, last = reread.read(Path(sources[0])), reread.read(Path(sources[-1]))
    assert first.shape == (64, 64, 3) and np.array_equal(first, last)
    files = sorted((cache.dir / "arrays").iterdir())
    assert len({os.stat(f).st_ino for f in files}) == 1  # hard links: one array on disk


def test_only_accepts_letters_and_names():
    assert parse_only("c, memory,a") == ["a", "c", "d"]
    assert parse_only(None) == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="unknown row 'x'"):
        parse_only("a,x")


def test_onnxruntime_on_cuda_says_when_its_provider_is_missing(monkeypatch, tmp_path: Path):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    cuda = screening.ScreenSetting("resnet18", 32, 1, 1, device="cuda")
    with pytest.raises(screening.ProviderMissing, match="pip install onnxruntime-gpu"):
        screening._onnxruntime(tmp_path / "bundle", tmp_path, cuda)

    def missing(*_):
        raise screening.ProviderMissing("onnxruntime has no CUDAExecutionProvider here")

    monkeypatch.setitem(screening.MAKERS, "onnxruntime", missing)
    monkeypatch.setitem(screening.MAKERS, "torch.compile", missing)
    results = screening.bench_screening(screening.ScreenSetting("resnet18", 32, 1, 1))
    assert results["eager"]["status"] == "ok"
    assert results["onnxruntime"]["status"] == "not installed"  # a row that says so, no crash
    assert "CUDAExecutionProvider" in results["onnxruntime"]["reason"]


def test_presets_by_name_and_the_gpu_preset_without_cuda(monkeypatch):
    import torch

    from fundusfm.bench.presets import PRESETS, preset_named
    from fundusfm.bench.runner import run_bench

    assert preset_named(None) is PRESETS["default"] and preset_named(None, True).name == "quick"
    assert preset_named("gpu").screen_device == "cuda"
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_named("huge")
    with pytest.raises(ConfigError, match="choose one"):
        preset_named("gpu", quick=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (row,) = run_bench(PRESETS["gpu"], ["c"])["rows"]
    assert row["status"] == "skipped" and row["reason"] == "no CUDA device"
    assert "cuda" in row["setting"]
