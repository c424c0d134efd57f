"""The drawing surface of a generated eye: the frame transform (right-eye coordinates on a
canvas of any size) and named L-mode layers that shapes are drawn into, each kept as a mask."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


class Canvas:
    """Frame transform plus helpers to draw shapes into named L-mode layers."""

    def __init__(self, size: int, eye: str, rng: np.random.Generator):
        self.size = size
        self.k = size / 256.0
        self.cx = size / 2 + rng.normal(0, 0.01) * size
        self.cy = size / 2 + rng.normal(0, 0.01) * size
        self.radius = size * rng.uniform(0.45, 0.48)
        self.mirror = -1.0 if eye == "left" else 1.0
        theta = math.radians(rng.uniform(-10, 10))
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        self.layers: dict[str, Image.Image] = {}
        self.draws: dict[str, ImageDraw.ImageDraw] = {}

    def px(self, u: float, v: float) -> tuple[float, float]:
        u *= self.mirror
        x = u * self.cos - v * self.sin
        y = u * self.sin + v * self.cos
        return self.cx + x * self.radius, self.cy + y * self.radius

    def layer(self, name: str) -> ImageDraw.ImageDraw:
        if name not in self.draws:
            self.layers[name] = Image.new("L", (self.size, self.size), 0)
            self.draws[name] = ImageDraw.Draw(self.layers[name])
        return self.draws[name]

    def ellipse(self, name: str, u: float, v: float, ru: float, rv: float, angle=0.0, fill=255):
        """Rotated ellipse; radii in frame units; drawn as a polygon so it can be rotated."""
        n = 16 if max(ru, rv) * self.radius < 8 else 40
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        ca, sa = math.cos(angle), math.sin(angle)
        pu, pv = ru * np.cos(t), rv * np.sin(t)
        pts = [
            self.px(u + a * ca - b * sa, v + a * sa + b * ca) for a, b in zip(pu, pv, strict=True)
        ]
        self.layer(name).polygon(pts, fill=fill)

    def dot(self, name: str, u: float, v: float, r_px: float, fill=255):
        """Small disc with radius in pixels at 256 px (at least one pixel is always drawn)."""
        x, y = self.px(u, v)
        r = max(0.5, r_px * self.k)
        self.layer(name).ellipse([x - r, y - r, x + r, y + r], fill=fill)

    def mask(self, name: str) -> np.ndarray:
        return np.asarray(self.layers[name]) > 0

    def blend(self, img: np.ndarray, name: str, colour, alpha: float, blur: float = 0.0) -> None:
        """Paint `colour` into `img` where layer `name` is drawn, only inside its bounding box."""
        layer = self.layers.get(name)
        box = layer.getbbox() if layer is not None else None
        if box is None:
            return
        pad = int(3 * blur * self.k) + 2
        x0, y0 = max(0, box[0] - pad), max(0, box[1] - pad)
        x1, y1 = min(self.size, box[2] + pad), min(self.size, box[3] + pad)
        crop = layer.crop((x0, y0, x1, y1))
        if blur > 0:
            crop = crop.filter(ImageFilter.GaussianBlur(blur * self.k))
        a = np.asarray(crop, dtype=np.float32)[..., None] * np.float32(alpha / 255.0)
        region = img[y0:y1, x0:x1]
        region += (np.asarray(colour, np.float32) - region) * a

    def array(self, name: str, blur: float = 0.0) -> np.ndarray:
        img = self.layers.get(name)
        if img is None:
            return np.zeros((self.size, self.size), np.float32)
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur * self.k))
        return np.asarray(img, dtype=np.float32) / 255.0
