"""Fake fundus photographs and masks that tests across the stages draw (files and arrays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fundusfm.config.core import SynthConfig
from fundusfm.synthetic.generate import sample_patient
from fundusfm.synthetic.render import render_eye


def fundus(path: Path, size=(64, 60), seed=0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    inside = (xx - size[0] / 2) ** 2 + (yy - size[1] / 2) ** 2 < (min(size) / 2 - 3) ** 2
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[inside] = rng.integers(120, 220, (inside.sum(), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def mask(path: Path, size=(64, 60), mode="L", value=255) -> None:
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[20:30, 10:50] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr, "L")
    if mode == "P":
        img = img.convert("P")
    elif mode == "RGB":
        img = img.convert("RGB")
    img.save(path)


def camera_frame(seed: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A generated fundus photograph in a black 4:3 camera frame, and its true FOV's box."""
    cfg = SynthConfig(size=128, seed=seed)
    r = render_eye(128, sample_patient(cfg, 0)[0], cfg.camera, np.random.default_rng(seed))
    frame = np.zeros((160, 213, 3), np.uint8)
    frame[16:144, 42:170] = r.image
    ys, xs = np.nonzero(r.fov)
    return frame, (xs.min() + 42, ys.min() + 16, xs.max() + 43, ys.max() + 17)


def dimmed(rgb: np.ndarray, factor: float, seed: int = 0) -> np.ndarray:
    """The image at `factor` of its brightness, with 0-3 grey levels of noise everywhere."""
    noise = np.random.default_rng(seed).integers(0, 4, rgb.shape)
    return np.clip(np.round(rgb * factor) + noise, 0, 255).astype(np.uint8)


def drive_tree(root: Path, missing: tuple[int, ...] = ()) -> Path:
    """A DRIVE copy (DATASETS.md section 7): images 21, 22 train and 1, 2 test, with FOV
    masks (the disc) and observer-1 masks, but none for the images numbered in `missing`
    (a partial mirror)."""
    yy, xx = np.mgrid[0:60, 0:64]
    disc = ((xx - 32) ** 2 + (yy - 30) ** 2 < 27**2).astype(np.uint8) * 255
    for split, nums in (("training", [21, 22]), ("test", [1, 2])):
        for n in nums:
            fundus(root / split / "images" / f"{n:02d}_{split}.tif", seed=n)
            (root / split / "mask").mkdir(parents=True, exist_ok=True)
            Image.fromarray(disc).save(root / split / "mask" / f"{n:02d}_{split}_mask.gif")
            if n not in missing:
                mask(root / split / "1st_manual" / f"{n:02d}_manual1.gif")
    return root


def tiny_segment_config(manifest: Path, out: Path, *extra: str):
    """A ResNet-10 U-Net, one epoch at 64 px, on fold 0 of `manifest` (4 patient-grouped
    folds with validation parts, written to out/splits.csv); `extra` are more --set lines."""
    from fundusfm.config.core import SplitConfig, load_config
    from fundusfm.config.segment import SegmentConfig
    from fundusfm.data.manifest import load_manifest
    from fundusfm.data.splits import make_splits

    splits = make_splits(load_manifest(manifest), SplitConfig(folds=4, val_fraction=0.15))
    splits.to_csv(out / "splits.csv", index=False)
    sets = [
        f"data.manifest={manifest}",
        f"data.splits={out / 'splits.csv'}",
        "data.resolution=64",
        "model.arch=resnet10",  # tests/conftest.py's TINY_ARCH
        "model.init=scratch",
        "model.decoder_channels=[32, 16, 16, 8, 8]",
        "train.epochs=1",
        "train.batch_size=8",
        f"run.out={out / 'run'}",
        "run.progress=false",
    ]
    return load_config(SegmentConfig, None, [*sets, *extra])
