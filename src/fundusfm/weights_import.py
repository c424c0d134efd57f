"""`fundusfm weights import NAME FILE --out BUNDLE`: a published checkpoint as a bundle.

NAME is a published init (`models.peers`: retfound, retfound-dinov2, flair, keepfit,
visionfm, urfound), `file` (a plain timm or torchvision state dict of `--arch`) or `legacy`
(the paper authors' released classifiers, `legacy.py`). A foundation model has no classes:
its bundle is the backbone alone (`architecture.type: backbone`, task kind `features`), whose
`predict` gives pooled features and which every command that takes an init accepts as
`model.init=BUNDLE`; `weights info` prints its card. The source file's sha256, the
publisher's preprocessing and what was adapted on load are in `provenance.init_source`.
"""

from __future__ import annotations

from pathlib import Path

from fundusfm.bundle import BundleMeta, provenance, save_bundle
from fundusfm.config.core import CropConfig
from fundusfm.data.preprocess import FOV_RULE
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.errors import ConfigError
from fundusfm.legacy import import_legacy
from fundusfm.models.inits import FILE_INITS, file_backbone
from fundusfm.models.loaded import Features
from fundusfm.models.peers import PEERS, file_info

IMPORTS = (*FILE_INITS, "legacy")


def import_checkpoint(
    name: str,
    file: Path,
    out: Path,
    arch: str | None = None,
    resolution: int | None = None,
    trust_pickle: bool = False,
    license: str | None = None,
) -> Path:
    """Convert a published checkpoint into a bundle; returns the bundle folder."""
    if name == "legacy":
        return import_legacy(file, out, trust_pickle, None, resolution or 512, license)
    if name not in FILE_INITS:
        raise ConfigError(f"unknown checkpoint kind {name!r}; choose one of {', '.join(IMPORTS)}")
    if name == "file" and not arch:
        raise ConfigError("weights import file needs --arch (e.g. resnet50 or timm:NAME)")
    info = PEERS[name][0] if name in PEERS else file_info(arch)
    resolution = resolution or info.resolution
    backbone = file_backbone(name, file, arch or info.arch, resolution, trust_pickle)
    raw = {
        "architecture": {
            **backbone.spec(),
            "type": "backbone",
            "outputs": 0,
            "features": backbone.num_features,
        },
        "task": {"name": "features", "kind": "features", "classes": [], "thresholds": []},
        "preprocessing": {
            "resolution": resolution,
            "crop": CropConfig().model_dump(),  # fundusfm's FOV crop, the size the source's
            "fov_rule": FOV_RULE,
            "mean": list(IMAGENET_MEAN),  # what the bundle is fed; it maps to the source's
            "std": list(IMAGENET_STD),
        },
        "provenance": {
            **provenance({"imported_from": str(file), "kind": name}, None),
            "source_file": backbone.origin["file"],
            "source_sha256": backbone.origin["sha256"],  # hashed once, by file_backbone
            "loaded_by": "unpickling (--trust-pickle)" if trust_pickle else "weights-only",
            "license": license or info.license,
            "init_source": backbone.origin,
        },
    }
    return save_bundle(Features(backbone), out, BundleMeta.model_validate(raw))
