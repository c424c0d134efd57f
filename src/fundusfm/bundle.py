"""Model bundles: a folder with `model.safetensors` and `bundle.json`, no pickle anywhere.

`bundle.json` is a typed, versioned schema (`BundleMeta`, format 2; format 1 bundles load
unchanged) recording what inference needs and where the model came from:
    architecture   arch, type (classifier or unet), head, hidden units, outputs
    task           name, kind (binary/multiclass/multilabel/segmentation), class names,
                   thresholds and whether they were chosen on validation data; segmentation:
                   `threshold_choice`, how the vessel threshold was set (rule, the images it
                   was chosen on, their Dice). A segmentation bundle without it was made
                   before thresholds were chosen: it loads with its stored threshold (0.5)
                   marked not validated
    preprocessing  resolution, FOV crop (with its resampling), FOV rule, normalisation mean/std;
                   segmentation: `fov_diameter` (images scaled so the FOV is that wide),
                   `input` (rgb, green or clahe) and `tta_flips` (segment eval's default),
                   absent in bundles made before them: square resize, rgb, no flips
    provenance     resolved config, git commit, manifest sha256, package versions, created;
                   for imported checkpoints the source file and its sha256; the
                   weights' licence when known (`card.py` writes it on the model card)
    weights_sha256 of model.safetensors, verified on every load
    shift          (optional) the reference of what the validation images looked like,
                   `shift.safetensors` with its sha256 (`tasks.shift`)
`save_bundle` is the one writer and `read_meta` the one reader; a bundle.json with an unknown
field or a value of the wrong type is refused, naming the field.

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
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError
from safetensors.torch import load_file, save_file

from fundusfm import __version__
from fundusfm.config.core import CropConfig, PreprocessConfig, Strict
from fundusfm.config.segment import InputMode
from fundusfm.data.preprocess import FOV_RULE
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.errors import BundleError
from fundusfm.io import file_sha256, read_json, write_atomic, write_json

FORMAT_VERSION = 2
Triple = tuple[float, float, float]


class Architecture(Strict):
    """The network: a classifier (backbone + head), a U-Net on a ResNet encoder, or a backbone
    alone (an imported foundation model: its pooled features). The backbone is a
    torchvision ResNet or `timm:NAME`, built with `timm_kwargs`, pooled by `pool`
    (`models.timm_backbone`), fed images it maps from ImageNet's normalisation to
    `input_mean`/`input_std` when its weights expect others (`models.input_norm`)."""

    arch: str
    type: Literal["classifier", "unet", "backbone"] = "classifier"
    head: Literal["linear", "mlp"] | None = None
    hidden: int = 512
    dropout: float = 0.0
    outputs: int = Field(ge=0)  # 0 for a backbone alone; its features: `features`
    decoder_channels: list[int] | None = None
    timm_kwargs: dict[str, str | int | float | bool] | None = None
    pool: Literal["timm", "cls_last4"] | None = None
    input_mean: Triple | None = None
    input_std: Triple | None = None
    features: int | None = Field(None, ge=1)  # width of the pooled features


class ThresholdChoice(Strict):
    """Segmentation: how the vessel threshold was set (`config.segment.SegThresholdConfig`):
    by maximum pooled Dice on the validation or training images, or fixed (`none`)."""

    rule: Literal["max_dice", "fixed"]
    chosen_on: Literal["val", "train", "none"]
    images: int = Field(0, ge=0)  # the images it was chosen on
    dice: float | None = None  # their pooled Dice at the threshold


class TaskInfo(Strict):
    """What the outputs mean and the decision rule (binary: threshold of the positive class);
    `features` for a backbone alone (no classes: fine-tune it, or probe its features)."""

    name: str
    kind: Literal["binary", "multiclass", "multilabel", "segmentation", "features"]
    classes: list[str]
    thresholds: list[float] = Field(default_factory=list)
    thresholds_validated: bool = True
    thresholds_note: str | None = None
    threshold_choice: ThresholdChoice | None = None  # segmentation bundles (see above)


class PreprocessingInfo(Strict):
    """Input settings as recorded; `read_preprocessing` fills in what an older bundle lacks."""

    resolution: int = Field(gt=0)
    crop: CropConfig | None = None
    fov_rule: int | None = None
    mean: Triple | None = None
    std: Triple | None = None
    resize: str | None = None  # segmentation: how images are brought to the resolution
    fov_diameter: int | None = Field(None, gt=0)  # segmentation: FOV width in the square
    input: InputMode | None = None  # segmentation: the input form
    tta_flips: bool | None = None  # segmentation: predictions averaged over flips


class InitSource(Strict):
    """The published checkpoint a backbone started from (`models.peers`): the file and its
    sha256, and the preprocessing and feature rule its publisher uses. fundusfm feeds it its
    own FOV crop at the run's resolution, normalised as the source expects; `notes` say what
    was adapted on load (e.g. position embeddings resampled to another resolution)."""

    init: str | None = None
    file: str | None = None
    sha256: str | None = None
    title: str | None = None
    resolution: int | None = None
    mean: Triple | None = None
    std: Triple | None = None
    interpolation: str | None = None
    resize: str | None = None
    notes: list[str] = Field(default_factory=list)
    bundle: str | None = None  # when it came through a bundle of its own


class Provenance(Strict):
    """Where the weights came from: the resolved config, code, data and package versions."""

    config: dict | None = None
    git_commit: str | None = None
    manifest: str | None = None
    manifest_sha256: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    created: str | None = None
    source_file: str | None = None  # imported checkpoints: the file and its sha256
    source_sha256: str | None = None
    loaded_by: str | None = None
    made_by: str | None = None
    license: str | None = None  # the weights' licence (a hub id, e.g. cc-by-nc-4.0), if known
    init_source: InitSource | None = None  # backbones started from a published checkpoint


class Pretraining(Strict):
    strategy: str


class ShiftReference(Strict):
    """What the validation images looked like (`tasks.shift`): the reference file beside the
    weights, its sha256 (checked on load), and how it was fitted. Absent in bundles made
    before it existed and in imported weights: their shift is `unavailable`."""

    file: str = "shift.safetensors"
    sha256: str
    method: Literal["mahalanobis-pca-ledoitwolf"] = "mahalanobis-pca-ledoitwolf"
    n_validation: int = Field(ge=1)
    features: int = Field(ge=1)  # width of the pooled backbone features
    dims: int = Field(ge=1)  # PCA dimensions the distance is measured in
    cutoff_percentile: float = Field(95.0, gt=0, lt=100)
    image_stats: bool = True  # per-channel mean/std ranges stored too


class BundleMeta(Strict):
    """`bundle.json`: every field typed; an unknown field or a wrong type is refused by name."""

    format_version: Literal[2] = FORMAT_VERSION
    architecture: Architecture
    task: TaskInfo
    preprocessing: PreprocessingInfo
    provenance: Provenance = Provenance()
    weights_sha256: str | None = None  # set by save_bundle, checked by read_bundle
    method: str | None = None  # fine-tuning: lf, ff or partial
    probe: str | None = None  # LF through the feature cache: the probe fitted
    pretraining: Pretraining | None = None
    encoder: Literal["frozen", "full"] | None = None  # segmentation: how the encoder trained
    init: str | None = None  # segmentation: the encoder's initialisation
    shift: ShiftReference | None = None  # classifiers trained here: see ShiftReference

    @property
    def segmentation(self) -> bool:
        return self.task.kind == "segmentation"


UNCHOSEN_NOTE = "made before segmentation thresholds were chosen on data: fixed, not chosen"


def _migrate(raw: dict) -> dict:
    """Format 1 (the first release) had the same fields, untyped: it loads unchanged.
    A segmentation bundle without `threshold_choice` kept the fixed threshold of its config
    (0.5 unless set): that threshold, not validated."""
    if raw.get("format_version") == 1:
        raw = {**raw, "format_version": 2}
    task = raw.get("task")
    if not isinstance(task, dict) or task.get("kind") != "segmentation":
        return raw
    if "threshold_choice" not in task:
        fixed = {"rule": "fixed", "chosen_on": "none"}
        task = {**task, "thresholds": task.get("thresholds") or [0.5]}
        task.update(thresholds_validated=False, threshold_choice=fixed)
        task.setdefault("thresholds_note", UNCHOSEN_NOTE)
        raw = {**raw, "task": task}
    return raw


def parse_meta(raw: dict, where: str = "bundle.json") -> BundleMeta:
    """A `bundle.json` dict as a BundleMeta (migrated from older formats), or a BundleError
    naming each field that is unknown or of the wrong type."""
    version = raw.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise BundleError(f"{where}: bundle format {version} is not supported")
    try:
        return BundleMeta.model_validate(_migrate(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise BundleError(f"{where}: {problems}") from None


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


def save_bundle(model: torch.nn.Module, path: Path, meta: BundleMeta) -> Path:
    """The one writer of bundles: weights, then `bundle.json` with their sha256."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda tmp: save_file(state, str(tmp)))
    meta = meta.model_copy(update={"weights_sha256": file_sha256(weights)})
    write_json(path / "bundle.json", meta.model_dump(mode="json", exclude_none=True))
    return path


def read_meta(path: Path) -> BundleMeta:
    """The one reader of `bundle.json` (typed, migrated); the weights are not read."""
    path = Path(path)
    meta_file, weights = path / "bundle.json", path / "model.safetensors"
    if not meta_file.is_file() or not weights.is_file():
        raise BundleError(f"{path} is not a bundle: it needs bundle.json and model.safetensors")
    return parse_meta(read_json(meta_file), str(meta_file))


def read_bundle(path: Path) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """Metadata and state dict of a bundle, after checking the weights' sha256."""
    meta = read_meta(path)
    weights = Path(path) / "model.safetensors"
    digest = file_sha256(weights)
    if digest != meta.weights_sha256:
        raise BundleError(
            f"{weights}: sha256 {digest[:12]}... does not match bundle.json "
            f"({str(meta.weights_sha256)[:12]}...); the weights were changed or damaged"
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
    fov_diameter: int | None = None  # segmentation (`data.vessel_frame`); None: square resize
    input: InputMode = "rgb"  # segmentation (`data.vessel_input`)
    tta_flips: bool = False  # segmentation: average the four flips' probabilities

    def config(self, workers: int = 0) -> PreprocessConfig:
        """The settings `fundusfm preprocess` uses to produce this model's input images."""
        if self.crop is None:
            raise BundleError("a segmentation bundle pads to a square; it has no FOV crop")
        return PreprocessConfig(
            resolution=self.resolution, workers=workers, **self.crop.model_dump()
        )


def read_preprocessing(meta: BundleMeta) -> Preprocessing:
    """The preprocessing of a bundle, with the module's defaults for what is absent."""
    block = meta.preprocessing
    defaulted = []
    crop = None
    if not meta.segmentation:
        if block.crop is None:
            defaulted.append("crop")
        crop = block.crop or CropConfig()
    values = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        recorded = getattr(block, key)
        if recorded is None:
            defaulted.append(key)
        values[key] = tuple(float(v) for v in (recorded or default))
    return Preprocessing(
        block.resolution,
        crop,
        values["mean"],
        values["std"],
        tuple(defaulted),
        fov_diameter=block.fov_diameter,
        input=block.input or "rgb",
        tta_flips=bool(block.tta_flips),
    )


def bundle_notes(meta: BundleMeta) -> list[str]:
    """What a user should know before trusting a bundle's outputs (printed by the commands,
    recorded in metrics.json): thresholds not chosen on data, preprocessing defaults filled
    in, a FOV rule other than the one this fundusfm crops with."""
    notes = []
    task = meta.task
    if not task.thresholds_validated and task.kind != "multiclass":
        imported = meta.provenance.source_file is not None
        why = task.thresholds_note or ("imported weights" if imported else "not recorded")
        notes.append(
            f"thresholds {task.thresholds} were not (all) chosen on validation data "
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
    rule = meta.preprocessing.fov_rule
    if meta.preprocessing.crop is not None and rule != FOV_RULE:
        made = rule or "not recorded (made before fundusfm recorded it)"
        notes.append(
            f"the bundle's FOV rule is {made}; this fundusfm crops with rule {FOV_RULE}, so "
            "crops of some images may differ slightly from its training"
        )
    return notes
