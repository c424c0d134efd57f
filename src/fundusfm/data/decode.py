"""Decode any supported image file into an 8-bit RGB array, the one way the project reads images.

Handles JPEG, PNG, TIFF, BMP and GIF (first frame) in every mode Pillow produces:
grayscale, 1-bit, palette (with or without transparency), RGBA/LA (composited on black,
the colour outside a fundus field of view), CMYK, YCbCr, LAB, and 16/32-bit integer or
float images, which are scaled from their full bit depth to 0-255 rather than clipped.
EXIF orientation is applied so that a rotated camera file comes out upright.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fundusfm.errors import ImageDecodeError

SUPPORTED_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".webp")

# Refuse images that would take more than this many pixels to decode (decompression bombs).
# Checked from the header, before any pixel is decoded. Pillow's own global limit is left as is.
MAX_PIXELS = 150_000_000


def _bits_per_sample(img: Image.Image) -> int | None:
    """Bit depth declared by the file (TIFF tag 258), when the format says it."""
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return None


def _to_uint8(arr: np.ndarray, mode: str, bits: int | None) -> np.ndarray:
    """Scale a high-bit-depth array to 0-255 by its declared range, never by its own pixels.

    16-bit modes and 32-bit integer images ("I", how Pillow opens 16-bit PNG and TIFF
    greyscale) are scaled from 0-65535 unless the file declares another bit depth (TIFF).
    Floating-point images are taken to lie in 0-1. Values outside the range are clipped.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if mode == "F" or np.issubdtype(arr.dtype, np.floating):
        top = 1.0
    elif bits is not None and bits <= 32:
        top = float(2**bits - 1)
    else:
        top = 65535.0
    scaled = np.nan_to_num(arr.astype(np.float64)) * (255.0 / top)
    return np.clip(np.floor(scaled), 0, 255).astype(np.uint8)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to an HxWx3 uint8 RGB array."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        arr = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        rgb = arr[..., :3] * arr[..., 3:4] // 255  # composite on black
        return rgb.astype(np.uint8)
    if mode in ("RGB",):
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "1", "L"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    # high bit depth, single channel (I;16*, I, F) or unusual multi-band modes
    arr = _to_uint8(np.asarray(img), mode, _bits_per_sample(img))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] >= 3:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def open_image(path: Path, draft_size: int | None = None) -> Image.Image:
    """Open, fully decode and orient an image; `draft_size` lets JPEGs decode at reduced size.

    With `draft_size`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides at least `draft_size` pixels, which is several times faster for large photos.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise ImageDecodeError(
                f"image claims {img.width}x{img.height} pixels, over the "
                f"{MAX_PIXELS:,}-pixel safety limit (possible decompression bomb)"
            )
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError("file not found") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not a recognised image format (JPEG/PNG/TIFF/BMP/GIF)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb refused ({exc})") from exc
    except OSError as exc:
        raise ImageDecodeError(f"cannot decode ({exc}); the file may be truncated") from exc
    except (ValueError, SyntaxError, MemoryError) as exc:
        raise ImageDecodeError(f"cannot decode ({exc})") from exc


def read_rgb(path: Path, draft_size: int | None = None) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array (see module docstring)."""
    img = open_image(path, draft_size=draft_size)
    try:
        return to_rgb_array(img)
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"cannot convert mode {img.mode!r} to RGB ({exc})") from exc


def _bright(value: np.ndarray) -> np.ndarray:
    """8-bit intensities -> mask: above half the brightest value (0/1 masks: any non-zero).

    Masks saved lossily or with near-black palette entries (DRIVE's second-observer GIFs
    colour index 0 as (4, 2, 4)) are not strictly 0 / 255; half the maximum separates them.
    """
    top = int(value.max()) if value.size else 0
    return value > (top / 2 if top > 1 else 0)


def read_mask(path: Path) -> np.ndarray:
    """Read a mask image (vessels, FOV, lesion) as a boolean HxW array.

    8-bit masks (grey, colour or palette, judged by their colours, not their index numbers)
    are thresholded at half their brightest value, so JPEG noise and near-black palette
    colours stay outside; 0/1 masks count any non-zero pixel. 1-bit, float and 16-bit masks
    count any non-zero value. Where an image has an alpha channel, transparent pixels are
    outside the mask, and a mask drawn only in the alpha channel (colour all black) is read
    from the alpha channel.
    """
    img = open_image(path)
    try:
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")
        if img.mode in ("1", "I", "F") or img.mode.startswith("I;16"):
            return np.asarray(img) != 0
        if img.mode == "L":
            return _bright(np.asarray(img))
        if img.mode in ("LA", "RGBA", "La", "RGBa"):
            arr = np.asarray(img.convert("RGBA"))
            colour, alpha = _bright(arr[..., :3].max(axis=2)), arr[..., 3] > 0
            return alpha if not colour.any() else colour & alpha
        return _bright(np.asarray(img.convert("RGB")).max(axis=2))
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"cannot read mode {img.mode!r} as a mask ({exc})") from exc
