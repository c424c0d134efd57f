"""An upload whose name has no image suffix (a pasted "blob", "image.php") is taken by its
part's Content-Type or its bytes' format; a real non-image is still 415, naming what was
seen."""

from __future__ import annotations

from io import BytesIO

import pytest
from PIL import Image

from fundusfm.data.decode import SUPPORTED_SUFFIXES
from fundusfm.serve.sniff import FORMATS, IMAGE_TYPES
from tests.serve.conftest import good_photo, post, same

PREDICTED = ["p_normal", "p_abnormal", "decision", "fov_fraction", "focus"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("blob", "image/png"),  # a browser's pasted image
        ("image.php", "image/png"),  # a name that lies, a type that does not
        ("photo", "application/octet-stream"),  # no type either: the bytes are a PNG's
        ("scan.dat", "IMAGE/PNG; charset=binary"),  # type parameters and case
    ],
)
def test_an_image_without_an_image_suffix_is_scored_as_the_same_file_named_png(served, name, kind):
    row = post(served.client, name, good_photo(served), kind=kind).json()
    expected = served.table.loc["good.png"]
    assert row["status"] == "scored" and row["file"] == name
    for column in PREDICTED:
        assert same(expected[column], row[column]), column


def test_a_jpeg_typed_upload_named_blob_is_scored(served):
    jpeg = (served.folder / "cmyk.jpg").read_bytes()
    row = post(served.client, "blob", jpeg, kind="image/jpeg").json()
    assert row["status"] == "scored"
    assert same(served.table.loc["cmyk.jpg", "p_abnormal"], row["p_abnormal"])


def test_non_images_are_still_415_naming_the_type_and_bytes_seen(served):
    text = post(served.client, "notes.php", b"<?php echo 1; ?>", kind="text/x-php")
    assert text.status_code == 415
    assert text.json() == {
        "error": "unsupported",
        "detail": "not an image format fundusfm reads (.php); nor are its content type "
        "(text/x-php) and its first bytes an image's",
        "file": "notes.php",
    }
    icon = BytesIO()
    Image.new("RGB", (16, 16)).save(icon, format="ICO")  # an image, not one fundusfm reads
    answer = post(served.client, "favicon", icon.getvalue())
    assert answer.status_code == 415 and "an image in the ICO format" in answer.json()["detail"]


def test_an_image_type_with_bytes_that_are_not_an_image_is_unreadable(served):
    answer = post(served.client, "blob", b"not really", kind="image/png")
    assert answer.status_code == 422 and "not a recognised image format" in answer.json()["detail"]


def test_every_type_and_format_maps_to_a_suffix_predict_reads():
    assert set(IMAGE_TYPES.values()) | set(FORMATS.values()) <= set(SUPPORTED_SUFFIXES)
    assert set(FORMATS.values()) == set(SUPPORTED_SUFFIXES) - {".jpeg", ".tiff"}
