"""The tests' tiny backbone is a real arch: the same seam, U-Net encoder and errors."""

from __future__ import annotations

import pytest
import torch

from fundusfm.config.segment import SegModelConfig
from fundusfm.errors import ConfigError, WeightsNotFound
from fundusfm.models.backbone import build_backbone
from fundusfm.models.inits import create_backbone
from fundusfm.models.unet import create_unet, encoder_state_equal


def test_resnet10_has_the_backbone_seam_and_one_block_per_stage(tiny_arch):
    b = create_backbone(tiny_arch, "scratch")
    maps = b.feature_maps(torch.zeros(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2] and b.num_features == 512
    assert [len(stage) for stage in b.stages()[1:]] == [1, 1, 1, 1]
    with pytest.raises(WeightsNotFound, match="no ImageNet weights"):
        create_backbone(tiny_arch, "imagenet")


def test_resnet10_encodes_a_unet_with_the_backbones_weights(tiny_arch):
    torch.manual_seed(0)
    backbone = create_backbone(tiny_arch, "scratch")
    cfg = SegModelConfig(arch=tiny_arch, init="scratch", decoder_channels=[64, 32, 16, 16, 8])
    unet = create_unet(cfg)
    assert [len(unet.encoder.layer1), len(unet.encoder.layer4)] == [1, 1]
    assert not encoder_state_equal(unet, backbone.net.state_dict())  # scratch: its own draw
    unet.encoder.load_state_dict(backbone.net.state_dict())  # strict: the layouts agree
    assert unet(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_a_wrong_setting_or_wrong_weights_are_typed_errors(tiny_arch):
    """A bad setting is a ConfigError, weights that do not fit a WeightsError; both say what
    to use instead."""
    from fundusfm.errors import ConfigError, WeightsError
    from fundusfm.models.heads import make_head

    with pytest.raises(ConfigError, match="choose one of"):
        make_head("transformer", 512, 2)
    with pytest.raises(ConfigError, match="use one of scratch"):
        create_backbone(tiny_arch, "no/such/init")
    wider = create_backbone("resnet18", "scratch").net.state_dict()
    with pytest.raises(WeightsError, match="another architecture"):
        create_backbone(tiny_arch, "scratch").load_net_state(wider)


def test_timm_names_build_behind_the_seam_and_a_typo_lists_close_matches():
    """Any timm model is `timm:NAME`: pooled features of `num_features`, five stages holding
    every parameter once; a misspelt name is refused with the names it was close to."""
    for arch in (
        "timm:convnext_atto",
        "timm:efficientnet_b0",
        "timm:vit_small_patch14_reg4_dinov2",
    ):
        size = 28 if "patch14" in arch else 32
        backbone = build_backbone(arch, size).eval()
        with torch.no_grad():
            assert backbone.pool(torch.randn(2, 3, size, size)).shape == (2, backbone.num_features)
        ids = [id(p) for stage in backbone.stages() for p in stage.parameters()]
        assert sorted(ids) == sorted(id(p) for p in backbone.parameters())
    with pytest.raises(ConfigError, match="close matches: timm:vit_base_patch16_224"):
        build_backbone("timm:vit_bse_patch16_224")
