"""Field-of-view crop, square padding and resize, stored once per resolution in an image cache.

Every source image is decoded once (JPEGs at reduced size when that still leaves enough
pixels), its circular field of view (FOV) is found, the black border is cropped, the crop is
centred in a black square and resized to the target resolution. The result is stored as an
uncompressed `.npy` array so that training reads it with a memory copy, not a decode.

Cache layout (`<cache_root>/<R>px-<key>/`):
    settings.json   the preprocessing settings; `key` is a hash of them, so changing any
                    setting that affects pixels gives a new directory, never stale images
    index.csv       one row per source file: its size and mtime when cached, the square crop
                    box in source pixels (to map masks or CAMs back), and the array file
    arrays/*.npy    RxRx3 uint8 images, named by a hash of the source path
    errors.csv      files that could not be cached and why (rewritten on every build)

Rebuilding is incremental: a source whose path, size and modification time match its index
row is skipped; new or changed files are (re)processed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from fundusfm.config.core import PreprocessConfig, dump_config
from fundusfm.data.decode import open_image, to_rgb_array
from fundusfm.data.manifest import Manifest, load_manifest
from fundusfm.errors import DataError, ImageDecodeError, NoFieldOfView
from fundusfm.io import read_json, value_sha256, write_npy, write_text_atomic

# 2: the FOV box is the largest bright region, at least FOV_MARGIN above the background
CACHE_FORMAT = 2
# The FOV rule that crops are made with (2: `fov_mask`, absolute margin + largest region);
# bundles record it (`preprocessing.fov_rule`). Raise it, and CACHE_FORMAT, when the rule changes.
FOV_RULE = 2
INDEX_COLUMNS = [
    "source",
    "size",
    "mtime_ns",
    "file",
    "box_x",
    "box_y",
    "box_side",
    "width",
    "height",
]
_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
}


# Images with a shorter side cannot hold a field of view worth finding (a 1x1 "image").
MIN_SIDE = 16


def check_min_side(rgb: np.ndarray) -> None:
    """Refuse an image too small to be a fundus photograph (the one rule for every command)."""
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise NoFieldOfView(
            f"image is only {w}x{h} pixels, too small to hold a field of view "
            f"(at least {MIN_SIDE} a side)"
        )


def cache_key(cfg: PreprocessConfig) -> str:
    """Hash of every setting that changes the cached pixels (not of `workers`)."""
    settings = cfg.model_dump(exclude={"workers"})
    settings["format"] = CACHE_FORMAT
    return value_sha256(settings)[:12]


def cache_dir(cache_root: Path, cfg: PreprocessConfig) -> Path:
    return Path(cache_root) / f"{cfg.resolution}px-{cache_key(cfg)}"


def _longest_run(flags: np.ndarray) -> tuple[int, int] | None:
    """First and last index of the longest run of True values (None when there is none)."""
    idx = np.flatnonzero(flags)
    if len(idx) == 0:
        return None
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(idx) - 1]])
    k = int(np.argmax(ends - starts))
    return int(idx[starts[k]]), int(idx[ends[k]])


# Sensor and JPEG noise in a photograph's black border stays within a few grey levels: a pixel
# must lie this far above the background level to be field of view, however dim the image is
# (a share of the contrast alone turns the noise of a dark photograph into FOV).
FOV_MARGIN = 4.0


def _opened(mask: np.ndarray) -> np.ndarray:
    """Binary opening with a 3x3 cross (removes single bright pixels), by shifted copies.

    Away from the frame's edge the same as scipy.ndimage.binary_opening, and ten times faster;
    outside the frame counts as bright, so a FOV cut off by the frame keeps its edge rows.
    """
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    out = core.copy()
    out[1:] |= core[:-1]
    out[:-1] |= core[1:]
    out[:, 1:] |= core[:, :-1]
    out[:, :-1] |= core[:, 1:]
    return out


def _largest_region(bright: np.ndarray) -> np.ndarray:
    """The largest connected region of a bright mask, single bright pixels removed first."""
    labels, n = ndimage.label(_opened(bright))
    if n == 0:
        raise NoFieldOfView("no field of view found: no region is bright enough")
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


def fov_mask(value: np.ndarray, threshold: float) -> np.ndarray:
    """The field of view of a strongest-channel image: its largest bright region.

    The one FOV rule of the package (the crop box, and the FOV masks derived for vessel data).
    The background level is the 1st percentile; a pixel is bright when it lies `threshold` of
    the way from there to the FOV's 99th percentile, and at least FOV_MARGIN grey levels above
    the background. The largest connected bright region is the FOV, so a text label or a logo
    apart from it never counts. Holes (dark vessels, lesions) are not filled.
    """
    low, top = np.percentile(value, [1, 99])
    if top < 8 or top - low < 8:
        raise NoFieldOfView("no field of view found: the image is (nearly) black or flat")
    # First the region above the noise alone; its own 99th percentile then sets the contrast,
    # so that a white label (which may hold 1% of a frame) cannot raise the level of a dim FOV.
    top = np.percentile(value[_largest_region(value > low + FOV_MARGIN)], 99)
    return _largest_region(value > low + max(threshold * (top - low), FOV_MARGIN))


def fov_box(rgb: np.ndarray, threshold: float, min_fraction: float) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the field of view (`fov_mask`), robust to stray pixels.

    A row or column belongs to the FOV when at least `min_fraction` of it lies in the FOV
    region, and the box spans the longest unbroken run of such rows and columns (so a thin
    streak joined to the FOV does not stretch the box). Works on a subsampled copy: the box
    only needs to be accurate to a pixel or two.
    """
    check_min_side(rgb)
    h, w = rgb.shape[:2]
    step = max(1, min(h, w) // 384)
    region = fov_mask(rgb[::step, ::step].max(axis=2), threshold)
    rows = _longest_run(region.mean(axis=1) >= min_fraction)
    cols = _longest_run(region.mean(axis=0) >= min_fraction)
    if rows is None or cols is None:
        raise NoFieldOfView("no field of view found: no region is bright enough")
    return (
        cols[0] * step,
        rows[0] * step,
        min(w, (cols[1] + 1) * step),
        min(h, (rows[1] + 1) * step),
    )


def square_box(box: tuple[int, int, int, int], margin: float) -> tuple[float, float, float]:
    """The square (x, y, side) centred on `box`, large enough to hold it plus a margin."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    return (x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2, side


def crop_resize(rgb: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, tuple]:
    """Crop a decoded image to its FOV, pad to a square and resize; also return (x, y, side)."""
    x, y, side = square_box(fov_box(rgb, cfg.fov_threshold, cfg.fov_min_fraction), cfg.margin)
    crop = Image.fromarray(rgb).crop((round(x), round(y), round(x + side), round(y + side)))
    out = crop.resize(
        (cfg.resolution, cfg.resolution), _RESAMPLE[cfg.interpolation], reducing_gap=3.0
    )
    return np.array(out, dtype=np.uint8), (x, y, side)


def decode_for(path: Path, cfg: PreprocessConfig) -> tuple[np.ndarray, float]:
    """Decode at the size preprocessing needs (JPEG draft); returns RGB and the scale to full."""
    img = open_image(path, draft_size=int(cfg.resolution * 1.25) if cfg.jpeg_draft else None)
    with Image.open(path) as probe:  # size before any draft reduction (header only)
        full_side = max(probe.size)
    return to_rgb_array(img), full_side / max(img.size)  # scale > 1 after a reduced decode


def preprocess_image(path: Path, cfg: PreprocessConfig) -> tuple[np.ndarray, dict]:
    """Decode, crop to the FOV, pad to a square and resize one file; also return the crop box.

    The box is in the source file's own pixel coordinates (after EXIF rotation), so masks of
    the same image can be cropped identically.
    """
    rgb, scale = decode_for(path, cfg)
    out, (x, y, side) = crop_resize(rgb, cfg)
    info = {
        "box_x": x * scale,
        "box_y": y * scale,
        "box_side": side * scale,
        "width": rgb.shape[1] * scale,
        "height": rgb.shape[0] * scale,
    }
    return out, info


def _array_name(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:24] + ".npy"


class ImageCache:
    """Read access to one built cache directory."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        settings = self.dir / "settings.json"
        if not settings.is_file():
            raise FileNotFoundError(
                f"{self.dir} is not an image cache (no settings.json); run `fundusfm preprocess`"
            )
        self.settings = read_json(settings)
        index = self.dir / "index.csv"
        table = pd.read_csv(index) if index.is_file() else pd.DataFrame(columns=INDEX_COLUMNS)
        self.index: dict[str, dict] = {r["source"]: r for r in table.to_dict("records")}

    @property
    def resolution(self) -> int:
        return int(self.settings["resolution"])

    def is_fresh(self, source: Path) -> bool:
        """True when `source` is cached and unchanged since (same size and mtime)."""
        row = self.index.get(str(source))
        if row is None or not (self.dir / "arrays" / row["file"]).is_file():
            return False
        st = source.stat()
        return int(row["size"]) == st.st_size and int(row["mtime_ns"]) == st.st_mtime_ns

    def path_of(self, source: Path) -> Path:
        row = self.index.get(str(source))
        if row is None:
            raise DataError(f"{source} is not in the cache {self.dir}; run `fundusfm preprocess`")
        return self.dir / "arrays" / row["file"]

    def read(self, source: Path) -> np.ndarray:
        """The cached RxRx3 uint8 image of a source file."""
        return np.load(self.path_of(source))


@dataclass
class BuildReport:
    directory: Path
    built: int = 0
    skipped: int = 0
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # image_id, path, reason
    seconds: float = 0.0


def _write_index(directory: Path, index: dict[str, dict]) -> None:
    table = pd.DataFrame(list(index.values()), columns=INDEX_COLUMNS)
    write_text_atomic(directory / "index.csv", table.to_csv(index=False))


def build_cache(
    manifest: Manifest, cfg: PreprocessConfig, cache_root: Path, progress: bool = True
) -> BuildReport:
    """Bring the cache for `cfg` up to date with every image in the manifest."""
    directory = cache_dir(cache_root, cfg)
    (directory / "arrays").mkdir(parents=True, exist_ok=True)
    settings = {**cfg.model_dump(exclude={"workers"}), "format": CACHE_FORMAT}
    if not (directory / "settings.json").is_file():
        write_text_atomic(directory / "settings.json", json.dumps(settings, indent=2))
    cache = ImageCache(directory)
    report = BuildReport(directory=directory)
    manifest.require("image_id", "path")
    todo: list[tuple[str, Path]] = []
    queued: set[Path] = set()  # two rows may name one file: process it once
    for iid, rel in zip(manifest.table["image_id"], manifest.table["path"], strict=True):
        source = manifest.image_path(rel).resolve()
        if not source.is_file():
            report.errors.append((iid, str(source), "file not found"))
        elif cache.is_fresh(source) or source in queued:
            report.skipped += 1
        else:
            todo.append((iid, source))
            queued.add(source)

    def work(item: tuple[str, Path]):
        iid, source = item
        st = source.stat()  # before decoding: a file changed meanwhile looks stale next time
        try:
            arr, info = preprocess_image(source, cfg)
        except ImageDecodeError as exc:
            return iid, source, None, str(exc)
        name = _array_name(str(source))
        write_npy(directory / "arrays" / name, arr)
        row = {
            "source": str(source),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "file": name,
            **info,
        }
        return iid, source, row, None

    start = last_save = time.perf_counter()
    workers = cfg.workers or os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        results = pool.map(work, todo)
        bar = tqdm(
            results,
            total=len(todo),
            desc=f"cache {cfg.resolution}px",
            unit="img",
            disable=not progress,
        )
        for iid, source, row, error in bar:
            if error:
                report.errors.append((iid, str(source), error))
                continue
            cache.index[str(source)] = row
            report.built += 1
            if time.perf_counter() - last_save > 30:  # keep finished work if interrupted
                _write_index(directory, cache.index)
                last_save = time.perf_counter()
    finally:  # on Ctrl-C or a disk error: stop queued work, keep the index of what is done
        pool.shutdown(wait=True, cancel_futures=True)
        report.seconds = time.perf_counter() - start
        if report.built or not (directory / "index.csv").is_file():
            _write_index(directory, cache.index)
    errors = pd.DataFrame(report.errors, columns=["image_id", "path", "reason"])
    write_text_atomic(directory / "errors.csv", errors.to_csv(index=False))
    return report


def open_cache(manifest: Manifest, cfg: PreprocessConfig, cache_root: Path) -> ImageCache:
    """The cache for these settings; fails with a clear message if images are missing or stale."""
    cache = ImageCache(cache_dir(cache_root, cfg))
    stale = [
        rel
        for rel in manifest.table["path"]
        if not cache.is_fresh(manifest.image_path(rel).resolve())
    ]
    if stale:
        raise FileNotFoundError(
            f"{len(stale)} images are missing or out of date in {cache.dir} (first: {stale[0]}); "
            f"run `fundusfm preprocess {manifest.path} --resolution {cfg.resolution}`"
        )
    return cache


def preprocess_manifest(
    manifest: Path, cfg: PreprocessConfig, root: Path | None = None, progress: bool = True
) -> BuildReport:
    """`fundusfm preprocess`: the cache of a manifest's images (default root: cache/ beside
    the manifest), with the settings it was built with saved in it as config.yaml."""
    result = build_cache(
        load_manifest(manifest), cfg, root or Path(manifest).parent / "cache", progress
    )
    dump_config(cfg, result.directory / "config.yaml")
    return result
