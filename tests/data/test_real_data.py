"""Checks on the real public data in ../shared/data; skipped where that folder is absent."""

import numpy as np
import pytest

from fundusfm.config.core import PreprocessConfig
from fundusfm.data.decode import read_mask, read_rgb
from fundusfm.data.preprocess import fov_box, preprocess_image
from tests.conftest import SHARED_DATA

DRIVE = SHARED_DATA / "DRIVE"
pytestmark = pytest.mark.skipif(not DRIVE.is_dir(), reason=f"real data not found at {DRIVE}")


def test_drive_fov_box_matches_official_mask():
    for image in sorted((DRIVE / "training" / "images").glob("*.tif"))[:5]:
        mask = read_mask(DRIVE / "training" / "mask" / image.name.replace(".tif", "_mask.gif"))
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x0, y0, x1, y1 = fov_box(read_rgb(image), 0.06, 0.02)
        assert abs(x0 - cols[0]) <= 6 and abs(x1 - (cols[-1] + 1)) <= 6, image.name
        assert abs(y0 - rows[0]) <= 6 and abs(y1 - (rows[-1] + 1)) <= 6, image.name


def test_drive_preprocessed_image_is_square_and_filled():
    image = next((DRIVE / "test" / "images").glob("*.tif"))
    arr, info = preprocess_image(image, PreprocessConfig(resolution=128))
    assert arr.shape == (128, 128, 3)
    assert arr[60:68, 2].max() > 30 and arr[60:68, -3].max() > 30  # FOV reaches both sides
    assert 500 < info["box_side"] < 600
