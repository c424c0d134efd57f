"""Backbones: torchvision's ResNets here, and any timm model (`timm:NAME`,
`models.timm_backbone`), behind one seam.

`Backbone(arch)` wraps an unmodified torchvision ResNet (its classifier removed):
`forward_features` (last feature map), `pool` (N x C), `feature_maps` (strides 4, 8, 16, 32,
for a U-Net decoder), `stages` (for partial fine-tuning), `num_features`, `spec` (what a
bundle records) and `load_net_state`. `build_backbone` is the one factory for both kinds.
Which weights a backbone starts from is `models.inits`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from fundusfm.errors import ConfigError, WeightsError
from fundusfm.models.input_norm import InputNorm
from fundusfm.models.timm_backbone import TIMM_PREFIX, TimmBackbone


def resnet10(weights=None) -> torchvision.models.ResNet:
    """ResNet-10: torchvision's ResNet with one BasicBlock per stage (4.9 M parameters). It has
    no ImageNet weights; it is for quick CPU runs and the tests' tiny backbone."""
    return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])


ARCHS = {
    "resnet10": (resnet10, None),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
}


def build_backbone(
    arch: str,
    img_size: int | None = None,
    timm_kwargs: dict | None = None,
    pool: str | None = None,
    input_mean=None,
    input_std=None,
) -> Backbone | TimmBackbone:
    """An untrained backbone: a torchvision ResNet, or a timm model for `timm:NAME` (a ViT
    built for `img_size` inputs; `timm_kwargs` and `pool` as `TimmBackbone` takes them).
    `input_mean`/`input_std`: the normalisation its weights expect (None: ImageNet's)."""
    if arch.startswith(TIMM_PREFIX):
        return TimmBackbone(arch, img_size, timm_kwargs, pool, input_mean, input_std)
    if timm_kwargs or (pool or "timm") != "timm":
        raise ConfigError(f"{arch} is a torchvision ResNet: it takes no timm settings or pooling")
    return Backbone(arch, input_mean, input_std)


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier, with the timm-style feature seam."""

    def __init__(self, arch: str = "resnet50", input_mean=None, input_std=None):
        super().__init__()
        self.input_norm = InputNorm(input_mean, input_std)
        if arch not in ARCHS:
            raise ConfigError(
                f"unknown architecture {arch!r}; choose one of {list(ARCHS)} or timm:NAME "
                "(any timm model, e.g. timm:vit_base_patch16_224, timm:convnext_tiny)"
            )
        self.arch = arch
        self.net = ARCHS[arch][0](weights=None)
        self.num_features = self.net.fc.in_features
        self.net.fc = nn.Identity()

    def spec(self) -> dict:
        """What a bundle records to build this backbone again (`bundle.Architecture`)."""
        n = self.input_norm
        return {"arch": self.arch, "input_mean": n.mean, "input_std": n.std}

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 4, 8, 16 and 32."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(self.input_norm(x)))))
        maps = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(x)[-1]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features, N x num_features."""
        return torch.flatten(self.net.avgpool(self.forward_features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)

    def stages(self) -> list[nn.Module]:
        """The stem and the four residual stages, in order (for partial fine-tuning)."""
        n = self.net
        return [nn.ModuleList([n.conv1, n.bn1]), n.layer1, n.layer2, n.layer3, n.layer4]

    def load_net_state(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a torchvision ResNet state dict (its `fc.*` classifier is ignored); returns
        notes on what was adapted (none for a ResNet)."""
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.net.state_dict()
        wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if wrong:
            raise WeightsError(
                f"weights do not fit {self.arch}: {wrong[0]} has shape "
                f"{tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)} "
                "(weights of another architecture?)"
            )
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"weights do not fit {self.arch}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]} (weights of another architecture?)"
            )
        return []
