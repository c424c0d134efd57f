"""Typed configuration: pydantic models read from YAML, with `--set a.b=c` overrides.

Every command takes its settings from one of the models below. A YAML file gives the
starting values, `--set` lines override single keys, and the resolved model is written
into the run directory so a result can always be traced to the exact settings.
Unknown keys and wrong types are errors that name the key and the file they came from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from fundusfm.errors import ConfigError
from fundusfm.io import write_text_atomic


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CameraConfig(Strict):
    """Appearance of the simulated camera; shift these to make an external-looking set."""

    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur_max: float = Field(1.0, ge=0, description="max Gaussian blur radius, px at 256 px")
    noise_max: float = Field(0.025, ge=0, description="max Gaussian noise sigma (0-1 scale)")
    vignetting: float = Field(0.35, ge=0, le=1)
    gamma_jitter: float = Field(0.15, ge=0, le=1)


class SynthConfig(Strict):
    """Procedural fundus data set (`fundusfm synth`)."""

    n: int = Field(200, ge=1, description="number of images (two eyes per patient)")
    size: int = Field(256, ge=32, le=4096, description="image side in pixels")
    seed: int = 0
    format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(92, ge=50, le=100)
    prevalence: dict[str, float] = Field(
        default_factory=lambda: {
            "normal": 0.40,
            "dr": 0.20,
            "amd": 0.10,
            "glaucoma": 0.10,
            "myopia": 0.10,
            "rvo": 0.10,
        },
        description="patient-level share of each primary diagnosis",
    )
    comorbidity: float = Field(0.1, ge=0, le=1, description="chance of a second disease")
    subtle: float = Field(0.35, ge=0, le=1, description="share of diseased eyes drawn mildly")
    camera: CameraConfig = CameraConfig()
    workers: int = Field(0, ge=0, description="processes; 0 = all cores")


class CropConfig(Strict):
    """How the field of view is found and cropped (everything but the resolution)."""

    fov_threshold: float = Field(
        0.06, gt=0, lt=1, description="FOV pixels lie this far from background to 99th percentile"
    )
    fov_min_fraction: float = Field(
        0.02, gt=0, lt=1, description="a row/column belongs to the FOV if this share is bright"
    )
    margin: float = Field(0.0, ge=0, le=0.5, description="extra border around the FOV box")
    interpolation: Literal["lanczos", "bicubic", "bilinear", "area"] = "lanczos"
    jpeg_draft: bool = Field(True, description="decode JPEGs at reduced size when it is enough")


class PreprocessConfig(CropConfig):
    """Field-of-view crop, square padding and resize (`fundusfm preprocess`)."""

    resolution: int = Field(512, ge=16, le=4096)
    workers: int = Field(0, ge=0, description="threads; 0 = all cores")


class SplitConfig(Strict):
    """Patient-grouped stratified k-fold with nested labelled fractions (`fundusfm split`)."""

    folds: int = Field(5, ge=2, le=50)
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="of each fold's training part")
    val_policy: Literal["scaled", "fixed"] = Field(
        "scaled", description="scaled: validation shrinks with the fraction; fixed: it never does"
    )
    test_fraction: float = Field(0.0, ge=0, lt=0.9, description="held out from every fold")
    seed: int = 0
    task: str | None = Field(None, description="task to stratify on; default: the first declared")


class DataConfig(Strict):
    """Which images, labels, fold and fraction a training run uses."""

    manifest: Path | None = Field(None, description="manifest.csv (required)")
    task: str | None = Field(None, description="task declared in the manifest's YAML")
    splits: Path | None = Field(None, description="splits.csv from `fundusfm split`")
    fold: int = Field(0, ge=0)
    fraction: float = Field(1.0, gt=0, le=1)
    resolution: int = Field(512, ge=16, le=4096)
    crop: CropConfig = CropConfig()
    cache: Path | None = Field(None, description="cache root; default: cache/ beside manifest")

    def preprocess(self, workers: int = 0) -> PreprocessConfig:
        return PreprocessConfig(
            resolution=self.resolution, workers=workers, **self.crop.model_dump()
        )


RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")


class EncoderInit(Strict):
    """Which backbone and which initialisation it starts from (`models.inits`)."""

    arch: str = Field(
        "resnet50",
        description=f"{' | '.join(RESNETS)} (torchvision) or timm:NAME (any timm model); "
        "a published init (retfound, flair, ...) brings its own",
    )
    init: str | None = Field(
        None,
        description="scratch | imagenet | fundus | imagenet+fundus | retfound | "
        "retfound-dinov2 | flair | keepfit | visionfm | urfound | file (the published ones "
        "with model.init_file, or as NAME:FILE) | path of a bundle; unset: imagenet",
    )
    init_file: Path | None = Field(
        None, description="the checkpoint file of a published init (retfound, ...) or `file`"
    )

    @field_validator("arch")
    @classmethod
    def _arch_named(cls, value: str) -> str:
        if value in RESNETS or (value.startswith("timm:") and len(value) > 5):
            return value
        raise ValueError(f"expected one of {', '.join(RESNETS)} or timm:NAME")

    @property
    def init_name(self) -> str:
        return self.init or "imagenet"

    init_bundle: Path | None = Field(None, description="bundle behind fundus / imagenet+fundus")
    imagenet_version: Literal["IMAGENET1K_V1", "IMAGENET1K_V2"] = "IMAGENET1K_V1"
    imagenet_file: Path | None = Field(None, description="ImageNet weights file (else hub cache)")


class ModelConfig(EncoderInit):
    head: Literal["linear", "mlp"] = "mlp"
    hidden: int = Field(512, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class AugmentConfig(Strict):
    """Training-time augmentation, drawn from a per-image seed (reproducible, resumable)."""

    flip: bool = True
    rotate: float = Field(15.0, ge=0, le=180, description="max degrees")
    scale: tuple[float, float] = (0.95, 1.1)
    brightness: float = Field(0.15, ge=0, le=1)
    contrast: float = Field(0.15, ge=0, le=1)


class LoopConfig(Strict):
    """The settings of the one training loop (`engine.loop.fit`), shared by every task."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch (split across torchrun ranks)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    warmup_epochs: float = Field(1.0, ge=0)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    patience: int = Field(0, ge=0, description="early stopping after this many epochs; 0 = off")
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    workers: int = Field(0, ge=0, description="data loader processes")
    sync_batchnorm: bool = Field(
        False, description="under torchrun on GPUs: BatchNorm statistics over the global batch"
    )
    seed: int = 0


class TrainConfig(LoopConfig):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighted_loss: bool = False
    balanced_sampler: bool = False
    select_metric: str = Field("auroc", description="validation metric for model selection")
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise lr decay, the RETFound recipe: a layer k below the top trains "
        "at lr * layer_decay**k (timm's layers for a ViT; a ResNet's stages); RETFound 0.65, "
        "BEiT 0.75; None = off",
    )
    augment: AugmentConfig = AugmentConfig()


class RunConfig(Strict):
    out: Path = Path("runs/finetune")
    resume: bool = False
    progress: bool = True
    keep_checkpoint: bool = Field(
        False,
        description="keep checkpoint.pt and best.safetensors once the run has finished "
        "(the bundle already holds the best weights; a ResNet-50 checkpoint is ~300 MB)",
    )


class FinetuneConfig(Strict):
    """`fundusfm finetune`: one fold, one fraction, one resolution, one init, one method."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: Literal["lf", "ff", "partial"] = "ff"
    partial_stages: int = Field(1, ge=1, le=4, description="stages trained by `partial`")
    train: TrainConfig = TrainConfig()
    run: RunConfig = RunConfig()


class PretrainConfig(FinetuneConfig):
    """`fundusfm pretrain`: supervised upstream training that yields a fundus backbone."""

    strategy: Literal["fundus", "imagenet+fundus"] = "imagenet+fundus"
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="used when data.splits is unset")
    method: Literal["ff"] = "ff"
    run: RunConfig = RunConfig(out=Path("runs/pretrain"))


M = TypeVar("M", bound=BaseModel)


def parse_value(text: str) -> Any:
    """Read the right-hand side of `--set key=value` as YAML (numbers, lists, booleans)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` inside nested dicts, creating sections as needed."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set split.folds=5")
    key, _, value = assignment.partition("=")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = parse_value(value)


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif isinstance(e.get("input"), dict):  # a whole section: its message names the keys
            lines.append(f"  {key}: {e['msg']}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _config_class(model, data: dict, source: str) -> type[BaseModel]:
    """`model` itself, or for a union of configs told apart by `kind`
    (`Annotated[Annotated[A, Tag(a)] | ..., Discriminator(f)]`) the member `f(data)` names."""
    if isinstance(model, type):
        return model
    union, *meta = get_args(model)
    pick = next(m for m in meta if isinstance(m, Discriminator)).discriminator
    members = {
        tag.tag: cls
        for cls, *tags in map(get_args, get_args(union))
        for tag in tags
        if isinstance(tag, Tag)
    }
    kind = pick(data)
    if kind not in members:
        known = ", ".join(members)
        raise ConfigError(
            f"invalid configuration in {source}:\n  kind: {kind!r} is not one of: {known}"
        )
    return members[kind]


def _merge(model: type[BaseModel], base: dict, update: dict) -> dict:
    """`update` laid over `base`; sub-sections merge key by key, every other value replaces."""
    out = dict(base)
    for key, value in update.items():
        field = model.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if (
            isinstance(sub, type)
            and issubclass(sub, BaseModel)
            and isinstance(value, dict)
            and isinstance(out.get(key), dict)
        ):
            out[key] = _merge(sub, out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    model: type[M] | Any,
    path: Path | None = None,
    overrides: list[str] | None = None,
) -> M:
    """Build `model` from its defaults, a YAML file (optional) and `--set` overrides, in order.

    Sections given in the file or by `--set` are merged into the model's own defaults, so
    `--set grid.base.train.epochs=1` changes one value and keeps every other default.
    `model` may be a union of configs told apart by `kind` (`config.grid.GridConfig`): the
    file and overrides say which member, whose defaults are then merged in.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        data = loaded
        source = str(path)
    if overrides:
        source += " + --set " + " ".join(overrides)
    probe = copy.deepcopy(data)  # which member of a union: decided by the file and --set
    for assignment in overrides or []:
        apply_override(probe, assignment)
    model = _config_class(model, probe, source)
    # the defaults unvalidated: a segmentation grid's are only valid once a file sets splits
    data = _merge(model, model.model_construct().model_dump(mode="json"), data)
    for assignment in overrides or []:
        apply_override(data, assignment)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc


def changed_settings(config: BaseModel, path: Path, ignore: tuple[str, ...] = ()) -> list[str]:
    """Top-level keys whose values differ between `config` and the config saved at `path`.

    Used to refuse (or restart) a resumed run, grid cell or demo whose settings changed.
    An absent file differs in nothing.
    """
    if not Path(path).is_file():
        return []
    old = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    new = config.model_dump(mode="json")
    return sorted(
        k for k in new.keys() | old.keys() if k not in ignore and old.get(k) != new.get(k)
    )


def dump_config(config: BaseModel, path: Path) -> Path:
    """Write the resolved configuration as YAML (the record of what a run used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
