"""Typed settings of the experiment grid (`fundusfm grid`) and of `fundusfm demo`.

A grid is one of two kinds, told apart by `kind` (`GridConfig`, a discriminated union):

    ClassificationGrid  kind: classification. task x init x method lf|ff|partial x
                        resolution x fraction x fold; cells trained from `base`, LF cells
                        probed as `probe` says, external sets scored for `task`/`label_map`.
    SegmentationGrid    kind: segmentation. init x encoder mode frozen|full x resolution x
                        fraction x fold; cells trained from `segment`, external sets cut to
                        their `split`.

Each kind holds only its own settings: a key only the other kind reads (`segment:` in a
classification grid; `base:`, `probe:`, `axes.task` or an external set's `label_map` in a
segmentation grid) is refused by name. A file without `kind` is a segmentation grid when it
has a `segment:` section and no `base:`, else a classification grid (the kind every grid had
before segmentation grids existed, so older files load unchanged).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from fundusfm.config.core import (
    CameraConfig,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    SplitConfig,
    Strict,
    SynthConfig,
    TrainConfig,
)
from fundusfm.config.segment import SegmentConfig

CLASSIFICATION_METHODS = ("lf", "ff", "partial")
SEGMENTATION_METHODS = ("frozen", "full")
VESSELS = "vessels"  # the one task of a segmentation grid (its cells' `task` coordinate)


class GridAxes(Strict):
    """The axes both kinds share; every combination of a grid's axes is one cell."""

    kind: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]

    init: dict[str, str] = Field(
        default_factory=lambda: {"scratch": "scratch"},
        description="label -> init name or bundle path; a list uses each entry as its label",
    )
    method: list[str] = Field(description="how the pretrained part is adapted (per kind)")
    resolution: list[int] = Field(default_factory=lambda: [512])
    fraction: list[float] = Field(default_factory=lambda: [1.0])
    fold: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])

    @model_validator(mode="before")
    @classmethod
    def _init_list(cls, data):
        if isinstance(data, dict) and isinstance(data.get("init"), list):
            labels = [str(v).rstrip("/").replace("/", "_") for v in data["init"]]
            if len(set(labels)) != len(labels):
                raise ValueError("init: two entries give the same label; use label: init pairs")
            data = {**data, "init": dict(zip(labels, map(str, data["init"]), strict=True))}
        return data

    @field_validator("method", mode="before")
    @classmethod
    def _methods_fit_kind(cls, value):
        wrong = [m for m in value if m not in cls.methods] if isinstance(value, list) else []
        if wrong:
            raise ValueError(f"{wrong} do not fit a {cls.kind} grid; use {list(cls.methods)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> GridAxes:
        for label in self.init:
            if not re.fullmatch(r"[A-Za-z0-9._+-]+", label) or ".." in label:
                raise ValueError(f"init label {label!r}: use letters, digits and . _ + - only")
        for name in type(self).model_fields:
            values = getattr(self, name)
            if isinstance(values, list) and len(set(values)) != len(values):
                raise ValueError(f"{name}: repeated values {values}")
        return self


class ClassificationAxes(GridAxes):
    kind = "classification"
    methods = CLASSIFICATION_METHODS

    method: list[Literal["lf", "ff", "partial"]] = Field(
        default_factory=lambda: ["lf", "ff"], description="lf | ff | partial"
    )
    task: list[str | None] = Field(
        default_factory=lambda: [None], description="manifest tasks; null: base.data.task"
    )
    init_resolution: dict[str, int] = Field(
        default_factory=dict,
        description="init label -> its own input size (e.g. 224 for a ViT): its cells run at "
        "it alone, and the report compares it with the other inits at every axis resolution",
    )

    @model_validator(mode="after")
    def _own_resolutions(self) -> ClassificationAxes:
        unknown = sorted(set(self.init_resolution) - set(self.init))
        if unknown:
            raise ValueError(f"init_resolution names {unknown}, which are not init labels")
        return self


class SegmentationAxes(GridAxes):
    kind = "segmentation"
    methods = SEGMENTATION_METHODS

    method: list[Literal["frozen", "full"]] = Field(
        default_factory=lambda: list(SEGMENTATION_METHODS), description="the encoder: frozen | full"
    )


class ExternalSet(Strict):
    """A dataset every trained cell is evaluated on (external validation)."""

    name: str
    manifest: Path


class ClassificationExternal(ExternalSet):
    task: str | None = Field(None, description="the task scored; unset: the cell's")
    label_map: Path | None = Field(None, description="maps the set's labels to the task")


class SegmentationExternal(ExternalSet):
    split: str | None = Field(None, description="only rows whose split column has this value")


class ProbeConfig(Strict):
    """How LF cells train their head."""

    mode: Literal["features", "train"] = Field(
        "features", description="features: logistic regression on cached frozen features"
    )
    Cs: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0])
    max_iter: int = Field(2000, ge=10)


class GridBase(Strict):
    """What both kinds of grid share: where cells go, the shared axes, the external sets."""

    name: str = "grid"
    kind: str
    out: Path = Path("runs/grid")
    axes: GridAxes
    external: list[ExternalSet] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _keys_of_another_kind(cls, data):
        """A setting only the other kind reads is refused by name, never silently ignored."""
        if not isinstance(data, dict):
            return data
        for other in GRID_KINDS.values():
            wrong = [] if other is cls else _foreign_keys(cls, other, data)
            if wrong:
                own = cls.model_fields["kind"].default
                theirs = other.model_fields["kind"].default
                raise ValueError(
                    f"{', '.join(wrong)}: read by a {theirs} grid, not by this {own} grid; "
                    f"remove {'it' if len(wrong) == 1 else 'them'}, or set kind: {theirs}"
                )
        return data


def _keys(grid: type[GridBase], section: str) -> set[str]:
    """The keys a section of this kind of grid reads (of a list section: of each item)."""
    annotation = grid.model_fields[section].annotation
    return set((get_args(annotation) or (annotation,))[0].model_fields)


def _foreign_keys(own: type[GridBase], other: type[GridBase], data: dict) -> list[str]:
    """The keys of `data` (top level, axes, external sets) that `other` reads and `own` not."""
    wrong = [k for k in data if k in other.model_fields and k not in own.model_fields]
    axes, external = data.get("axes"), data.get("external")
    parts = {"axes": axes} if isinstance(axes, dict) else {}
    if isinstance(external, list):
        parts |= {f"external.{i}": e for i, e in enumerate(external) if isinstance(e, dict)}
    for where, part in parts.items():
        section = where.split(".")[0]
        only_theirs = _keys(other, section) - _keys(own, section)
        wrong += [f"{where}.{k}" for k in part if k in only_theirs]
    return wrong


class ClassificationGrid(GridBase):
    """`fundusfm grid` over classification cells, each a `finetune` run from `base`."""

    kind: Literal["classification"] = "classification"
    base: FinetuneConfig = FinetuneConfig()
    axes: ClassificationAxes = ClassificationAxes()
    external: list[ClassificationExternal] = Field(default_factory=list)
    probe: ProbeConfig = ProbeConfig()


class SegmentationGrid(GridBase):
    """`fundusfm grid` over vessel-segmentation cells, each a `segment train` run."""

    kind: Literal["segmentation"] = "segmentation"
    segment: SegmentConfig = Field(
        default_factory=SegmentConfig, description="base settings of segmentation cells"
    )
    axes: SegmentationAxes = SegmentationAxes()
    external: list[SegmentationExternal] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fit_segment(self) -> SegmentationGrid:
        if self.segment.data.splits is None and self.axes.fold != [0]:
            raise ValueError(
                "axes.fold: without segment.data.splits the official split is the only "
                "fold; set axes.fold: [0] or make splits with `fundusfm split`"
            )
        patch, fov = self.segment.data.patch, self.segment.data.fov_diameter
        for r in self.axes.resolution:
            if r % 32 or (patch is not None and patch > r):
                raise ValueError(f"axes.resolution {r}: needs a multiple of 32 >= the patch")
            if fov is not None and fov > r:
                raise ValueError(
                    f"axes.resolution {r}: smaller than segment.data.fov_diameter={fov}; "
                    "the FOV must fit the square"
                )
        return self


GRID_KINDS: dict[str, type[GridBase]] = {
    "classification": ClassificationGrid,
    "segmentation": SegmentationGrid,
}


def grid_kind(data) -> str | None:
    """The kind of grid `data` (settings or a grid) is: its `kind`; without one, segmentation
    when it has a `segment:` section and no `base:`, else classification."""
    if not isinstance(data, dict):
        return getattr(data, "kind", None)
    if "kind" in data:
        return data["kind"]
    return "segmentation" if "segment" in data and "base" not in data else "classification"


GridConfig = Annotated[
    Annotated[ClassificationGrid, Tag("classification")]
    | Annotated[SegmentationGrid, Tag("segmentation")],
    Discriminator(grid_kind),
]
"""`fundusfm grid run|status|report`: every combination of the axes is one cell. Load it
with `load_config(GridConfig, path)`; the result is a ClassificationGrid or SegmentationGrid."""


# The demo's model, sized so its whole protocol runs in about 5 minutes on 2 CPU cores:
# ResNet-10 (one block per stage) at 96 px trains about 3x faster than ResNet-18 at 128 px.
# ResNet-10 has no ImageNet weights, so the ImageNet arms join only with another arch
# (`--set pretrain.model.arch=resnet18 --set grid.base.model.arch=resnet18`) or `--full`.
DEMO_ARCH, DEMO_RESOLUTION = "resnet10", 96


def _demo_grid() -> ClassificationGrid:
    return ClassificationGrid(
        name="demo",
        base=FinetuneConfig(
            data=DataConfig(task="abnormal", resolution=DEMO_RESOLUTION),
            model=ModelConfig(arch=DEMO_ARCH, head="mlp"),
            train=TrainConfig(epochs=3, batch_size=32, lr=5e-4, warmup_epochs=0.5),
        ),
        axes=ClassificationAxes(
            method=["lf", "ff"],
            resolution=[DEMO_RESOLUTION],
            fraction=[0.25, 0.5, 1.0],
            fold=[0, 1, 2, 3, 4],
        ),
    )


class DemoConfig(Strict):
    """What `fundusfm demo` generates and runs (paths are filled in under --out)."""

    upstream: SynthConfig = SynthConfig(n=400, size=160, seed=1)
    downstream: SynthConfig = SynthConfig(n=200, size=160, seed=2)
    external: SynthConfig = SynthConfig(
        n=80,
        size=200,
        seed=3,
        camera=CameraConfig(tint=(1.12, 0.92, 0.78), blur_max=2.0, noise_max=0.04),
    )
    pretrain: PretrainConfig = PretrainConfig(
        strategy="fundus",
        data=DataConfig(task="abnormal", resolution=DEMO_RESOLUTION),
        model=ModelConfig(arch=DEMO_ARCH, head="mlp"),
        train=TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.5),
    )
    split: SplitConfig = SplitConfig(
        folds=5, fractions=[0.25, 0.5, 1.0], val_fraction=0.15, task="abnormal"
    )
    grid: ClassificationGrid = Field(default_factory=_demo_grid)
    imagenet: Literal["auto", "offline"] = Field(
        "auto", description="auto: use or download ImageNet weights; offline: never download"
    )
    n_boot: int = Field(1000, ge=10)

    @model_validator(mode="after")
    def _one_protocol(self) -> DemoConfig:
        """The settings the demo states twice must agree, or cells fail only at the end."""
        axes, split = self.grid.axes, self.split
        extra = sorted(set(axes.fraction) - set(split.fractions))
        if extra:
            raise ValueError(
                f"grid.axes.fraction {extra} not in split.fractions {split.fractions}: "
                "set both to the same list"
            )
        if max(axes.fold) >= split.folds:
            raise ValueError(
                f"grid.axes.fold {axes.fold} needs split.folds > {max(axes.fold)} "
                f"(it is {split.folds})"
            )
        if self.grid.base.model.arch != self.pretrain.model.arch:
            raise ValueError(
                f"grid.base.model.arch {self.grid.base.model.arch} differs from "
                f"pretrain.model.arch {self.pretrain.model.arch}: the Fundus init is the "
                "pretrained backbone, so set both"
            )
        return self
