"""Framing vessel images by their field of view (`data.fov_diameter`) and back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fundusfm.data.manifest import load_manifest
from fundusfm.data.vessel_frame import (
    back_to_native,
    fov_frame,
    from_frame,
    into_frame,
    square,
    to_native,
)
from fundusfm.data.vessel_images import load_images, native_masks
from fundusfm.errors import ConfigError, DataError


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def width(mask: np.ndarray) -> int:
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[-1] - cols[0] + 1)


def centre(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2


@pytest.mark.parametrize("radius", [30.0, 70.0])  # FOV smaller and larger than it should be
def test_the_fov_is_scaled_to_the_diameter_and_centred(radius: float):
    fov = disc((160, 190), (75, 100), radius)  # off-centre in a non-square frame
    framed = into_frame(fov, fov_frame(fov, 64, 48), nearest=True)
    assert framed.shape == (64, 64)
    assert abs(width(framed) - 48) <= 1
    assert np.allclose(centre(framed), (32, 32), atol=1)


def test_a_prediction_maps_back_onto_the_native_pixels():
    fov = disc((150, 170), (80, 90), 60)
    yy, xx = np.mgrid[:150, :170]
    smooth = (0.5 + 0.4 * np.sin(yy / 15) * np.cos(xx / 20)).astype(np.float32)
    frame = fov_frame(fov, 160, 150)  # upsampled 1.24x: bilinear there and back is close
    back = from_frame(into_frame(smooth, frame, nearest=False), frame)
    assert back.shape == fov.shape
    assert np.abs(back - smooth)[fov].max() < 0.02
    assert back_to_native(into_frame(smooth, frame, nearest=False), fov, 150).shape == fov.shape


def test_what_the_square_crops_is_zero_at_native_size():
    fov = np.zeros((200, 100), bool)
    fov[:, 20:80] = True  # a FOV taller than wide: the square cuts its top and bottom
    frame = fov_frame(fov, 64, 60)
    back = from_frame(np.ones((64, 64), np.float32), frame)
    assert back[100, 50] == pytest.approx(1.0) and back[5, 50] == 0.0 and back[195, 50] == 0.0


def test_without_a_diameter_the_square_resize_is_kept_exactly():
    rng = np.random.default_rng(0)
    prob = rng.random((32, 32)).astype(np.float32)
    fov = np.ones((40, 56), bool)
    assert np.array_equal(back_to_native(prob, fov, None), to_native(prob, fov.shape))


def test_an_empty_fov_mask_is_refused_by_name():
    with pytest.raises(DataError, match=r"img\.png: the FOV mask is empty.*fov_diameter"):
        fov_frame(np.zeros((20, 20), bool), 32, 16, "img.png")


def test_a_fov_larger_than_the_square_is_a_config_error():
    from fundusfm.config.core import load_config
    from fundusfm.config.segment import SegmentConfig

    with pytest.raises(ConfigError, match="fov_diameter=600 is larger than resolution=576"):
        load_config(SegmentConfig, None, ["data.resolution=576", "data.fov_diameter=600"])
    assert load_config(SegmentConfig, None, []).data.fov_diameter is None


def test_loaded_images_and_masks_share_one_frame(synth_set: Path):
    manifest = load_manifest(synth_set)
    rows = np.arange(3)
    framed = load_images(manifest, rows, 64, False, fov_diameter=40)
    plain = load_images(manifest, rows, 64, False)
    for row, s, p in zip(rows, framed, plain, strict=True):
        vessel, fov = native_masks(manifest, int(row))
        frame = fov_frame(fov, 64, 40)
        assert np.array_equal(s.vessel, into_frame(vessel, frame, nearest=True))
        assert np.array_equal(s.fov, into_frame(fov, frame, nearest=True))
        assert abs(width(s.fov) - 40) <= 1 and s.image.shape == (64, 64, 3)
        assert np.array_equal(p.vessel, square(vessel, 64, nearest=True))  # unset: as before
        assert s.image[~s.fov].mean() < s.image[s.fov].mean()  # the image moved with its FOV
