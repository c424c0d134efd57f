"""The one place that turns an init name (or a bundle) into backbone weights.

Inits, named the same in configs, grid axes and reports:
    scratch          random (torchvision's default initialisation)
    imagenet         torchvision IMAGENET1K_V1 or _V2 weights, read from the torch hub cache
                     (or `imagenet_file`); never downloaded here, and never silently skipped
    fundus           the backbone of a bundle made by `fundusfm pretrain --set strategy=fundus`
    imagenet+fundus  the same, pretrained with `strategy=imagenet+fundus`
    <path>           the backbone of any bundle folder (a U-Net's encoder too)
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from fundusfm.bundle import read_bundle
from fundusfm.errors import ConfigError, WeightsError, WeightsNotFound
from fundusfm.models.backbone import ARCHS, Backbone

INITS = ("scratch", "imagenet", "fundus", "imagenet+fundus")


def imagenet_state(arch: str, version: str = "IMAGENET1K_V1", file: Path | None = None) -> dict:
    """torchvision's ImageNet weights for `arch`, from `file` or the torch hub cache, offline."""
    weights_enum = ARCHS[arch][1]
    if weights_enum is None:
        raise WeightsNotFound(
            f"{arch} has no ImageNet weights (a small architecture for quick runs); use "
            "model.init=scratch or a bundle, or an architecture with ImageNet weights"
        )
    try:
        weights = weights_enum[version]
    except KeyError:
        names = [w.name for w in weights_enum]
        raise ConfigError(
            f"{arch} has no {version} weights; set model.imagenet_version to one of {names}"
        ) from None
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
    return _state_dict_file(Path(file))


def _state_dict_file(file: Path) -> dict:
    """The tensors of a weights file (.safetensors, or a plain torch state dict)."""
    if not file.is_file():
        raise WeightsNotFound(f"model.imagenet_file {file} does not exist")
    if file.suffix == ".safetensors":
        return load_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{file} is not a plain state dict (it holds pickled objects, which fundusfm does "
            "not load); save `model.state_dict()` instead"
        ) from exc
    if not isinstance(state, dict):
        raise WeightsError(
            f"{file} does not hold a state dict; save `model.state_dict()` of a torchvision "
            "ResNet (or give a .safetensors file)"
        )
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
    raise ConfigError(
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
    meta, state = read_bundle(resolve_bundle(init, init_bundle))
    if meta.architecture.arch != arch:
        raise WeightsError(
            f"init {init!r} holds a {meta.architecture.arch} backbone, not {arch}; "
            f"set model.arch={meta.architecture.arch}"
        )
    prefix = "encoder." if meta.segmentation else "backbone.net."  # a U-Net's encoder is a ResNet
    backbone.load_torchvision_state(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    )
    return backbone
