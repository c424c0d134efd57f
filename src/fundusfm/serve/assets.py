"""The page's files (page.html, page.js, page.css: plain files, no build step), its
colours and its icon, and the OpenAPI descriptions of the request bodies.

The colours are the screening report's (`tones_css`): the `.pos{--c:#c62828}`-style rules of
`screen.report_page.TONES`, served as /static/tones.css, so the page and report.html colour
a decision and a status alike, from one place.
"""

from __future__ import annotations

from importlib.resources import files

from fundusfm.screen.report_page import TONE_ROOT, TONE_RULES
from fundusfm.serve.upload import FIELD

ASSETS = {"page.js": "text/javascript", "page.css": "text/css", "tones.css": "text/css"}
# The page loads nothing from elsewhere; overlays arrive as data: URLs
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:",
    "X-Content-Type-Options": "nosniff",
}
FAVICON = (  # an eye in the report's colours: the browser asks for one on every page
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<circle cx="8" cy="8" r="7.5" fill="#c62828"/><circle cx="8" cy="8" r="3" fill="#fff"/>'
    "</svg>"
)


def tones_css() -> str:
    """The report's colour rules (`.pos{--c:...}`, `report_page.TONES`), and each as a
    variable of :root (`--pos`), for what is coloured by another class than its own."""
    said = "/* the screening report's colours (screen.report_page.TONES) */"
    return f"{said}\n{TONE_ROOT}\n{TONE_RULES}\n"


def read_assets() -> dict[str, str]:
    """page.html and the files of ASSETS, by name."""
    here = files("fundusfm.serve")
    found = {n: (here / n).read_text("utf-8") for n in ("page.html", "page.js", "page.css")}
    return {**found, "tones.css": tones_css()}


def _body(kind: str, schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {kind: {"schema": schema}}}}


UPLOAD_BODY = _body(
    "multipart/form-data",
    {
        "type": "object",
        "properties": {FIELD: {"type": "string", "format": "binary"}},
        "required": [FIELD],
    },
)
ROWS_BODY = _body(
    "application/json",
    {
        "type": "object",
        "properties": {"rows": {"type": "array", "items": {"type": "object"}}},
        "required": ["rows"],
    },
)
REFUSALS = {
    400: {"description": "not a multipart form, no `file` field, or a bad query"},
    413: {"description": "the upload is over max_upload_bytes, or the image over max_pixels"},
    415: {"description": "not an image (its name's suffix, content type and first bytes)"},
    422: {"description": "unreadable: truncated, empty, not an image, decompression bomb"},
    503: {"description": "too many uploads waiting; retry later"},
}
