"""Typed settings of screening (`fundusfm predict`) and its image-quality gate."""

from __future__ import annotations

from pydantic import Field

from fundusfm.config.core import Strict


class QualityConfig(Strict):
    """A simple, documented gradability check; an image failing any test is `ungradable`.

    Measured on the field-of-view crop resized to `analysis_size` (so the figures do not
    depend on the camera's resolution), over FOV pixels away from its rim.
    """

    enabled: bool = True
    analysis_size: int = Field(256, ge=64, le=1024)
    min_fov_fraction: float = Field(
        0.15, ge=0, le=1, description="FOV bounding box / image area: less is no fundus"
    )
    min_brightness: float = Field(
        0.08, ge=0, le=1, description="mean luminance inside the FOV (0-1)"
    )
    max_brightness: float = Field(0.85, ge=0, le=1)
    max_saturated: float = Field(
        0.25, ge=0, le=1, description="share of FOV pixels with luminance >= 98% of full scale"
    )
    min_focus: float = Field(
        0.015,
        ge=0,
        description="variance of the green channel's Laplacian / its variance: blur lowers it",
    )
