"""What a vessel U-Net sees: the image's input form and the camera-shift augmentation.

Input forms (`data.input`, recorded in the bundle and applied at inference): `rgb` as
decoded; `green` the green channel (where vessels contrast most) on all three channels, so
ImageNet-shaped encoders still fit; `clahe` the green channel after contrast-limited
adaptive histogram equalisation (scikit-image `equalize_adapthist`, clip limit
`CLAHE_CLIP`, tiles 1/8 of the image) on all three.

`CameraShift` draws what changes between cameras, on the image alone: brightness and
contrast (torchvision ColorJitter), gamma, a gain per channel (colour balance), Gaussian
blur (with a probability) and Gaussian noise; each is off at 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.exposure import equalize_adapthist
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from fundusfm.config.segment import InputMode, SegAugmentConfig

CLAHE_CLIP = 0.01


def _clahe(green: torch.Tensor) -> torch.Tensor:
    """CLAHE of one H x W uint8 channel, as uint8."""
    out = equalize_adapthist(green.numpy(), clip_limit=CLAHE_CLIP)
    return torch.from_numpy(np.round(out * 255).astype(np.uint8))


def to_input(images: torch.Tensor, mode: InputMode) -> torch.Tensor:
    """uint8 images (3 x H x W or N x 3 x H x W) in the input form `mode`, still uint8 and
    3-channel (rgb: unchanged)."""
    if mode == "rgb":
        return images
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    green = batch[:, 1]
    if mode == "clahe":
        green = torch.stack([_clahe(g) for g in green.cpu()]).to(batch.device)
    out = green.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return out if images.dim() == 4 else out[0]


def _uniform(low: float, high: float, size: int = 1) -> torch.Tensor:
    """Uniform draws from torch's global generator (seeded per sample by the training set)."""
    return low + (high - low) * torch.rand(size)


class CameraShift:
    """Photometric augmentation of a 3 x H x W uint8 image; identity when every setting is 0."""

    def __init__(self, cfg: SegAugmentConfig):
        self.cfg = cfg
        self.jitter = v2.ColorJitter(cfg.brightness, cfg.contrast)
        self.blur_kernel = 2 * math.ceil(3 * cfg.blur_sigma) + 1

    @property
    def active(self) -> bool:
        c = self.cfg
        blur = c.blur_sigma > 0 and c.blur_p > 0
        return any((c.brightness, c.contrast, c.gamma, c.colour_gain, c.noise, blur))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return image
        c = self.cfg
        x = self.jitter(TF.to_dtype(image, torch.float32, scale=True))
        if c.gamma:
            x = TF.adjust_gamma(x, float((1 + c.gamma) ** _uniform(-1, 1)))
        if c.colour_gain:
            x = (x * _uniform(1 - c.colour_gain, 1 + c.colour_gain, 3).view(3, 1, 1)).clamp(0, 1)
        if c.blur_sigma and c.blur_p and torch.rand(()) < c.blur_p:
            sigma = float(_uniform(0.1 * c.blur_sigma, c.blur_sigma))
            x = TF.gaussian_blur(x, [self.blur_kernel] * 2, [sigma, sigma])
        if c.noise:
            x = TF.gaussian_noise(x, sigma=float(_uniform(0, c.noise)), clip=True)
        return TF.to_dtype(x, torch.uint8, scale=True)
