"""How a vessel image at its own size maps onto the network's square, and back.

Two framings (`config.segment.SegDataConfig`):
- `fov_diameter` unset: pad to a centred square (black), resize to `resolution` (`square`);
  `to_native` resizes a probability map back and crops the padding.
- `fov_diameter` set: scale the image so that its FOV (the bounding box of its FOV mask)
  is `fov_diameter` px wide, then take the `resolution` square centred on the FOV, padding
  with black where it passes the image's edge and cropping what lies outside (`fov_frame`,
  `into_frame`); `from_frame` pastes a probability map back into the scaled image (zero
  outside the square) and resizes it to the native size.

Images resize bilinearly (PIL, antialiased when shrinking), masks by nearest neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from fundusfm.errors import DataError


def _resize(arr: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    """PIL resize of a uint8, bool or float32 array to (height, width)."""
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if arr.dtype == bool:
        return np.array(Image.fromarray(arr).resize((width, height), mode)).astype(bool)
    if arr.dtype == np.float32:
        return np.asarray(Image.fromarray(arr, mode="F").resize((width, height), mode))
    return np.array(Image.fromarray(arr).resize((width, height), mode))


def square(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Pad to a centred square with zeros, then resize to size x size."""
    h, w = arr.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = np.zeros((side, side, *arr.shape[2:]), dtype=arr.dtype)
    padded[top : top + h, left : left + w] = arr
    if side == size:
        return padded
    return _resize(padded, size, size, nearest)


def to_native(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Undo `square` for a probability map: resize back to the square side and crop."""
    h, w = shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    if prob.shape[0] != side:
        prob = _resize(prob.astype(np.float32), side, side, nearest=False)
    return np.clip(prob[top : top + h, left : left + w], 0.0, 1.0)


@dataclass(frozen=True)
class Frame:
    """A native (H, W) image scaled to `scaled` (H, W), seen through the `size` square whose
    top-left corner lies at (`top`, `left`) of the scaled image (negative: padding)."""

    native: tuple[int, int]
    scaled: tuple[int, int]
    top: int
    left: int
    size: int


def fov_frame(fov: np.ndarray, size: int, fov_diameter: int, where: str = "FOV mask") -> Frame:
    """The frame that makes the FOV's bounding box `fov_diameter` px wide, centred."""
    cols, rows = np.flatnonzero(fov.any(axis=0)), np.flatnonzero(fov.any(axis=1))
    if not len(cols):
        raise DataError(
            f"{where}: the FOV mask is empty, so data.fov_diameter cannot scale the image; "
            "fix the mask (or remove fov_path to derive it) or unset data.fov_diameter"
        )
    h, w = fov.shape
    scale = fov_diameter / (cols[-1] - cols[0] + 1)
    scaled = (max(1, round(h * scale)), max(1, round(w * scale)))
    cy = (rows[0] + rows[-1] + 1) / 2 * scaled[0] / h
    cx = (cols[0] + cols[-1] + 1) / 2 * scaled[1] / w
    return Frame((h, w), scaled, round(cy - size / 2), round(cx - size / 2), size)


def _overlap(start: int, length: int, size: int) -> tuple[slice, slice]:
    """Slices of the scaled image and of the square where the square at `start` covers it."""
    lo, hi = max(start, 0), min(start + size, length)
    hi = max(hi, lo)
    return slice(lo, hi), slice(lo - start, hi - start)


def into_frame(arr: np.ndarray, frame: Frame, nearest: bool) -> np.ndarray:
    """A native image or mask as the network sees it: scaled, then the frame's square."""
    scaled = _resize(arr, frame.scaled[1], frame.scaled[0], nearest)
    out = np.zeros((frame.size, frame.size, *arr.shape[2:]), dtype=arr.dtype)
    (ys, yo), (xs, xo) = (
        _overlap(frame.top, frame.scaled[0], frame.size),
        _overlap(frame.left, frame.scaled[1], frame.size),
    )
    out[yo, xo] = scaled[ys, xs]
    return out


def from_frame(prob: np.ndarray, frame: Frame) -> np.ndarray:
    """Undo `into_frame` for a probability map: 0 where the square did not reach."""
    canvas = np.zeros(frame.scaled, np.float32)
    (ys, yo), (xs, xo) = (
        _overlap(frame.top, frame.scaled[0], frame.size),
        _overlap(frame.left, frame.scaled[1], frame.size),
    )
    canvas[ys, xs] = prob[yo, xo]
    native = _resize(canvas, frame.native[1], frame.native[0], nearest=False)
    return np.clip(native, 0.0, 1.0)


def back_to_native(
    prob: np.ndarray, fov: np.ndarray, fov_diameter: int | None, where: str = "FOV mask"
) -> np.ndarray:
    """A probability map at the network's size mapped back to the native image (whose FOV
    mask is `fov`), under either framing."""
    if fov_diameter is None:
        return to_native(prob, fov.shape)
    return from_frame(prob, fov_frame(fov, prob.shape[0], fov_diameter, where))
