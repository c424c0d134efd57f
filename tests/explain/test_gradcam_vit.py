"""Grad-CAM on timm backbones: ViTs (tokens laid back on the patch grid) and timm CNNs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fundusfm.bundle import BundleMeta, save_bundle
from fundusfm.cli import app
from fundusfm.data.manifest import load_manifest
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise
from fundusfm.errors import ConfigError
from fundusfm.explain.gradcam import TokenGrid, cam_layer, explain_gradcam, gradcam_maps
from fundusfm.models.loaded import build_model, load_bundle
from tests.conftest import TINY_ARCH

VIT = "timm:vit_tiny_patch16_224"
runner = CliRunner()


def random_bundle(folder: Path, arch: str, outputs: int = 3, **arch_extra) -> Path:
    """A bundle with random weights at 64 px (a ViT/16 there has a 4 x 4 patch grid)."""
    kind = "features" if outputs == 0 else "multiclass"
    meta = BundleMeta.model_validate(
        {
            "architecture": {"arch": arch, "outputs": outputs, **arch_extra},
            "task": {"name": "t", "kind": kind, "classes": [f"c{i}" for i in range(outputs)]},
            "preprocessing": {
                "resolution": 64,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
        }
    )
    torch.manual_seed(0)
    return save_bundle(build_model(meta), folder, meta)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_token_grid_lays_patch_tokens_out_row_by_row():
    prefix, (h, w), c = 2, (2, 3), 4
    tokens = torch.full((1, prefix + h * w, c), -1.0)  # the prefix tokens: -1
    for i in range(h * w):
        tokens[0, prefix + i] = i + 100 * torch.arange(c)  # token i, channel k: i + 100 k
    grid = TokenGrid(prefix, (h, w))(tokens)
    assert grid.shape == (1, c, h, w)
    for k in range(c):
        expected = torch.arange(h * w, dtype=torch.float).reshape(h, w) + 100 * k
        assert torch.equal(grid[0, k], expected)
    with pytest.raises(ConfigError, match="patch grid"):
        TokenGrid(1, (h, w))(tokens)  # 7 patch tokens do not fill a 2 x 3 grid


@pytest.mark.parametrize("kwargs, prefix", [({}, 1), ({"timm_kwargs": {"reg_tokens": 4}}, 5)])
def test_vit_layer_is_the_last_blocks_norm1_on_its_grid(tmp_path: Path, kwargs, prefix):
    bundle = load_bundle(random_bundle(tmp_path / "vit", VIT, **kwargs))
    layer, reshape = cam_layer(bundle.model)
    net = bundle.model.backbone.net
    assert layer is net.blocks[-1].norm1
    assert net.num_prefix_tokens == prefix
    assert (reshape.prefix, reshape.grid) == (prefix, (4, 4))


def hand_cam(bundle, image: np.ndarray, target: int) -> np.ndarray:
    """Grad-CAM on the 4 x 4 patch grid by hand: norm1's patch tokens weighted by the mean of
    their gradients over the tokens, summed over channels, ReLU."""
    seen = {}
    norm1 = bundle.model.backbone.net.blocks[-1].norm1
    hook = norm1.register_forward_hook(lambda m, i, out: seen.update(out=out) or out.retain_grad())
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    x = normalise(x, bundle.preprocessing.mean, bundle.preprocessing.std)
    try:
        bundle.model(x)[0, target].backward()
    finally:
        hook.remove()
    tokens, grads = seen["out"][0, 1:], seen["out"].grad[0, 1:]
    cam = torch.relu((tokens * grads.mean(0)).sum(-1)).detach().numpy()
    return cam.reshape(4, 4)


def test_vit_maps_are_image_sized_and_follow_the_patch_grid(tmp_path: Path):
    bundle = load_bundle(random_bundle(tmp_path / "vit", VIT))
    a, b = images(2)
    maps = gradcam_maps(bundle, [a, a, b], [0, 1, 0])
    assert maps.shape == (3, 64, 64) and maps.min() >= 0 and maps.max() <= 1
    assert all(m.std() > 0.05 for m in maps)  # not constant
    assert np.abs(maps[0] - maps[1]).max() > 0.2  # another class, another map
    assert np.abs(maps[0] - maps[2]).max() > 0.2  # another image, another map
    for cam, image, target in zip(maps, [a, a, b], [0, 1, 0], strict=True):
        hand = hand_cam(bundle, image, target)
        centres = cam[8::16, 8::16]  # the 64 px map at each 16 px patch's centre
        assert np.corrcoef(centres.ravel(), hand.ravel())[0, 1] > 0.98


def test_timm_cnn_uses_its_last_feature_stage(tmp_path: Path):
    bundle = load_bundle(random_bundle(tmp_path / "convnext", "timm:convnext_atto"))
    layer, reshape = cam_layer(bundle.model)
    assert layer is bundle.model.backbone.net.stages[3] and reshape is None
    maps = gradcam_maps(bundle, images(2), [0, 2])
    assert maps.shape == (2, 64, 64) and all(m.std() > 0.05 for m in maps)


def test_resnet_layer_is_unchanged(tmp_path: Path):
    bundle = load_bundle(random_bundle(tmp_path / "resnet", TINY_ARCH))
    layer, reshape = cam_layer(bundle.model)
    assert layer is bundle.model.backbone.net.layer4[-1] and reshape is None


def test_unsupported_timm_backbone_names_what_is_supported(tmp_path: Path):
    bundle = load_bundle(random_bundle(tmp_path / "swin", "timm:swin_tiny_patch4_window7_224"))
    with pytest.raises(ConfigError, match=r"Grad-CAM supports .*ResNets.*ViTs"):
        cam_layer(bundle.model)


def test_backbone_alone_is_refused(tmp_path: Path):
    path = random_bundle(tmp_path / "fm", VIT, outputs=0, type="backbone", features=192)
    with pytest.raises(ConfigError, match="fine-tune it first"):
        explain_gradcam(path, tmp_path / "out", images=[tmp_path / "x.png"], progress=False)
    with pytest.raises(ConfigError, match="fine-tune it first"):
        gradcam_maps(load_bundle(path), images(1), [0])


def test_gradcam_cli_on_a_vit_bundle(synth_set: Path, tmp_path: Path):
    path = random_bundle(tmp_path / "vit", VIT)
    m = load_manifest(synth_set)
    files = [str(m.image_path(p)) for p in m.table["path"][:2]]
    out = tmp_path / "cam"
    args = ["explain", "gradcam", str(path), *files, "--out", str(out), "--engine", "torch"]
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "gradcam.csv")
    assert len(table) == 2 and table["road"].notna().all()
    cams = [np.load(f) for f in sorted((out / "maps").glob("*.npy"))]
    assert [c.shape for c in cams] == [(64, 64)] * 2 and all(c.max() <= 1 for c in cams)
    assert max(c.std() for c in cams) > 0.05  # (random weights may leave one map all zero)
    assert len(list((out / "overlays").glob("*.png"))) == 2
