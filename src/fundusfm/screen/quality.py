"""Image-quality gate: is a photograph gradable? (field of view, exposure, focus).

`assess(rgb, cfg)` returns a verdict, the reasons for it and the measures:
    fov_fraction  area of the field-of-view box / image area (no FOV found: ungradable)
    brightness    mean luminance inside the FOV, 0-1 (under- or over-exposed); luminance,
                  not the brightest channel, because the red channel clips in many
                  well-exposed fundus photographs
    saturated     share of FOV pixels whose luminance is >= 98% of full scale (glare)
    focus         var(Laplacian of green) / var(green) inside the FOV: a scale-free share of
                  high-frequency energy, which blur removes
The FOV crop is resized to `analysis_size` first and its rim eroded away, so measures do not
depend on resolution and the sharp FOV edge does not count as focus. Thresholds live in
QualityConfig; they were set on generated images and DRIVE, CHASE_DB1 and the 4-class
eye-disease set (see the README) and are a screen for gross failures, not a grader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from fundusfm.config.screen import QualityConfig
from fundusfm.data.preprocess import fov_box, fov_mask
from fundusfm.errors import NoFieldOfView


@dataclass
class Quality:
    verdict: str  # "gradable" | "ungradable"
    reasons: list[str] = field(default_factory=list)
    measures: dict[str, float] = field(default_factory=dict)

    @property
    def gradable(self) -> bool:
        return self.verdict == "gradable"


def measure(rgb: np.ndarray, size: int = 256) -> dict[str, float]:
    """The quality measures of an HxWx3 uint8 image (raises NoFieldOfView)."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = fov_box(rgb, 0.06, 0.02)
    crop = Image.fromarray(rgb[y0:y1, x0:x1]).resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    # the FOV as preprocessing finds it (one rule), shrunk so that its rim does not count
    region = fov_mask(np.asarray(crop).max(axis=2), 0.06)
    inside = ndimage.binary_erosion(region, iterations=size // 32)
    luma = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # red alone often clips
    if inside.sum() < 16:
        raise NoFieldOfView("the field of view is too small to assess")
    green = arr[..., 1]
    lap = ndimage.laplace(green)
    spread = float(green[inside].var())
    return {
        "fov_fraction": (x1 - x0) * (y1 - y0) / (h * w),
        "brightness": float(luma[inside].mean()),
        "saturated": float((luma[inside] >= 0.98).mean()),
        "focus": float(lap[inside].var() / spread) if spread > 1e-8 else 0.0,
    }


def assess(rgb: np.ndarray, cfg: QualityConfig) -> Quality:
    """Gradable or not, with every failed test named."""
    if not cfg.enabled:
        return Quality("gradable")
    try:
        m = measure(rgb, cfg.analysis_size)
    except NoFieldOfView as exc:
        return Quality("ungradable", [f"no field of view ({exc})"])
    reasons = []
    if m["fov_fraction"] < cfg.min_fov_fraction:
        reasons.append(f"field of view covers {m['fov_fraction']:.0%} of the image")
    if m["brightness"] < cfg.min_brightness:
        reasons.append(f"under-exposed (brightness {m['brightness']:.2f})")
    if m["brightness"] > cfg.max_brightness:
        reasons.append(f"over-exposed (brightness {m['brightness']:.2f})")
    if m["saturated"] > cfg.max_saturated:
        reasons.append(f"{m['saturated']:.0%} of the field of view saturated")
    if m["focus"] < cfg.min_focus:
        reasons.append(f"out of focus (focus {m['focus']:.3f})")
    return Quality("ungradable" if reasons else "gradable", reasons, m)
