"""Where and how a model runs: device, mixed precision, memory format, per-rank batch."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise
from fundusfm.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only (bf16 where supported); full precision on CPU and MPS."""
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.amp=bf16: this GPU has no bfloat16; use fp16 or auto")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class Runtime:
    """The device, autocast type, memory format, per-rank batch and loader workers of a run."""

    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = False
    batch_size: int = 32
    workers: int = 0

    @classmethod
    def of(cls, device: torch.device, amp: str, channels_last: str, batch_size: int, workers=0):
        """From the settings' words; `channels_last=auto` means on CUDA only."""
        cl = channels_last == "on" or (channels_last == "auto" and device.type == "cuda")
        return cls(device, amp_dtype(amp, device), cl, batch_size, workers)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    def inputs(self, images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
        """uint8 images of a loader batch, on the device, normalised, in the memory format."""
        x = normalise(images.to(self.device, non_blocking=True), mean, std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
