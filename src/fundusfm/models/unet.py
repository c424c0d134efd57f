"""The vessel U-Net: segmentation_models_pytorch's Unet with our ResNet as its encoder.

smp's ResNet encoders are torchvision ResNets, so a backbone made by `create_backbone`
(any of the four initialisations, or a bundle) loads into `unet.encoder` key for key;
`encoder_state_equal` lets a test check that the weights really are ours.
`encoder: frozen` stops gradients into the encoder and keeps its BatchNorm statistics.
`vessel_probabilities` is the one place logits become vessel probabilities (with the
test-time flips when asked), for the engine's predictions and `Bundle.predict` alike.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn

from fundusfm.config.segment import SegModelConfig
from fundusfm.errors import ConfigError
from fundusfm.models.backbone import ARCHS, Backbone
from fundusfm.models.inits import config_backbone

# smp knows torchvision's ResNets by name; ResNet-10 (models/backbone.py) is added the way
# smp lists its own: the same encoder class with one BasicBlock per stage.
smp.encoders.encoders.setdefault(
    "resnet10",
    {
        "encoder": smp.encoders.encoders["resnet18"]["encoder"],
        "pretrained_settings": {},
        "params": {
            "out_channels": [3, 64, 64, 128, 256, 512],
            "block": torchvision.models.resnet.BasicBlock,
            "layers": [1, 1, 1, 1],
        },
    },
)


def build_unet(arch: str, decoder_channels: list[int]) -> smp.Unet:
    """An untrained U-Net (random encoder; nothing is downloaded)."""
    if arch not in ARCHS:
        raise ConfigError(
            f"the U-Net segments with torchvision ResNet encoders ({', '.join(ARCHS)}); "
            f"{arch} has no encoder here (ViTs have no feature pyramid in fundusfm yet)"
        )
    return smp.Unet(
        encoder_name=arch,
        encoder_weights=None,
        decoder_channels=tuple(decoder_channels),
        classes=1,
    )


def create_unet(cfg: SegModelConfig) -> smp.Unet:
    """A U-Net whose encoder holds the configured initialisation."""
    unet = build_unet(cfg.arch, cfg.decoder_channels)
    if cfg.init_name != "scratch":
        backbone = config_backbone(cfg, None)
        if not isinstance(backbone, Backbone) or backbone.arch != cfg.arch:
            raise ConfigError(
                f"init {cfg.init_name!r} is a {backbone.arch} backbone; the U-Net segments "
                f"with {cfg.arch} encoders only (torchvision ResNets: {', '.join(ARCHS)})"
            )
        if not backbone.input_norm.identity:
            raise ConfigError(
                f"init {cfg.init_name!r} expects inputs normalised with mean "
                f"{backbone.input_norm.mean} and std {backbone.input_norm.std}, which the "
                "U-Net's encoder does not apply: segment from an ImageNet-normalised init"
            )
        unet.encoder.load_state_dict(backbone.net.state_dict())
    return unet


def encoder_state_equal(unet: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether the encoder's tensors equal a torchvision-named state (fc.* ignored)."""
    own = unet.encoder.state_dict()
    theirs = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)


# Test-time flips: none, horizontal, vertical, both (dims of an N x C x H x W batch).
FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def vessel_probabilities(
    model: nn.Module, x: torch.Tensor, tta_flips: bool = False
) -> torch.Tensor:
    """Vessel probabilities (N x H x W, float32) of a normalised batch; with `tta_flips`
    the mean of the four flips' probabilities, each flipped back."""
    if not tta_flips:
        return torch.sigmoid(model(x)[:, 0].float())
    total = torch.zeros_like(x[:, 0], dtype=torch.float32)
    for dims in FLIPS:
        p = torch.sigmoid(model(x.flip(dims) if dims else x)[:, 0].float())
        total += p.flip(dims) if dims else p
    return total / len(FLIPS)
