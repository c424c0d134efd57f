"""Typed settings of vessel segmentation (`fundusfm segment train`, segmentation grids).

A U-Net (segmentation_models_pytorch) whose encoder is one of our ResNet backbones, started
from any of the four initialisations or a bundle, trained with its encoder frozen or in full.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fundusfm.config.core import EncoderInit, LoopConfig, RunConfig, Strict

InputMode = Literal["rgb", "green", "clahe"]  # data.input (`data.vessel_input`)


class SegDataConfig(Strict):
    """Which images train and test, at which size, in which input form.

    Without `splits` the manifest's `split` column decides (the dataset's official
    train/test split, written by `fundusfm data import`); with `splits` (from
    `fundusfm split`) fold k's training, validation and test parts are used.

    Size: unset `fov_diameter` pads each image to a centred square and resizes it to
    `resolution`, whatever its field of view. With `fov_diameter` each image (and its masks)
    is scaled so that its FOV (the bounding box of the FOV mask, shipped or derived) is that
    many pixels wide, then cropped or padded to a `resolution` square centred on the FOV:
    vessels keep one width in pixels across cameras whose FOV fills the frame differently.
    Predictions are mapped back to native pixels and scored there either way.
    """

    manifest: Path | None = Field(None, description="vessel manifest (fundusfm data import)")
    splits: Path | None = Field(None, description="splits.csv; unset: the manifest's split column")
    fold: int = Field(0, ge=0)
    fraction: float = Field(1.0, gt=0, le=1, description="share of training patients used")
    val_fraction: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="official split only: share of training patients kept to pick the best "
        "epoch; 0 keeps the last epoch (the usual DRIVE protocol)",
    )
    resolution: int = Field(
        512, ge=64, le=4096, description="images are padded square and resized to this"
    )
    patch: int | None = Field(
        None, ge=32, description="train on random square patches of this size (unset: whole)"
    )
    patches_per_image: int = Field(1, ge=1, description="patches drawn per image and epoch")
    fov_diameter: int | None = Field(
        None,
        ge=32,
        description="scale each image so its FOV is this many px wide, centred on the "
        "resolution square (unset: pad square and resize the whole image to resolution)",
    )
    input: InputMode = Field(
        "rgb",
        description="green: the green channel on all three; clahe: the green channel after "
        "CLAHE (skimage equalize_adapthist) on all three; applied at inference too",
    )

    @model_validator(mode="after")
    def _sizes(self) -> SegDataConfig:
        for name in ("resolution", "patch"):
            value = getattr(self, name)
            if value is not None and value % 32:
                raise ValueError(f"{name}={value}: the U-Net needs a multiple of 32")
        if self.patch is not None and self.patch > self.resolution:
            raise ValueError(f"patch={self.patch} is larger than resolution={self.resolution}")
        if self.fov_diameter is not None and self.fov_diameter > self.resolution:
            raise ValueError(
                f"fov_diameter={self.fov_diameter} is larger than resolution="
                f"{self.resolution}: the FOV must fit the network's square; raise resolution "
                "or lower fov_diameter"
            )
        return self


class SegModelConfig(EncoderInit):
    encoder: Literal["frozen", "full"] = Field(
        "full", description="frozen: encoder weights and BatchNorm statistics stay as loaded"
    )
    decoder_channels: list[int] = Field(default_factory=lambda: [256, 128, 64, 32, 16])

    @model_validator(mode="after")
    def _decoder(self) -> SegModelConfig:
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError("decoder_channels: five positive widths, one per encoder stage")
        return self


class SegAugmentConfig(Strict):
    """Applied to image and masks together (geometry) or to the image alone (what changes
    between cameras: brightness, contrast, gamma, colour balance, blur, noise). Each setting
    at 0 (flip: false) is off."""

    flip: bool = True
    rotate: float = Field(20.0, ge=0, le=180, description="max degrees")
    brightness: float = Field(0.2, ge=0, le=1)
    contrast: float = Field(0.2, ge=0, le=1)
    gamma: float = Field(0.3, ge=0, le=2, description="gamma drawn log-uniform in [1/(1+g), 1+g]")
    colour_gain: float = Field(
        0.1, ge=0, lt=1, description="per-channel gain drawn in [1-g, 1+g] (colour balance)"
    )
    blur_sigma: float = Field(1.0, ge=0, le=10, description="max Gaussian blur sigma, px")
    blur_p: float = Field(0.3, ge=0, le=1, description="probability of blurring a sample")
    noise: float = Field(
        0.02, ge=0, le=0.5, description="max std of Gaussian noise (0-1 intensity scale)"
    )


class SegThresholdConfig(Strict):
    """How probabilities become vessel pixels: a threshold chosen after training, or fixed.

    `max_dice` picks, from the best weights' probability maps, the threshold (0.01 .. 0.99)
    of maximum Dice over the FOV pixels of the `choose_on` images pooled; it is stored in the
    bundle and `fundusfm segment eval` binarises every other dataset with it. `auto` is the
    validation images when the split has them, else the training images. (Not `on`: YAML
    reads that key as `true`.)
    """

    rule: Literal["max_dice", "fixed"] = "max_dice"
    value: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="fixed: the threshold; max_dice: the one validation Dice picks epochs at",
    )
    choose_on: Literal["auto", "val", "train"] = Field(
        "auto", description="max_dice: the images it is chosen on (auto: val if any, else train)"
    )


class SegTrainConfig(LoopConfig):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1, description="global batch (split across torchrun ranks)")
    lr: float = Field(1e-3, gt=0)
    warmup_epochs: float = Field(2.0, ge=0)
    patience: int = Field(
        0, ge=0, description="early stopping on validation Dice (needs a validation part)"
    )
    dice_weight: float = Field(1.0, ge=0, description="loss = bce_weight*BCE + dice_weight*Dice")
    bce_weight: float = Field(1.0, ge=0)
    threshold: SegThresholdConfig = SegThresholdConfig()
    augment: SegAugmentConfig = SegAugmentConfig()

    @field_validator("threshold", mode="before")
    @classmethod
    def _fixed_number(cls, value: object) -> object:
        """A bare number (configs before the rule existed, `--set train.threshold=0.4`)
        is a fixed threshold."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            return {"rule": "fixed", "value": value}
        return value

    @model_validator(mode="after")
    def _loss(self) -> SegTrainConfig:
        if self.dice_weight == 0 and self.bce_weight == 0:
            raise ValueError("dice_weight and bce_weight are both 0: nothing to train on")
        return self


class SegEvalConfig(Strict):
    """How the run's test images (and the threshold's images) are predicted."""

    tta_flips: bool = Field(
        False,
        description="average the probabilities of the image and its horizontal, vertical and "
        "double flips; recorded in the bundle as `segment eval`'s default",
    )


class SegmentConfig(Strict):
    """`fundusfm segment train`: one U-Net on one fold and fraction."""

    data: SegDataConfig = SegDataConfig()
    model: SegModelConfig = SegModelConfig()
    train: SegTrainConfig = SegTrainConfig()
    eval: SegEvalConfig = SegEvalConfig()
    run: RunConfig = RunConfig(out=Path("runs/segment"))
