"""Published fundus foundation models as inits: each checkpoint file as its publisher releases
it, its keys mapped onto a timm or torchvision model, with its own preprocessing and pooling.

    name             the publisher's file (layout)             model             features
    retfound         RETFound_cfp_weights.pth (MAE, 'model')   timm ViT-L/16 224 patch mean, fc_norm
    retfound-dinov2  RETFound DINOv2 ('teacher', backbone.*)   timm ViT-L/14 224 class token
    flair            flair_resnet.pth (vision_model.model.*)   torchvision R-50  average (2048)
    keepfit          KeepFIT (FLAIR's layout + attention.*)    torchvision R-50  average (2048)
    visionfm         VFM_Fundus_weights.pth ('teacher')        timm ViT-B/16 224 4 class tokens
    urfound          UrFound (MAE ViT-B/16 + bert_*, 'model')  timm ViT-B/16 224 patch mean, fc_norm
    file             a plain state dict of model.arch (timm's layout for timm:NAME,
                     torchvision's for a ResNet)

Each adapter checks that the file is of its kind (`kind_of`): a VisionFM file given as
RETFound is refused naming the kind it looks like. Keys the source uses only for
pretraining (MAE decoder, mask token, DINO heads, text encoders, projections) are dropped by
name; any other key that does not fit is an error naming it. A model whose pooling needs a
norm the pretraining checkpoint lacks (RETFound's `fc_norm`) gets the fresh LayerNorm its
own fine-tuning code starts from (weight 1, bias 0).

The source's normalisation is kept exactly: fundusfm feeds every backbone ImageNet-normalised
images, and the backbone maps them to the source's mean/std (`Backbone.input_norm`).
Resolution and interpolation are recorded as the source states them (`PeerInfo`).
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import timm
import torch

from fundusfm.errors import PickleRefused, WeightsError, WeightsNotFound

Triple = tuple[float, float, float]
NO_NORM: tuple[Triple, Triple] = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels / 255 only
IMAGENET: tuple[Triple, Triple] = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class PeerInfo:
    """An init's architecture, feature rule and preprocessing as its source publishes them."""

    name: str
    title: str
    arch: str
    pool: str = "timm"
    timm_kwargs: dict = field(default_factory=dict)
    resolution: int = 224
    mean: Triple = IMAGENET[0]
    std: Triple = IMAGENET[1]
    interpolation: str | None = "bicubic"  # None: the source does not say
    resize: str = "resize 256, centre crop 224"
    source: str = ""  # where to download it
    license: str | None = None


def read_checkpoint(path: Path, trust_pickle: bool = False):
    """A checkpoint's contents: tensors, containers and argparse Namespaces (training args,
    as RETFound's and MAE's files carry) through PyTorch's weights-only loader; any other
    pickled object only with `trust_pickle`, since unpickling runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, OSError) as exc:
        refused = exc
    if "weights only load failed" not in str(refused).lower():  # not a pickle: a bad file
        first = str(refused).strip().splitlines()[0] if str(refused).strip() else "empty"
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({type(refused).__name__}: {first}); "
            "was the download complete? (compare its sha256 with the publisher's)"
        ) from refused
    if trust_pickle:  # the one place that unpickles: the user vouched for the file
        return torch.load(path, map_location="cpu", weights_only=False)
    raise PickleRefused(
        f"{path} holds pickled Python objects (a whole model, not only tensors). "
        "Unpickling runs code stored in the file, so it is refused by default; if you "
        "trust the file's source (e.g. the publisher's release, checked against its "
        "published hash), add --trust-pickle"
    ) from refused


def tensors(obj, where: str) -> dict[str, torch.Tensor]:
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise WeightsError(f"{where} is not a state dict of tensors")
    return dict(obj)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def kind_of(obj) -> str:
    """Which published layout a checkpoint has (for refusing one kind given as another)."""
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        keys = [k.removeprefix("module.").removeprefix("backbone.") for k in obj["teacher"]]
        return "retfound-dinov2" if any(".ls1." in k for k in keys) else "visionfm"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        keys = list(obj["model"])
        if any(k.startswith(("bert_encoder.", "bert_mlp.")) for k in keys):
            return "urfound"
        if any(k.startswith("decoder_") for k in keys) or "mask_token" in keys:
            return "retfound"
        obj = obj["model"]
    if isinstance(obj, dict) and any(str(k).startswith("vision_model.model.") for k in obj):
        return "keepfit" if any(str(k).startswith("attention.W_") for k in obj) else "flair"
    return "file"


def _mae_vit(obj, extra_drop: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """An MAE pretraining checkpoint's encoder (RETFound, UrFound) for timm's ViT with
    `global_pool='avg'`: decoder, mask token and the pretraining `norm` dropped (the
    fine-tuning model has none), `fc_norm` fresh as the publisher's fine-tuning starts it."""
    state = tensors(obj["model"], "checkpoint['model']")
    drop = ("decoder_", "mask_token", "norm.", *extra_drop)
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    width = state["cls_token"].shape[-1] if "cls_token" in state else 0
    state["fc_norm.weight"], state["fc_norm.bias"] = torch.ones(width), torch.zeros(width)
    return state


def _teacher(obj) -> dict[str, torch.Tensor]:
    """A DINO-style checkpoint's teacher backbone (`module.` and `backbone.` removed, the
    DINO/iBOT heads and mask token dropped; DINOv2's chunked `blocks.C.I.` flattened)."""
    state = tensors(obj["teacher"], "checkpoint['teacher']")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    drop = ("head.", "dino_head.", "ibot_head.", "mask_token", "masked_embed")
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
    return state


def _vision_model(obj) -> dict[str, torch.Tensor]:
    """FLAIR's and KeepFIT's image encoder: a torchvision ResNet-50 under `vision_model.model.`
    (its projection head, the text encoder and KeepFIT's knowledge attention are not it)."""
    state = obj["model"] if isinstance(obj.get("model"), dict) else obj
    return _strip(tensors(state, "the checkpoint"), "vision_model.model.")


def _file(obj) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return {k.removeprefix("module."): v for k, v in tensors(obj, "the file").items()}


FLAIR_INFO = PeerInfo(
    "flair",
    "FLAIR (ResNet-50 vision encoder; the 2048-d average before FLAIR's 512-d projection)",
    "resnet50",
    mean=NO_NORM[0],
    std=NO_NORM[1],
    resolution=512,
    interpolation=None,
    resize="longer side to 512, aspect kept, zero padding right and bottom",
    source="https://github.com/jusiro/FLAIR (flair_resnet.pth)",
    license="mit",
)
PEERS: dict[str, tuple[PeerInfo, Callable[[object], dict]]] = {
    "retfound": (
        PeerInfo(
            "retfound",
            "RETFound (MAE, colour fundus)",
            "timm:vit_large_patch16_224",
            timm_kwargs={"global_pool": "avg"},
            source="https://github.com/rmaphoh/RETFound (RETFound_cfp_weights.pth)",
            license="cc-by-nc-4.0",
        ),
        lambda obj: _mae_vit(obj, ()),
    ),
    "retfound-dinov2": (
        PeerInfo(
            "retfound-dinov2",
            "RETFound (DINOv2, colour fundus)",
            "timm:vit_large_patch14_dinov2",
            source="https://github.com/rmaphoh/RETFound (the DINOv2 release)",
            license="cc-by-nc-4.0",
        ),
        _teacher,
    ),
    "flair": (FLAIR_INFO, _vision_model),
    "keepfit": (
        replace(
            FLAIR_INFO,
            name="keepfit",
            title="KeepFIT (ResNet-50 vision encoder)",
            source="https://github.com/Wang-Naiyu/KeepFIT",
            license=None,
        ),
        _vision_model,
    ),
    "visionfm": (
        PeerInfo(
            "visionfm",
            "VisionFM (fundus ViT-B/16, teacher)",
            "timm:vit_base_patch16_224",
            pool="cls_last4",
            mean=(0.423737496137619, 0.2609460651874542, 0.128403902053833),
            std=(0.29482534527778625, 0.20167365670204163, 0.13668020069599152),
            resize="square resize to 224",
            source="https://github.com/ABILab-CUHK/VisionFM (VFM_Fundus_weights.pth)",
        ),
        _teacher,
    ),
    "urfound": (
        PeerInfo(
            "urfound",
            "UrFound (MAE ViT-B/16)",
            "timm:vit_base_patch16_224",
            timm_kwargs={"global_pool": "avg"},
            source="https://github.com/yukkai/UrFound",
            license="mit",
        ),
        lambda obj: _mae_vit(obj, ("bert_encoder.", "bert_mlp.")),
    ),
}
FILE = PeerInfo("file", "a state dict of model.arch", "", resize="fundusfm's FOV crop")


def file_info(arch: str) -> PeerInfo:
    """What a plain state dict of `arch` expects: for a timm model, the preprocessing of
    timm's own pretrained_cfg for that name (e.g. mean/std 0.5 for `vit_base_patch16_224`),
    since the file carries none; for a torchvision ResNet, ImageNet's."""
    cfg = timm.get_pretrained_cfg(arch.removeprefix("timm:")) if arch.startswith("timm:") else None
    if cfg is None:
        return FILE
    return replace(
        FILE,
        title=f"a state dict of {arch} (preprocessing: timm's pretrained_cfg for it)",
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        resolution=cfg.input_size[-1],
        interpolation=cfg.interpolation,
        resize=f"timm's: resize, centre crop {cfg.crop_pct:g}",
    )


def peer_state(name: str, obj) -> tuple[PeerInfo, dict[str, torch.Tensor]]:
    """The init's description and the checkpoint's backbone tensors in timm's (or torchvision's)
    names. A checkpoint of another kind is refused naming the kind it looks like."""
    if name == "file":
        return FILE, _file(obj)  # its preprocessing: `file_info(arch)`
    if name not in PEERS:
        raise WeightsError(f"unknown checkpoint kind {name!r}; choose one of {[*PEERS, 'file']}")
    found = kind_of(obj)
    if found != name:
        looks = "a plain state dict" if found == "file" else f"a {found} checkpoint"
        raise WeightsError(
            f"expected a {name} checkpoint ({PEERS[name][0].title}), but the file looks like "
            f"{looks}; give it as init {found!r}" + ("" if found != "file" else " with model.arch")
        )
    info, mapping = PEERS[name]
    return info, mapping(obj)
