"""ResNet backbones from torchvision behind timm's seam.

`Backbone(arch)` wraps an unmodified torchvision ResNet (its classifier removed):
`forward_features` (last feature map), `pool` (N x C), `feature_maps` (strides 4, 8, 16, 32,
for a U-Net decoder) and `num_features`. Which weights it starts from is `models.inits`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from fundusfm.errors import ConfigError, WeightsError


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


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier, with the timm-style feature seam."""

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}; choose one of {list(ARCHS)}")
        self.arch = arch
        self.net = ARCHS[arch][0](weights=None)
        self.num_features = self.net.fc.in_features
        self.net.fc = nn.Identity()

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at strides 4, 8, 16 and 32."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
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

    def load_torchvision_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision ResNet state dict (its `fc.*` classifier is ignored)."""
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
