import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from fundusfm.config.core import PreprocessConfig
from fundusfm.data.manifest import DatasetSpec, load_manifest, save_manifest
from fundusfm.data.preprocess import (
    ImageCache,
    build_cache,
    cache_key,
    fov_box,
    open_cache,
    preprocess_image,
)
from tests.fakes import camera_frame, dimmed


def fundus_like(h: int, w: int, cx: float, cy: float, r: float, seed: int = 0) -> np.ndarray:
    """Orange disc of radius r on black, with noise, like a fundus photo's field of view."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    img = np.zeros((h, w, 3), np.float32)
    img[inside] = (200, 100, 50)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_set(root: Path, images: dict[str, np.ndarray], suffix: str = ".png") -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for iid, arr in images.items():
        Image.fromarray(arr).save(root / "img" / f"{iid}{suffix}", quality=95)
        rows.append(
            {"image_id": iid, "path": f"img/{iid}{suffix}", "patient_id": iid, "eye": "unknown"}
        )
    return save_manifest(pd.DataFrame(rows), DatasetSpec(), root / "manifest.csv")


def test_fov_box_finds_circle():
    img = fundus_like(300, 400, cx=210, cy=140, r=120)
    x0, y0, x1, y1 = fov_box(img, 0.06, 0.02)
    assert abs(x0 - 90) <= 3 and abs(x1 - 330) <= 3
    assert abs(y0 - 20) <= 3 and abs(y1 - 260) <= 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fov_box_of_dim_noisy_copies_is_the_same(seed: int):
    # peak ~11 grey levels at x0.05: a share of the contrast alone would call the noise FOV
    frame, truth = camera_frame(seed)
    side = truth[2] - truth[0]
    for factor in (1.0, 0.15, 0.05):
        box = fov_box(dimmed(frame, factor, seed) if factor < 1 else frame, 0.06, 0.02)
        assert max(abs(a - b) for a, b in zip(box, truth, strict=True)) <= 0.02 * side, factor


def test_text_label_level_with_the_fov_does_not_stretch_the_box():
    frame, truth = camera_frame(3)
    clean = fov_box(frame, 0.06, 0.02)
    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    _, y0, x1, y1 = truth
    # burnt-in labels in the black bands, their rows overlapping the FOV's top and bottom rows
    for left, top in ((3, y0 - 10), (x1 + 3, y1 - 6)):
        draw.rectangle((left, top, left + 36, top + 15), fill=(255, 255, 255))
        draw.text((left + 2, top + 2), "OD 03", fill=(0, 0, 0))
    box = fov_box(np.asarray(img), 0.06, 0.02)
    assert max(abs(a - b) for a, b in zip(box, clean, strict=True)) <= 1
    assert max(abs(a - b) for a, b in zip(box, truth, strict=True)) <= 2


def test_fov_box_of_a_frame_without_background_is_the_frame():
    # a crop inside the FOV has no background: no threshold may split it into two halves
    frame, (x0, y0, x1, y1) = camera_frame(4)
    cx, cy, r = (x0 + x1) // 2, (y0 + y1) // 2, (x1 - x0) // 3
    crop = frame[cy - r : cy + r, cx - r : cx + r]
    assert fov_box(crop, 0.06, 0.02) == (0, 0, 2 * r, 2 * r)


def test_fov_box_rejects_black_image():
    with pytest.raises(ValueError, match="no field of view"):
        fov_box(np.zeros((50, 50, 3), np.uint8), 0.06, 0.02)


def test_crop_pads_square_and_fills(tmp_path: Path):
    m = make_set(tmp_path, {"a": fundus_like(300, 400, 210, 140, 120)})
    arr, info = preprocess_image(tmp_path / "img" / "a.png", PreprocessConfig(resolution=64))
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    bright = arr.max(axis=2) > 60
    assert bright[0, 28:36].any() and bright[-1, 28:36].any()  # circle touches all sides
    assert bright[28:36, 0].any() and bright[28:36, -1].any()
    assert not bright[0, 0] and not bright[-1, -1]  # corners stay black
    assert abs(info["box_x"] - 90) <= 3 and abs(info["box_side"] - 240) <= 4
    assert m.exists()


def test_clipped_circle_is_padded_not_stretched(tmp_path: Path):
    # a FOV cut off at top and bottom (common in 4:3 cameras) must keep its aspect ratio
    make_set(tmp_path, {"a": fundus_like(200, 300, 150, 100, 130)})
    arr, info = preprocess_image(tmp_path / "img" / "a.png", PreprocessConfig(resolution=60))
    bright = arr.max(axis=2) > 60
    rows = np.flatnonzero(bright.any(axis=1))
    assert rows[0] > 3 and rows[-1] < 56  # black bands above and below
    assert abs(info["box_side"] - 260) <= 4


def test_jpeg_draft_keeps_box_in_source_pixels(tmp_path: Path):
    make_set(tmp_path, {"big": fundus_like(1600, 2000, 1000, 800, 700)}, suffix=".jpg")
    path = tmp_path / "img" / "big.jpg"
    fast, info = preprocess_image(path, PreprocessConfig(resolution=256, jpeg_draft=True))
    slow, info_full = preprocess_image(path, PreprocessConfig(resolution=256, jpeg_draft=False))
    assert abs(info["box_side"] - 1400) < 30 and abs(info["box_x"] - 300) < 20
    assert abs(info["box_side"] - info_full["box_side"]) < 20
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4


def test_cache_key_tracks_pixel_settings_only():
    base = PreprocessConfig(resolution=128)
    assert cache_key(base) == cache_key(PreprocessConfig(resolution=128, workers=7))
    assert cache_key(base) != cache_key(PreprocessConfig(resolution=256))
    assert cache_key(base) != cache_key(PreprocessConfig(resolution=128, margin=0.05))
    assert cache_key(base) != cache_key(PreprocessConfig(resolution=128, interpolation="bilinear"))


def test_build_is_incremental_and_reads_back(tmp_path: Path):
    images = {f"i{k}": fundus_like(120, 160, 80, 60, 55, seed=k) for k in range(4)}
    m = load_manifest(make_set(tmp_path / "data", images))
    cfg = PreprocessConfig(resolution=32, workers=2)
    first = build_cache(m, cfg, tmp_path / "cache", progress=False)
    assert (first.built, first.skipped, first.errors) == (4, 0, [])
    again = build_cache(m, cfg, tmp_path / "cache", progress=False)
    assert (again.built, again.skipped) == (0, 4)

    changed = tmp_path / "data" / "img" / "i2.png"
    Image.fromarray(fundus_like(120, 160, 80, 60, 30, seed=99)).save(changed)
    os.utime(changed, ns=(1, 1))  # a different modification time, whatever the clock says
    third = build_cache(m, cfg, tmp_path / "cache", progress=False)
    assert (third.built, third.skipped) == (1, 3)
    cache = open_cache(m, cfg, tmp_path / "cache")
    expected, _ = preprocess_image(changed.resolve(), cfg)
    assert np.array_equal(cache.read(changed.resolve()), expected)

    other = build_cache(m, PreprocessConfig(resolution=48), tmp_path / "cache", progress=False)
    assert other.built == 4 and other.directory != first.directory
    assert ImageCache(other.directory).resolution == 48


def test_failures_listed_and_others_kept(tmp_path: Path):
    images = {"good": fundus_like(80, 80, 40, 40, 35), "black": np.zeros((80, 80, 3), np.uint8)}
    m = load_manifest(make_set(tmp_path / "data", images))
    cfg = PreprocessConfig(resolution=16)
    report = build_cache(m, cfg, tmp_path / "cache", progress=False)
    assert report.built == 1
    assert [e[0] for e in report.errors] == ["black"]
    assert "no field of view" in report.errors[0][2]
    assert "black" in (report.directory / "errors.csv").read_text()
    with pytest.raises(FileNotFoundError, match="fundusfm preprocess"):
        open_cache(m, cfg, tmp_path / "cache")


def test_two_rows_one_file_built_once(tmp_path: Path):
    m_path = make_set(tmp_path / "data", {"a": fundus_like(60, 60, 30, 30, 25)})
    m = load_manifest(m_path)
    m.table = pd.concat([m.table] * 6, ignore_index=True)
    m.table["image_id"] = [f"id{i}" for i in range(6)]
    report = build_cache(
        m, PreprocessConfig(resolution=16, workers=4), tmp_path / "c", progress=False
    )
    assert (report.built, report.skipped, report.errors) == (1, 5, [])
    assert len(list(report.directory.glob("arrays/*"))) == 1  # no temporary files left


def test_file_changed_while_processing_is_rebuilt(tmp_path: Path, monkeypatch):
    import fundusfm.data.preprocess as pp

    m = load_manifest(make_set(tmp_path / "data", {"a": fundus_like(60, 60, 30, 30, 25)}))
    source = (tmp_path / "data" / "img" / "a.png").resolve()
    real = pp.preprocess_image

    def rewrite_meanwhile(path, cfg):
        out = real(path, cfg)
        Image.fromarray(fundus_like(60, 60, 30, 30, 10, seed=5)).save(source)
        os.utime(source, ns=(10**9, 10**9))
        return out

    monkeypatch.setattr(pp, "preprocess_image", rewrite_meanwhile)
    cfg = PreprocessConfig(resolution=16)
    build_cache(m, cfg, tmp_path / "c", progress=False)
    monkeypatch.setattr(pp, "preprocess_image", real)
    again = build_cache(m, cfg, tmp_path / "c", progress=False)
    assert again.built == 1


def test_interrupted_build_keeps_its_index(tmp_path: Path, monkeypatch):
    import fundusfm.data.preprocess as pp

    images = {f"i{k}": fundus_like(60, 60, 30, 30, 25, seed=k) for k in range(6)}
    m = load_manifest(make_set(tmp_path / "data", images))
    real, calls = pp.preprocess_image, []

    def interrupt_on_fourth(path, cfg):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path, cfg)

    monkeypatch.setattr(pp, "preprocess_image", interrupt_on_fourth)
    cfg = PreprocessConfig(resolution=16, workers=1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(m, cfg, tmp_path / "c", progress=False)
    monkeypatch.setattr(pp, "preprocess_image", real)
    resumed = build_cache(m, cfg, tmp_path / "c", progress=False)
    assert (resumed.built, resumed.skipped) == (3, 3)
