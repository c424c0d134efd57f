"""ResNet backbones from torchvision and the four initialisations, named the same everywhere.

`create_backbone(arch, init)` wraps an unmodified torchvision ResNet (its classifier removed)
behind timm's seam: `forward_features` (last feature map), `pool` (N x C), `feature_maps`
(strides 4, 8, 16, 32, for a U-Net decoder) and `num_features`.

Inits:
    scratch          random (torchvision's default initialisation)
    imagenet         torchvision IMAGENET1K_V1 or _V2 weights, read from the torch hub cache
                     (or `imagenet_file`); never downloaded here, and never silently skipped
    fundus           the backbone of a bundle made by `fundusfm pretrain --set strategy=fundus`
    imagenet+fundus  the same, pretrained with `strategy=imagenet+fundus`
    <path>           the backbone of any bundle folder
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
}
INITS = ("scratch", "imagenet", "fundus", "imagenet+fundus")


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights that were asked for but are not on this machine."""


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier, with the timm-style feature seam."""

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHS)}")
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
            raise ValueError(
                f"weights do not fit {self.arch}: {wrong[0]} has shape "
                f"{tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)} "
                "(weights of another architecture?)"
            )
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit {self.arch}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )


def imagenet_state(arch: str, version: str = "IMAGENET1K_V1", file: Path | None = None) -> dict:
    """torchvision's ImageNet weights for `arch`, from `file` or the torch hub cache, offline."""
    weights_enum = ARCHS[arch][1]
    try:
        weights = weights_enum[version]
    except KeyError:
        names = [w.name for w in weights_enum]
        raise ValueError(f"{arch} has no {version} weights; available: {names}") from None
    if file is None:
        file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not file.is_file():
            raise WeightsNotFound(
                f"ImageNet weights for {arch} ({version}) are not on this machine: expected "
                f'{file}. On a machine with internet, run\n  python -c "import torchvision; '
                f"torchvision.models.{arch}(weights='{version}')\"\n"
                f"which stores them in the torch hub cache (copy {file.name} to the same place "
                "here), or set model.imagenet_file=PATH to a downloaded copy. "
                "fundusfm never falls back to a random initialisation."
            )
    file = Path(file)
    if not file.is_file():
        raise WeightsNotFound(f"model.imagenet_file {file} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{file} is not a plain state dict (it holds pickled objects, which fundusfm does "
            "not load); save `model.state_dict()` instead"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict")
    return state


def weights_home() -> Path:
    """Where named fundus bundles live: $FUNDUSFM_HOME/weights/<init>/ (~/.cache/fundusfm)."""
    base = os.environ.get("FUNDUSFM_HOME") or Path.home() / ".cache" / "fundusfm"
    return Path(base) / "weights"


def resolve_bundle(init: str, init_bundle: Path | None) -> Path:
    """The bundle folder behind `fundus`, `imagenet+fundus` or a path."""
    if init in ("fundus", "imagenet+fundus"):
        path = Path(init_bundle) if init_bundle else weights_home() / init
        if not (path / "bundle.json").is_file():
            raise WeightsNotFound(
                f"no {init!r} weights at {path}: pretrain them with `fundusfm pretrain "
                f"--set strategy={init}` and pass model.init_bundle=RUN/bundle, or place a "
                f"bundle folder at {weights_home() / init}"
            )
        return path
    path = Path(init)
    if (path / "bundle.json").is_file():
        return path
    raise ValueError(
        f"unknown init {init!r}: use one of {', '.join(INITS)} or the path of a bundle folder"
    )


def create_backbone(
    arch: str = "resnet50",
    init: str = "scratch",
    imagenet_version: str = "IMAGENET1K_V1",
    imagenet_file: Path | None = None,
    init_bundle: Path | None = None,
) -> Backbone:
    """A backbone with the named initialisation (see module docstring)."""
    backbone = Backbone(arch)
    if init == "scratch":
        return backbone
    if init == "imagenet":
        backbone.load_torchvision_state(imagenet_state(arch, imagenet_version, imagenet_file))
        return backbone
    from .bundle import read_bundle  # bundles hold backbones; imported here to avoid a cycle

    meta, state = read_bundle(resolve_bundle(init, init_bundle))
    if meta["architecture"]["arch"] != arch:
        raise ValueError(
            f"init {init!r} holds a {meta['architecture']['arch']} backbone, not {arch}; "
            f"set model.arch={meta['architecture']['arch']}"
        )
    segmentation = meta.get("task", {}).get("kind") == "segmentation"
    prefix = "encoder." if segmentation else "backbone.net."  # a U-Net's encoder is a ResNet
    backbone.load_torchvision_state(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    )
    return backbone
