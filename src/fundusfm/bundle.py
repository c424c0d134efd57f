"""Model bundles: a folder with `model.safetensors` and `bundle.json`, no pickle anywhere.

`bundle.json` records what inference needs and where the model came from:
    architecture   arch, head, hidden units, number of outputs
    task           name, kind (binary/multiclass/multilabel), class names, thresholds
    preprocessing  the preprocessing settings (resolution, FOV crop) and normalisation mean/std
    provenance     resolved config, git commit, manifest sha256, package versions, created
    weights_sha256 of model.safetensors, verified on every load

`models.loaded.load_bundle(path)` turns a bundle into a model whose `predict` takes images and
returns probabilities, preprocessed exactly as the bundle says (never guessed).
`read_preprocessing(meta)` is the one reader of the preprocessing block: every command that
takes a bundle (evaluate, predict, explain, weights export, segment eval) gets its resolution,
crop and mean/std from it.
Older and imported bundles may lack parts of it; the reader fills those with the documented
defaults below and names what it filled (`Preprocessing.defaulted`), so a command can say so.
    crop        absent: fundusfm's default FOV crop (`CropConfig()`); segmentation bundles
                have no crop (images are padded to a square, then resized)
    mean, std   absent: ImageNet's (torchvision's ResNet normalisation)
    resolution  required: a bundle without it is refused
    fov_rule    the preprocessing rule its crops were made with (the cache format); absent
                in bundles made before rule 2
`bundle_notes(meta)` says, in words, what was filled in or is not validated.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fundusfm import __version__
from fundusfm.config.core import CropConfig, PreprocessConfig
from fundusfm.data.preprocess import FOV_RULE
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.io import file_sha256

FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle folder that is incomplete, altered or of an unknown format."""


def git_commit() -> str | None:
    """The commit of the fundusfm source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(config: dict, manifest: Path | None) -> dict:
    import torchvision

    return {
        "config": config,
        "git_commit": git_commit(),
        "manifest": str(manifest) if manifest else None,
        "manifest_sha256": file_sha256(manifest) if manifest else None,
        "versions": {
            "fundusfm": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def save_bundle(model: torch.nn.Module, path: Path, meta: dict) -> Path:
    """Write weights and metadata; `meta` needs architecture, task, preprocessing, provenance."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / "model.safetensors"
    tmp = path / "model.safetensors.tmp"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    tmp.replace(weights)
    meta = {"format_version": FORMAT_VERSION, **meta, "weights_sha256": file_sha256(weights)}
    (path / "bundle.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def read_meta(path: Path) -> dict:
    """bundle.json of a bundle folder, its format checked (the weights are not read)."""
    path = Path(path)
    meta_file, weights = path / "bundle.json", path / "model.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise BundleError(f"{path} is not a bundle: it needs bundle.json and model.safetensors")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {meta.get('format_version')} is not supported")
    return meta


def read_bundle(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and state dict of a bundle, after checking the weights' sha256."""
    meta = read_meta(path)
    weights = Path(path) / "model.safetensors"
    digest = file_sha256(weights)
    if digest != meta.get("weights_sha256"):
        raise BundleError(
            f"{weights}: sha256 {digest[:12]}... does not match bundle.json "
            f"({str(meta.get('weights_sha256'))[:12]}...); the weights were changed or damaged"
        )
    return meta, load_file(weights)


@dataclass(frozen=True)
class Preprocessing:
    """What a bundle's model expects as input; `crop` is None for segmentation bundles."""

    resolution: int
    crop: CropConfig | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    defaulted: tuple[str, ...] = ()  # the keys the bundle lacked and the defaults filled in

    def config(self, workers: int = 0) -> PreprocessConfig:
        """The settings `fundusfm preprocess` uses to produce this model's input images."""
        if self.crop is None:
            raise BundleError("a segmentation bundle pads to a square; it has no FOV crop")
        return PreprocessConfig(
            resolution=self.resolution, workers=workers, **self.crop.model_dump()
        )


def read_preprocessing(meta: dict) -> Preprocessing:
    """The preprocessing block of `bundle.json`, with the module's defaults for what is absent."""
    block = meta.get("preprocessing") or {}
    if "resolution" not in block:
        raise BundleError("bundle.json has no preprocessing.resolution; the input size is unknown")
    defaulted = []
    segmentation = (meta.get("task") or {}).get("kind") == "segmentation"
    crop = None
    if not segmentation:
        if "crop" not in block:
            defaulted.append("crop")
        try:
            crop = CropConfig.model_validate(block.get("crop") or {})
        except ValueError as exc:
            raise BundleError(f"bundle.json preprocessing.crop is not valid: {exc}") from exc
    values = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        if key not in block:
            defaulted.append(key)
        values[key] = tuple(float(v) for v in block.get(key, default))
        if len(values[key]) != 3:
            raise BundleError(f"bundle.json preprocessing.{key} needs 3 values (R, G, B)")
    return Preprocessing(
        int(block["resolution"]), crop, values["mean"], values["std"], tuple(defaulted)
    )


def bundle_notes(meta: dict) -> list[str]:
    """What a user should know before trusting a bundle's outputs (printed by the commands,
    recorded in metrics.json): thresholds not chosen on data, preprocessing defaults filled
    in, a FOV rule other than the one this fundusfm crops with."""
    notes = []
    task = meta.get("task") or {}
    if task.get("thresholds_validated") is False and task.get("kind") != "multiclass":
        imported = "source_file" in (meta.get("provenance") or {})
        why = task.get("thresholds_note") or ("imported weights" if imported else "not recorded")
        notes.append(
            f"thresholds {task.get('thresholds')} were not (all) chosen on validation data "
            f"({why}); validate them before relying on the decisions"
        )
    pre = read_preprocessing(meta)
    if pre.defaulted:
        filled = {
            "crop": "the default FOV crop",
            "mean": "ImageNet's mean",
            "std": "ImageNet's std",
        }
        notes.append(
            f"bundle.json records no preprocessing {', '.join(pre.defaulted)}: used "
            + ", ".join(filled[k] for k in pre.defaulted)
        )
    block = meta.get("preprocessing") or {}
    if pre.crop is not None and "crop" in block and block.get("fov_rule") != FOV_RULE:
        made = block.get("fov_rule") or "not recorded (made before fundusfm recorded it)"
        notes.append(
            f"the bundle's FOV rule is {made}; this fundusfm crops with rule {FOV_RULE}, so "
            "crops of some images may differ slightly from its training"
        )
    return notes
