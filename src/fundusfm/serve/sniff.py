"""What an upload is, before any pixel of it is decoded: its format and size from its header.

`predict` judges a file by its name's suffix. A browser's upload may have no such name (a
pasted image is a "blob"), so serve also takes the form part's Content-Type (`IMAGE_TYPES`)
or, failing that, the format Pillow reads in its first bytes (`FORMATS`), mapped to a
suffix `predict` reads. Pillow's `Image.open` reads only the header: the size is known
before decoding, so an image over `max_pixels` is refused without being decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image

from fundusfm.data.decode import MAX_PIXELS, SUPPORTED_SUFFIXES
from fundusfm.data.manifest import printable
from fundusfm.screen.predict import unsupported_reason
from fundusfm.serve.upload import Upload, UploadRefused

IMAGE_TYPES = {  # Content-Type -> a suffix of SUPPORTED_SUFFIXES
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/pjpeg": ".jpg",
    "image/png": ".png",
    "image/x-png": ".png",
    "image/tiff": ".tif",
    "image/bmp": ".bmp",
    "image/x-bmp": ".bmp",
    "image/x-ms-bmp": ".bmp",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/x-portable-pixmap": ".ppm",
}
FORMATS = {  # Pillow's format name -> a suffix of SUPPORTED_SUFFIXES
    "JPEG": ".jpg",
    "PNG": ".png",
    "TIFF": ".tif",
    "BMP": ".bmp",
    "GIF": ".gif",
    "PPM": ".ppm",
    "WEBP": ".webp",
}


@dataclass
class Header:
    format: str | None  # Pillow's name of the format, None when it cannot tell
    size: tuple[int, int] | None  # width, height as the header says


def header(data: bytes) -> Header:
    """The format and size the bytes' header declares (nothing is decoded)."""
    try:
        with Image.open(BytesIO(data)) as img:
            return Header(img.format, img.size)
    except Exception:  # not an image Pillow knows, or one it refuses: the decoder says why
        return Header(None, None)


def image_suffix(upload: Upload, head: Header) -> str:
    """The suffix the upload is decoded under: its name's, else its content type's, else its
    bytes' format's; UploadRefused (415) naming what was seen when none is an image's."""
    suffix = Path(upload.name).suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return suffix
    found = IMAGE_TYPES.get(upload.content_type) or FORMATS.get(head.format or "")
    if found is not None:
        return found
    kind = printable(upload.content_type[:80]) or "none"
    if head.format:
        seen = f"nor is its content type ({kind}), and its bytes are an image in the"
        seen += f" {head.format} format, which fundusfm does not read either"
    else:
        seen = f"nor are its content type ({kind}) and its first bytes an image's"
    said = f"{unsupported_reason(Path(upload.name))}; {seen}"
    raise UploadRefused(415, "unsupported", said, printable(upload.name))


def check_pixels(head: Header, limit: int, name: str) -> None:
    """Refuse (413) an image whose header declares more than `limit` pixels. One over the
    decoder's own bomb limit (`MAX_PIXELS`) is left to it: `predict`'s answer, unreadable."""
    if head.size is None:
        return
    width, height = head.size
    pixels = width * height
    if limit < pixels <= MAX_PIXELS:
        raise UploadRefused(
            413,
            "too_many_pixels",
            f"the image is {width}x{height} ({pixels:,} pixels), over the {limit:,}-pixel "
            "limit (setting max_pixels); send a smaller image or raise the limit",
            name,
        )
