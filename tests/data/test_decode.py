import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundusfm.data.decode import read_mask, read_rgb
from fundusfm.errors import ImageDecodeError


def gradient(h=32, w=48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 5, y * 7, (x + y) * 2], axis=2).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_lossless_formats_round_trip(tmp_path: Path, suffix: str):
    arr = gradient()
    path = tmp_path / f"img{suffix}"
    Image.fromarray(arr).save(path)
    out = read_rgb(path)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    assert np.array_equal(out, arr)


def test_jpeg_close(tmp_path: Path):
    arr = gradient()
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=98)
    out = read_rgb(tmp_path / "a.jpg")
    assert out.shape == arr.shape
    assert np.abs(out.astype(int) - arr).mean() < 3


def test_gif_palette(tmp_path: Path):
    arr = np.zeros((20, 20, 3), np.uint8)
    arr[:, 10:] = (200, 30, 10)
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "a.gif")
    out = read_rgb(tmp_path / "a.gif")
    assert out.shape == (20, 20, 3)
    assert tuple(out[5, 15]) == (200, 30, 10)
    assert tuple(out[5, 2]) == (0, 0, 0)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path):
    Image.fromarray(gradient()[..., 0]).save(tmp_path / "g.png")
    out = read_rgb(tmp_path / "g.png")
    assert out.shape == (32, 48, 3)
    assert np.array_equal(out[..., 0], out[..., 2])
    assert np.array_equal(out[..., 0], gradient()[..., 0])


def test_rgba_composited_on_black(tmp_path: Path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = (250, 120, 60)
    rgba[:, 5:, 3] = 255  # right half opaque, left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    assert tuple(out[0, 7]) == (250, 120, 60)
    assert tuple(out[0, 2]) == (0, 0, 0)


def test_cmyk_jpeg(tmp_path: Path):
    arr = np.full((16, 16, 3), (180, 90, 40), np.uint8)
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    out = read_rgb(tmp_path / "c.jpg")
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - arr).max() < 12


def test_16bit_png_scaled_not_clipped(tmp_path: Path):
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(arr).save(tmp_path / "d.png")
    out = read_rgb(tmp_path / "d.png")
    assert out.dtype == np.uint8
    assert list(out[0, :, 0]) == [0, 3, 127, 255]


def test_exif_rotation_applied(tmp_path: Path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_rgb(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # red on top after rotation
    assert out[35, 10, 2] > 200


def test_zero_byte(tmp_path: Path):
    (tmp_path / "z.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        read_rgb(tmp_path / "z.jpg")


def test_truncated_jpeg(tmp_path: Path):
    Image.fromarray(gradient(128, 128)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        read_rgb(tmp_path / "t.jpg")


def test_html_saved_as_jpg(tmp_path: Path):
    (tmp_path / "h.jpg").write_text("<html><body>404 not found</body></html>")
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        read_rgb(tmp_path / "h.jpg")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_decompression_bomb_refused(tmp_path: Path):
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + _png_chunk(b"IEND", b"")
    )
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        read_rgb(tmp_path / "bomb.png")


def test_missing_file(tmp_path: Path):
    with pytest.raises(ImageDecodeError, match="not found"):
        read_rgb(tmp_path / "nope.png")


def test_jpeg_draft_decodes_smaller(tmp_path: Path):
    Image.fromarray(gradient(1024, 1024)).save(tmp_path / "big.jpg")
    assert read_rgb(tmp_path / "big.jpg").shape == (1024, 1024, 3)
    small = read_rgb(tmp_path / "big.jpg", draft_size=256)
    assert 256 <= small.shape[0] < 1024


def test_read_mask_palette_zero_one(tmp_path: Path):
    arr = np.zeros((8, 8), np.uint8)
    arr[2:4, 2:4] = 1
    img = Image.fromarray(arr, "L").convert("P")
    img.save(tmp_path / "m.gif")
    mask = read_mask(tmp_path / "m.gif")
    assert mask.sum() == 4 and mask[2, 2]


def test_16bit_tiff_scaled_by_declared_depth(tmp_path: Path):
    arr = np.array([[0, 257, 65535]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(arr).save(tmp_path / "d.tif")
    assert list(read_rgb(tmp_path / "d.tif")[0, :, 1]) == [0, 1, 255]


def test_float_image_scale_does_not_depend_on_its_pixels(tmp_path: Path):
    flat = np.full((4, 4), 0.5, np.float32)
    spiked = flat.copy()
    spiked[0, 0] = 1.5  # one out-of-range pixel must not darken the rest
    Image.fromarray(flat, "F").save(tmp_path / "a.tif")
    Image.fromarray(spiked, "F").save(tmp_path / "b.tif")
    assert read_rgb(tmp_path / "a.tif")[2, 2, 0] == read_rgb(tmp_path / "b.tif")[2, 2, 0] == 127
    assert read_rgb(tmp_path / "b.tif")[0, 0, 0] == 255


def test_read_mask_judges_palette_colours_alpha_and_floats(tmp_path: Path):
    inv = Image.new("P", (4, 4), 0)
    inv.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 is white, 1 is black
    inv.putpixel((0, 0), 1)
    inv.save(tmp_path / "inv.png")
    mask = read_mask(tmp_path / "inv.png")
    assert mask.sum() == 15 and not mask[0, 0]

    la = np.zeros((4, 4, 2), np.uint8)
    la[1:3, 1:3, 1] = 255  # drawn only in the alpha channel
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert read_mask(tmp_path / "la.png").sum() == 4

    Image.fromarray(np.full((4, 4), 0.4, np.float32), "F").save(tmp_path / "f.tif")
    assert read_mask(tmp_path / "f.tif").all()


def test_read_mask_ignores_near_black_palette_and_jpeg_noise(tmp_path: Path):
    """DRIVE's second-observer GIFs colour index 0 as (4, 2, 4): that is background."""
    arr = np.zeros((8, 8), np.uint8)
    arr[2:4, 2:4] = 1
    img = Image.fromarray(arr, "P")
    img.putpalette([4, 2, 4, 252, 254, 252] + [0] * 762)
    img.save(tmp_path / "m.gif")
    mask = read_mask(tmp_path / "m.gif")
    assert mask.sum() == 4 and mask[2, 2]

    noisy = np.where(arr > 0, 250, 6).astype(np.uint8)
    Image.fromarray(noisy, "L").save(tmp_path / "noisy.png")
    assert read_mask(tmp_path / "noisy.png").sum() == 4
