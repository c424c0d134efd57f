"""Inference engines: ONNX Runtime scores as PyTorch does, its graph is cached by weights,
`auto` picks it on the CPU, and names it does not know are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fundusfm import inference
from fundusfm.bench.screening import random_bundle
from fundusfm.bundle import read_meta, save_bundle
from fundusfm.cli import app
from fundusfm.errors import ConfigError, WeightsError
from fundusfm.explain.gradcam import explain_gradcam
from fundusfm.explain.tsne import explain_tsne
from fundusfm.inference import onnx_graph, resolve_engine, scorer, torch_only
from fundusfm.models.loaded import load_bundle
from fundusfm.screen.predict import screen
from fundusfm.tasks.evaluate import evaluate
from tests.conftest import TINY_ARCH

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(synth_set: Path, tmp_path_factory) -> dict:
    """A 64 px ResNet-10 bundle (random weights), a folder to screen, a label map."""
    root = tmp_path_factory.mktemp("engine")
    folder = root / "photos"
    folder.mkdir()
    for image in sorted((synth_set.parent / "images").glob("*.jpg"))[:6]:
        shutil.copy(image, folder / image.name)
    Image.new("RGB", (96, 96)).save(folder / "black.png")  # ungradable: not scored
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    label_map = root / "label_map.yaml"
    label_map.write_text("column: abnormal\nmap: {'0': normal, '1': abnormal}\n")
    bundle = random_bundle(TINY_ARCH, 64, root / "bundle")
    return {"root": root, "bundle": bundle, "folder": folder, "label_map": label_map}


def _no_export(*_):
    raise AssertionError("the graph was exported again")


def test_auto_runs_onnxruntime_on_the_cpu_when_installed(monkeypatch):
    assert resolve_engine("auto", "cpu") == "onnxruntime"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", "cpu") == "torch"
    assert torch_only("auto", "features") == "torch"
    monkeypatch.setattr(inference, "missing_onnx_packages", lambda: ["onnxruntime"])
    assert resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match=r"needs onnxruntime: pip install 'fundusfm\[onnx\]'"):
        resolve_engine("onnxruntime", "cpu")


def test_unknown_or_impossible_engines_are_refused_by_name(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown engine 'tensorrt'; choose one of auto, torch"):
        resolve_engine("tensorrt", "cpu")
    with pytest.raises(ConfigError, match="runs on the CPU; on cuda use engine torch"):
        resolve_engine("onnxruntime", "cuda")
    with pytest.raises(ConfigError, match="t-SNE embeds backbone features, which only PyTorch"):
        torch_only("onnxruntime", "t-SNE embeds backbone features")
    args = ["predict", str(tiny["bundle"]), str(tiny["folder"]), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--engine", "tensorrt", "-q"])
    assert result.exit_code == 2 and "unknown engine 'tensorrt'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_predict_on_onnxruntime_equals_torch(tiny, tmp_path):
    eager = screen(tiny["bundle"], tiny["folder"], tmp_path / "t", workers=0, progress=False)
    fast = screen(
        tiny["bundle"], tiny["folder"], tmp_path / "o", workers=1, progress=False,
        engine="onnxruntime",
    )  # fmt: skip
    assert (eager.engine, fast.engine) == ("torch", "onnxruntime")
    a, b = eager.table, fast.table
    assert len(a) == 8 and a[["file", "status", "reason"]].equals(b[["file", "status", "reason"]])
    assert (a.status == "scored").sum() == 6 and a.decision.equals(b.decision)
    probs = ["p_normal", "p_abnormal"]
    assert np.nanmax(np.abs(a[probs].to_numpy() - b[probs].to_numpy())) <= TOL
    assert "engine: onnxruntime" in (tmp_path / "o" / "report.html").read_text()


def test_evaluate_on_onnxruntime_equals_torch(tiny, synth_set, tmp_path):
    runs = {}
    for engine in ("torch", "onnxruntime"):
        metrics = evaluate(
            tiny["bundle"], synth_set, tmp_path / engine, tiny["label_map"],
            cache=tiny["root"] / "cache", device="cpu", progress=False, n_boot=10, engine=engine,
        )  # fmt: skip
        assert metrics["engine"] == engine and metrics["images"] == 40
        runs[engine] = pd.read_csv(tmp_path / engine / "predictions.csv", dtype={"image_id": str})
    a, b = runs["torch"], runs["onnxruntime"]
    assert a.image_id.equals(b.image_id)
    scores = ["score_normal", "score_abnormal"]
    assert np.abs(a[scores].to_numpy() - b[scores].to_numpy()).max() <= TOL
    assert ((a.score_abnormal >= 0.5) == (b.score_abnormal >= 0.5)).all()  # its threshold


def test_gradcam_probabilities_on_onnxruntime_equal_torch(tiny, tmp_path):
    files = sorted(tiny["folder"].glob("*.jpg"))[:2]
    tables = [
        explain_gradcam(tiny["bundle"], tmp_path / e, files, road=False, progress=False, engine=e)
        for e in ("torch", "onnxruntime")
    ]
    assert tables[0]["class"].equals(tables[1]["class"])  # the predicted class is explained
    assert np.abs(tables[0].probability - tables[1].probability).max() <= TOL
    assert json.loads((tmp_path / "onnxruntime" / "summary.json").read_text())["engine"] == (
        "onnxruntime"
    )
    with pytest.raises(ConfigError, match="only PyTorch"):
        explain_tsne([str(tiny["bundle"])], Path("unused.csv"), tmp_path, engine="onnxruntime")


def test_graph_is_reused_for_the_same_weights_and_rebuilt_when_they_change(
    tiny, tmp_path, monkeypatch
):
    graph, notes = onnx_graph(load_bundle(tiny["bundle"]))  # built here or by a test above
    sha = read_meta(tiny["bundle"]).weights_sha256
    assert graph.parent == tiny["bundle"] / "onnx" and graph.name.startswith(sha) and not notes
    monkeypatch.setattr(inference, "export", _no_export)
    again = scorer(load_bundle(tiny["bundle"]), "onnxruntime")
    assert again.graph == graph
    # the same folder with new weights: a new graph name, built anew (and checked: the old
    # graph handed back by the exporter does not pass for the new weights)
    changed = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], changed)
    old = load_bundle(changed)
    with torch.no_grad():
        old.model.head[-1].weight.mul_(-3.0)
    save_bundle(old.model, changed, old.meta)
    exported = []

    def stale(path, fmt, out):
        exported.append(path)
        return Path(shutil.copy(graph, out))

    monkeypatch.setattr(inference, "export", stale)
    with pytest.raises(WeightsError, match="differs from PyTorch"):
        onnx_graph(load_bundle(changed))
    assert exported == [changed] and [p.name for p in (changed / "onnx").iterdir()] == [graph.name]


def _copy(bundle: Path, to: Path) -> Path:
    """The bundle's two files, without its cached graph."""
    to.mkdir()
    for name in ("bundle.json", "model.safetensors"):
        shutil.copy(bundle / name, to / name)
    return to


def test_auto_scores_with_torch_when_no_graph_can_be_made(tiny, tmp_path, monkeypatch):
    def fails(*_):
        raise RuntimeError("unsupported operator\nmore detail")

    monkeypatch.setattr(inference, "export", fails)
    bundle = load_bundle(_copy(tiny["bundle"], tmp_path / "bundle"))
    s = scorer(bundle, "auto")
    assert s.engine == "torch" and len(s.notes) == 1
    assert s.notes[0].startswith("no ONNX graph (WeightsError: the ONNX exporter failed on")
    assert "(RuntimeError: unsupported operator); use engine torch" in s.notes[0]
    with pytest.raises(WeightsError, match="RuntimeError: unsupported operator"):
        scorer(bundle, "onnxruntime")  # asked for by name: an error, not a fallback


def test_a_bundle_folder_that_cannot_be_written_keeps_its_graph_elsewhere(
    tiny, tmp_path, monkeypatch
):
    graph, _ = onnx_graph(load_bundle(tiny["bundle"]))
    bundle = _copy(tiny["bundle"], tmp_path / "readonly")
    (bundle / "onnx").write_text("")  # no folder can be made there (read-only even for root)
    monkeypatch.setenv("FUNDUSFM_HOME", str(tmp_path / "home"))
    # same weights, same graph: the exporter's work is known, so it is copied, not redone
    monkeypatch.setattr(inference, "export", lambda p, f, out: Path(shutil.copy(graph, out)))
    s = scorer(load_bundle(bundle), "onnxruntime")
    assert s.graph == tmp_path / "home" / "onnx" / graph.name
    assert s.notes == (f"{bundle} cannot be written: its ONNX graph is kept in {s.graph.parent}",)
    monkeypatch.setattr(inference, "export", _no_export)  # now cached there
    args = ["predict", str(bundle), str(tiny["folder"]), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "(engine onnxruntime)" in result.output and "cannot be written" in result.output
