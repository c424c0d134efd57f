"""The one place that turns an init name (or a bundle) into backbone weights.

Inits, named the same in configs, grid axes and reports:
    scratch          random (torchvision's default initialisation)
    imagenet         torchvision IMAGENET1K_V1 or _V2 weights, read from the torch hub cache
                     (or `imagenet_file`); never downloaded here, and never silently skipped
    fundus           the backbone of a bundle made by `fundusfm pretrain --set strategy=fundus`
    imagenet+fundus  the same, pretrained with `strategy=imagenet+fundus`
    <path>           the backbone of any bundle folder (a U-Net's encoder too, an imported
                     foundation model's: `fundusfm weights import`)
    retfound, retfound-dinov2, flair, keepfit, visionfm, urfound
                     a published foundation model from the file its publisher releases
                     (`model.init_file`, or in the name: `retfound:PATH`, as a grid's init
                     axis names several), keys mapped by `models.peers`; it brings its own
                     architecture (model.arch replaces it only with one of the same family:
                     a timm: name for a ViT, a ResNet for a ResNet), pooling and normalisation
    file             a plain state dict of model.arch in timm's or torchvision's layout
                     (`model.init_file`)
A ViT is built at the run's resolution (`img_size`); position embeddings made at another are
resampled on load, and the backbone's `origin` (written to the bundle's provenance) says so.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from fundusfm.bundle import read_bundle
from fundusfm.errors import ConfigError, WeightsError, WeightsNotFound
from fundusfm.io import file_sha256
from fundusfm.models.backbone import ARCHS, Backbone, build_backbone
from fundusfm.models.peers import (
    IMAGENET,
    PEERS,
    PeerInfo,
    file_info,
    peer_state,
    read_checkpoint,
)
from fundusfm.models.timm_backbone import TIMM_PREFIX, TimmBackbone

INITS = ("scratch", "imagenet", "fundus", "imagenet+fundus", *PEERS, "file")
FILE_INITS = (*PEERS, "file")


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
        f"unknown init {init!r}: use one of {', '.join(INITS)} (a published one with its "
        "file: retfound:PATH) or the path of a bundle folder"
    )


def peer_arch(info: PeerInfo, arch: str) -> str:
    """The architecture a published init is built as: its own, unless `arch` is of the same
    family (a timm name for a timm model, a ResNet for a ResNet: e.g. a smaller ViT)."""
    same_family = arch.startswith(TIMM_PREFIX) == info.arch.startswith(TIMM_PREFIX)
    return arch if same_family or not info.arch else info.arch


def file_backbone(
    init: str, file: Path | None, arch: str, img_size: int | None, trust_pickle: bool = False
) -> Backbone | TimmBackbone:
    """A published foundation model (or a plain state dict, `file`) from its file; pickled
    objects other than tensors load only with `trust_pickle` (`peers.read_checkpoint`)."""
    if file is None:
        where = PEERS[init][0].source if init in PEERS else "a state dict of model.arch"
        raise ConfigError(f"init {init!r} needs model.init_file=PATH: the checkpoint ({where})")
    info, state = peer_state(init, read_checkpoint(Path(file), trust_pickle))
    arch = peer_arch(info, arch)
    info = file_info(arch) if init == "file" else info
    own_norm = (info.mean, info.std) != IMAGENET
    timm_model = arch.startswith(TIMM_PREFIX)
    backbone = build_backbone(
        arch,
        img_size,
        info.timm_kwargs if timm_model else None,
        info.pool if timm_model else None,
        info.mean if own_norm else None,
        info.std if own_norm else None,
    )
    notes = backbone.load_net_state(state)
    backbone.origin = {
        "init": init,
        "file": Path(file).name,
        "sha256": file_sha256(Path(file)),
        "title": info.title,
        "resolution": info.resolution,
        "mean": list(info.mean),
        "std": list(info.std),
        "interpolation": info.interpolation,
        "resize": info.resize,
        "notes": notes,
    }
    return backbone


def _bundle_backbone(init: str, init_bundle: Path | None, arch: str, img_size: int | None):
    meta, state = read_bundle(resolve_bundle(init, init_bundle))
    a = meta.architecture
    if a.arch != arch and not a.arch.startswith(TIMM_PREFIX):
        raise WeightsError(
            f"init {init!r} holds a {a.arch} backbone, not {arch}; set model.arch={a.arch}"
        )
    backbone = build_backbone(a.arch, img_size, a.timm_kwargs, a.pool, a.input_mean, a.input_std)
    prefix = "encoder." if meta.segmentation else "backbone.net."  # a U-Net's encoder is a ResNet
    notes = backbone.load_net_state(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    )
    origin = meta.provenance.init_source  # a published checkpoint behind the bundle, if any
    if origin is not None or notes:
        src = origin.model_dump() if origin else {}
        backbone.origin = {**src, "bundle": str(init), "notes": [*src.get("notes", []), *notes]}
    return backbone


def create_backbone(
    arch: str = "resnet50",
    init: str = "scratch",
    imagenet_version: str = "IMAGENET1K_V1",
    imagenet_file: Path | None = None,
    init_bundle: Path | None = None,
    init_file: Path | None = None,
    img_size: int | None = None,
) -> Backbone | TimmBackbone:
    """A backbone with the named initialisation (see module docstring); `img_size`: the
    input resolution a ViT is built for. A published init may name its file itself,
    `retfound:PATH` (so that a grid's init axis can hold several), else `init_file`."""
    name, sep, path = init.partition(":")
    if sep and name in FILE_INITS:
        return file_backbone(name, Path(path), arch, img_size)
    if init in FILE_INITS:
        return file_backbone(init, init_file, arch, img_size)
    if init not in ("scratch", "imagenet"):
        return _bundle_backbone(init, init_bundle, arch, img_size)
    backbone = build_backbone(arch, img_size)
    if init == "imagenet":
        if isinstance(backbone, TimmBackbone):
            raise ConfigError(
                f"init imagenet loads torchvision's ResNet weights; for {arch} give timm's "
                "ImageNet weights as a file: model.init=file, model.init_file=PATH"
            )
        backbone.load_net_state(imagenet_state(arch, imagenet_version, imagenet_file))
    return backbone


def config_backbone(m, img_size: int | None, init: str | None = None) -> Backbone | TimmBackbone:
    """The backbone a config's model section names (`config.core.EncoderInit`): its init
    (or `init`, e.g. a pretraining strategy's), built for `img_size` inputs."""
    return create_backbone(
        m.arch, init or m.init_name, m.imagenet_version, m.imagenet_file, m.init_bundle,
        m.init_file, img_size,
    )  # fmt: skip
