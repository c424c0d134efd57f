"""`fundusfm weights import NAME FILE --out BUNDLE`: a published checkpoint as a bundle (the
backbone alone), its card, its features, and the commands that need classes refusing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fundusfm.card import _source
from fundusfm.cli import app
from fundusfm.data.transforms import normalise
from fundusfm.errors import WeightsError
from fundusfm.models.inits import create_backbone, file_backbone
from fundusfm.models.loaded import load_bundle
from tests.explain.test_gradcam_vit import random_bundle
from tests.models.test_peers import IMAGES, mae_checkpoint, vit_state
from tests.test_weights import authors_model

runner = CliRunner()
VIT = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def retfound_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("retfound") / "RETFound_cfp_weights.pth"
    torch.save(mae_checkpoint(vit_state(width=192, depth=12, patch=16, grid=2)), path)
    return path


def test_import_writes_a_backbone_bundle_with_the_sources_features(retfound_file, tmp_path):
    out = tmp_path / "retfound"
    args = ["weights", "import", "retfound", str(retfound_file), "--out", str(out)]
    result = runner.invoke(app, [*args, "--arch", VIT, "--resolution", "32"])
    assert result.exit_code == 0, result.output
    assert "Starts from:** RETFound (MAE, colour fundus)" in result.output
    assert "resize 256, centre crop 224, 224 px, interpolation bicubic" in result.output
    bundle = load_bundle(out)
    assert bundle.kind == "features" and bundle.meta.architecture.features == 192
    source = bundle.meta.provenance.init_source
    assert source.init == "retfound" and source.file == retfound_file.name
    direct = file_backbone("retfound", retfound_file, VIT, 32).eval()
    images = [img.permute(1, 2, 0).numpy() for img in IMAGES]
    with torch.no_grad():
        expected = direct.pool(normalise(IMAGES)).numpy()
    np.testing.assert_allclose(bundle.predict(images), expected, atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match=r"backbone alone.*fine-tune it first"):
        bundle.require_classifier("predict")


def test_import_errors_are_one_line_naming_what_to_do(retfound_file, tmp_path):
    wrong = runner.invoke(app, ["weights", "import", "visionfm", str(retfound_file), "--out",
                                str(tmp_path / "b")])  # fmt: skip
    assert wrong.exit_code == 2 and wrong.output.count("error:") == 1
    assert "expected a visionfm checkpoint" in wrong.output and "'retfound'" in wrong.output
    no_arch = runner.invoke(app, ["weights", "import", "file", str(retfound_file), "--out",
                                  str(tmp_path / "c")])  # fmt: skip
    assert no_arch.exit_code == 2 and "needs --arch" in no_arch.output
    unknown = runner.invoke(app, ["weights", "import", "retfund", str(retfound_file), "--out",
                                  str(tmp_path / "d")])  # fmt: skip
    assert unknown.exit_code == 2 and "unknown checkpoint kind 'retfund'" in unknown.output


def test_import_legacy_is_the_authors_classifier_import(tmp_path):
    """`weights import legacy` is `import-legacy`: a state dict of the paper's classifier."""
    legacy = authors_model()
    torch.save(legacy.state_dict(), tmp_path / "fundus.pth")
    args = ["weights", "import", "legacy", str(tmp_path / "fundus.pth"), "--out"]
    result = runner.invoke(app, [*args, str(tmp_path / "b"), "--resolution", "64"])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "b")
    assert bundle.kind == "binary" and bundle.classes == ["normal", "abnormal"]
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.softmax(legacy(normalise(x)), 1).numpy()
    np.testing.assert_allclose(bundle.predict(x), expected, atol=1e-5)


def test_a_bundle_without_a_published_source_gives_no_source_line(tmp_path):
    """Fine-tuning from a plain bundle (e.g. `fundusfm pretrain`'s) records no init source, so
    its card claims no published checkpoint."""
    plain = random_bundle(tmp_path / "plain", "resnet10", outputs=2)
    assert getattr(create_backbone("resnet10", str(plain)), "origin", None) is None
    assert _source(load_bundle(plain).meta) == []
