"""The map from fundusfm's input normalisation (ImageNet mean/std, what every bundle and
loader feeds a backbone) to a pretrained source's own (`models.peers`): x * a + b per
channel, exact up to float rounding. The identity when the source uses ImageNet's."""

from __future__ import annotations

import torch
from torch import nn

from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class InputNorm(nn.Module):
    """ImageNet-normalised images -> images normalised with `mean`/`std` (None: unchanged).
    Its factors are not weights (non-persistent buffers): the bundle records mean/std."""

    def __init__(self, mean=None, std=None):
        super().__init__()
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        f64 = torch.float64  # the factors exact; cast to the input's dtype when applied
        m_in, s_in = torch.tensor(IMAGENET_MEAN, dtype=f64), torch.tensor(IMAGENET_STD, dtype=f64)
        m = torch.tensor(self.mean or IMAGENET_MEAN, dtype=f64)
        s = torch.tensor(self.std or IMAGENET_STD, dtype=f64)
        # stored as float32 (MPS has no float64); the map is x * scale + shift
        scale, shift = (s_in / s).float(), ((m_in - m) / s).float()
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    @property
    def identity(self) -> bool:
        return self.mean is None and self.std is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
