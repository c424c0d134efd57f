"""Weights: the authors' checkpoint format, refusing pickles, the card, exports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from fundusfm.card import TIMM_ARCHS
from fundusfm.cli import app
from fundusfm.data.transforms import normalise
from fundusfm.errors import ConfigError, PickleRefused, WeightsError
from fundusfm.legacy import import_legacy
from fundusfm.models.backbone import Backbone, resnet10
from fundusfm.models.heads import Classifier, make_head
from fundusfm.models.loaded import load_bundle
from fundusfm.weights import torchvision_state

runner = CliRunner()


def authors_model(arch=torchvision.models.resnet18, features=512) -> nn.Module:
    """A ResNet with the paper's MLP head inside DataParallel, as the released files are."""
    torch.manual_seed(0)
    net = arch()
    net.fc = nn.Sequential(
        nn.Linear(features, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 2)
    )
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        net.fc[1].running_mean.uniform_(-1, 1)
        net.fc[1].running_var.uniform_(0.5, 2)
    return nn.DataParallel(net).eval()


class Payload:
    """Unpickling this creates a folder: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_dataparallel_model_imports_with_trust(tmp_path: Path):
    legacy = authors_model()
    torch.save(legacy, tmp_path / "fundus.pth")  # the whole pickled model
    result = runner.invoke(
        app,
        ["weights", "import-legacy", str(tmp_path / "fundus.pth"), "--out", str(tmp_path / "b")],
    )
    assert result.exit_code == 2 and "--trust-pickle" in result.output
    assert not (tmp_path / "b").exists()
    result = runner.invoke(
        app,
        [
            "weights",
            "import-legacy",
            str(tmp_path / "fundus.pth"),
            "--out",
            str(tmp_path / "b"),
            "--trust-pickle",
            "--resolution",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "resnet18 + mlp" in result.output and "normal, abnormal" in result.output
    bundle = load_bundle(tmp_path / "b")
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = torch.softmax(legacy((x / 255.0 - mean[:, None, None]) / std[:, None, None]), 1)
    assert np.allclose(bundle.predict(x), expected.numpy(), atol=1e-5)
    assert bundle.meta.provenance.source_sha256
    assert bundle.meta.task.thresholds_validated is False


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_plain_state_dict_needs_no_trust(tmp_path: Path, prefix: str):
    legacy = authors_model()
    state = {f"{prefix}{k.removeprefix('module.')}": v for k, v in legacy.state_dict().items()}
    torch.save(state, tmp_path / "sd.pth")
    bundle = load_bundle(import_legacy(tmp_path / "sd.pth", tmp_path / "b", resolution=64))
    a = bundle.meta.architecture
    assert (a.arch, a.type, a.head, a.hidden, a.outputs) == (
        "resnet18",
        "classifier",
        "mlp",
        512,
        2,
    )
    back = torchvision_state(bundle.model, "mlp")
    for k, v in legacy.module.state_dict().items():
        assert torch.equal(back[k], v), k


def test_resnet50_is_recognised(tmp_path: Path):
    net = authors_model(torchvision.models.resnet50, 2048).module
    torch.save(net.state_dict(), tmp_path / "r50.pth")
    bundle = load_bundle(import_legacy(tmp_path / "r50.pth", tmp_path / "b"))
    assert bundle.meta.architecture.arch == "resnet50"
    assert bundle.resolution == 512


def test_malicious_pickle_never_runs_without_trust(tmp_path: Path):
    marker = tmp_path / "code_ran"
    torch.save({"weights": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(PickleRefused, match="--trust-pickle"):
        import_legacy(tmp_path / "evil.pth", tmp_path / "b")
    assert not marker.exists() and not (tmp_path / "b").exists()


def test_info_and_exports_match(tmp_path: Path):
    legacy = authors_model(resnet10)  # the export formats, on the tiny arch
    torch.save(legacy.module.state_dict(), tmp_path / "sd.pth")
    path = import_legacy(tmp_path / "sd.pth", tmp_path / "b", resolution=64)
    info = runner.invoke(app, ["weights", "info", str(path)])
    assert info.exit_code == 0 and "sha256" in info.output and "64 px" in info.output

    result = runner.invoke(
        app,
        [
            "weights",
            "export",
            str(path),
            "--format",
            "torchvision",
            "--out",
            str(tmp_path / "tv.pth"),
        ],
    )
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    net = resnet10()  # the authors' layout loads strictly
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 2))
    net.load_state_dict(state)

    result = runner.invoke(
        app, ["weights", "export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 0, result.output
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    onnx_out = session.run(None, {"images": (x.float() / 255).numpy()})[0]
    assert np.allclose(onnx_out, load_bundle(path).predict(x), atol=1e-4)


def test_single_output_head_is_refused_and_dropout_mlp_exports_in_the_authors_layout(
    tmp_path: Path,
):
    net = torchvision.models.resnet18()
    net.fc = nn.Linear(512, 1)
    torch.save(net.state_dict(), tmp_path / "one.pth")
    with pytest.raises(WeightsError, match="1 output"):
        import_legacy(tmp_path / "one.pth", tmp_path / "b1")
    net.fc = nn.Linear(512, 3)
    torch.save(net.state_dict(), tmp_path / "three.pth")
    with pytest.raises(ConfigError, match=r"--classes gives 2 class names .* give 3 names"):
        import_legacy(tmp_path / "three.pth", tmp_path / "b3", classes=["a", "b"])
    model = Classifier(Backbone("resnet18"), make_head("mlp", 512, 2, 512, dropout=0.2))
    state = torchvision_state(model, "mlp")
    assert {k for k in state if k.startswith("fc.")} >= {
        "fc.0.weight",
        "fc.1.weight",
        "fc.3.weight",
    }


def linear_bundle(tmp_path: Path, arch=torchvision.models.resnet18, classes=("a", "b", "c")):
    """A bundle with a linear head (timm's `fc`), imported from a plain state dict."""
    torch.manual_seed(1)
    net = arch()
    net.fc = nn.Linear(net.fc.in_features, len(classes))
    torch.save(net.state_dict(), tmp_path / "linear.pth")
    return import_legacy(
        tmp_path / "linear.pth", tmp_path / "b", classes=list(classes), resolution=64
    )


def export_timm(*args: str):
    return runner.invoke(app, ["weights", "export", *map(str, args), "--format", "timm"])


def test_timm_folder_loads_in_timm_with_the_bundles_outputs(tmp_path: Path):
    path = linear_bundle(tmp_path)
    folder = tmp_path / "hub"
    result = export_timm(path, "--out", folder, "--license", "CC-BY-NC-4.0")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert {
        "architecture",
        "num_classes",
        "num_features",
        "pretrained_cfg",
        "label_names",
    } <= config.keys()
    assert (config["architecture"], config["num_classes"], config["label_names"]) == (
        "resnet18",
        3,
        ["a", "b", "c"],
    )
    cfg = config["pretrained_cfg"]
    bundle = load_bundle(path)
    pre = bundle.preprocessing
    assert cfg["input_size"] == [3, 64, 64] and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == list(pre.mean) and cfg["std"] == list(pre.std)
    assert cfg["license"] == "cc-by-nc-4.0" and "tag" not in cfg  # not timm's ImageNet recipe

    weights = str(folder / "model.safetensors")
    overlay = dict(file=weights, num_classes=3)
    net = timm.create_model(
        "resnet18", pretrained=True, num_classes=3, pretrained_cfg_overlay=overlay
    )
    hub = timm.create_model(f"local-dir:{folder}", pretrained=True)  # what a hub push serves
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    data = timm.data.resolve_data_config({}, model=hub)
    assert data["input_size"] == (3, 64, 64)
    images = normalise(x, data["mean"], data["std"])  # the same preprocessed input
    with torch.no_grad():
        ours = bundle.model(normalise(x, pre.mean, pre.std))
        for model in (net.eval(), hub.eval()):
            assert torch.allclose(model(images), ours, atol=1e-5)
    assert hub.pretrained_cfg["label_names"] == ["a", "b", "c"]

    info = runner.invoke(app, ["weights", "info", str(path), "--license", "CC-BY-NC-4.0"])
    assert info.exit_code == 0 and info.output.strip() == (folder / "README.md").read_text().strip()

    result = export_timm(path, "--backbone-only")
    assert result.exit_code == 2 and "linear head exports whole" in result.output
    result = runner.invoke(app, ["weights", "export", str(path), "--license", "mit"])
    assert result.exit_code == 2 and "--format timm" in result.output


def test_mlp_heads_export_to_timm_as_backbones_only_when_asked(tmp_path: Path):
    torch.save(authors_model().module.state_dict(), tmp_path / "mlp.pth")
    mlp = import_legacy(tmp_path / "mlp.pth", tmp_path / "mlp", resolution=64)
    result = export_timm(mlp)
    assert result.exit_code == 2 and "--backbone-only" in result.output
    result = export_timm(mlp, "--backbone-only", "--out", tmp_path / "hub")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["num_classes"] == 0 and "label_names" not in config
    assert config["fundusfm"]["head_included"] is False
    overlay = dict(file=str(tmp_path / "hub" / "model.safetensors"), num_classes=0)
    net = timm.create_model(
        "resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), load_bundle(mlp).model.backbone.pool(x), atol=1e-5)
    assert "image-feature-extraction" in (tmp_path / "hub" / "README.md").read_text()


@pytest.mark.parametrize("arch", TIMM_ARCHS)
def test_timm_names_every_exportable_arch_as_torchvision_does(arch: str):
    """Same parameter names and shapes (on the meta device: no weights made); the export
    itself checks the outputs of every folder it writes."""
    with torch.device("meta"):
        backbone = Backbone(arch)
        ours = Classifier(backbone, make_head("linear", backbone.num_features, 2))
        theirs = timm.create_model(arch, num_classes=2).state_dict()
    state = torchvision_state(ours, "linear")
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in theirs.items()}
