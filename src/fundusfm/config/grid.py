"""Typed settings of the experiment grid (`fundusfm grid`) and of `fundusfm demo`.

A grid is either a classification grid (task x init x method lf|ff|partial x resolution x
fraction x fold, cells trained from `base`) or a segmentation grid (init x encoder mode
frozen|full x resolution x fraction x fold, cells trained from `segment`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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


class GridAxes(Strict):
    """The axes of the paper's comparison; every combination is one cell."""

    task: list[str | None] = Field(default_factory=lambda: [None])
    init: dict[str, str] = Field(
        default_factory=lambda: {"scratch": "scratch"},
        description="label -> init name or bundle path; a list uses each entry as its label",
    )
    method: list[Literal["lf", "ff", "partial", "frozen", "full"]] = Field(
        default_factory=lambda: ["lf", "ff"],
        description="classification: lf | ff | partial; segmentation: the encoder, frozen | full",
    )
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

    @model_validator(mode="after")
    def _check(self) -> GridAxes:
        for label in self.init:
            if not re.fullmatch(r"[A-Za-z0-9._+-]+", label) or ".." in label:
                raise ValueError(f"init label {label!r}: use letters, digits and . _ + - only")
        for name in ("task", "method", "resolution", "fraction", "fold"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: repeated values {values}")
        return self


class ExternalSet(Strict):
    """A dataset every trained cell is evaluated on (external validation)."""

    name: str
    manifest: Path
    task: str | None = None
    label_map: Path | None = None
    split: str | None = Field(
        None, description="segmentation: only rows whose split column has this value"
    )


class ProbeConfig(Strict):
    """How LF cells train their head."""

    mode: Literal["features", "train"] = Field(
        "features", description="features: logistic regression on cached frozen features"
    )
    Cs: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0, 100.0])
    max_iter: int = Field(2000, ge=10)


class GridConfig(Strict):
    """`fundusfm grid run|status|report`: every combination of the axes is one cell."""

    name: str = "grid"
    kind: Literal["classification", "segmentation"] = "classification"
    out: Path = Path("runs/grid")
    base: FinetuneConfig = FinetuneConfig()
    segment: SegmentConfig = Field(
        default_factory=SegmentConfig, description="base settings of segmentation cells"
    )
    axes: GridAxes = GridAxes()
    external: list[ExternalSet] = Field(default_factory=list)
    probe: ProbeConfig = ProbeConfig()

    @model_validator(mode="before")
    @classmethod
    def _segmentation_methods(cls, data):
        """A segmentation grid without a method axis compares frozen and full encoders."""
        if isinstance(data, dict) and data.get("kind") == "segmentation":
            axes = dict(data.get("axes") or {})
            if axes.get("method") in (None, ["lf", "ff"]):
                axes["method"] = list(SEGMENTATION_METHODS)
            data = {**data, "axes": axes}
        return data

    @model_validator(mode="after")
    def _methods_fit_kind(self) -> GridConfig:
        allowed = SEGMENTATION_METHODS if self.kind == "segmentation" else CLASSIFICATION_METHODS
        wrong = [m for m in self.axes.method if m not in allowed]
        if wrong:
            raise ValueError(
                f"axes.method {wrong} do not fit a {self.kind} grid; use {list(allowed)}"
            )
        if self.kind == "segmentation":
            if self.axes.task != [None]:
                raise ValueError("axes.task: a segmentation grid has one task (vessels)")
            if self.segment.data.splits is None and self.axes.fold != [0]:
                raise ValueError(
                    "axes.fold: without segment.data.splits the official split is the only "
                    "fold; set axes.fold: [0] or make splits with `fundusfm split`"
                )
            for r in self.axes.resolution:
                patch = self.segment.data.patch
                if r % 32 or (patch is not None and patch > r):
                    raise ValueError(f"axes.resolution {r}: needs a multiple of 32 >= the patch")
        return self


def _demo_grid() -> GridConfig:
    return GridConfig(
        name="demo",
        base=FinetuneConfig(
            data=DataConfig(task="abnormal", resolution=128),
            model=ModelConfig(arch="resnet18", head="mlp"),
            train=TrainConfig(epochs=3, batch_size=32, lr=5e-4, warmup_epochs=0.5),
        ),
        axes=GridAxes(
            method=["lf", "ff"], resolution=[128], fraction=[0.25, 0.5, 1.0], fold=[0, 1, 2, 3, 4]
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
        data=DataConfig(task="abnormal", resolution=128),
        model=ModelConfig(arch="resnet18", head="mlp"),
        train=TrainConfig(epochs=3, batch_size=32, lr=1e-3, warmup_epochs=0.5),
    )
    split: SplitConfig = SplitConfig(
        folds=5, fractions=[0.25, 0.5, 1.0], val_fraction=0.15, task="abnormal"
    )
    grid: GridConfig = Field(default_factory=_demo_grid)
    imagenet: Literal["auto", "offline"] = Field(
        "auto", description="auto: use or download ImageNet weights; offline: never download"
    )
    n_boot: int = Field(1000, ge=10)
