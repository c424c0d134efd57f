"""One upload, one `predictions.csv` row: what `fundusfm predict` gives the same file.

The upload is first judged from its header (`sniff`): an upload whose name has no image
suffix is taken by its part's Content-Type or its bytes' format, and one whose header
declares more than `max_pixels` is refused before decoding. Its bytes are then written into
a fresh `tempfile.TemporaryDirectory` (removed when the row is made, whatever happens) and
go through `screen.predict`'s own per-file functions: `prepare_item` (decode, quality gate,
crop), `score_items` (probabilities, decision at the bundle's validated threshold, shift)
and `item_row`. Statuses become answers:
    scored, ungradable   200, the row (ungradable rows say why and carry no probabilities)
    unsupported          415, `predict`'s reason (the suffix) and what else was seen
    too many pixels      413, the image's size and the limit
    unreadable           422, `predict`'s reason (truncated, empty, not an image, bomb)
Beside predict's columns a row carries `tone`, the report's colour of it (`report_tables.
tone`: pos or neg for a scored row, else its status), and `gradcam_png` when asked for;
neither is a column of predictions.csv (`table.SHOWN_ONLY`).
The model is used by one request at a time (`Screener.model_lock`): Grad-CAM hooks the
backbone's last stage, and a forward pass of another request meanwhile would mix into its
activations; decoding and the quality gate run outside the lock, in parallel.
"""

from __future__ import annotations

import base64
import tempfile
import threading
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from fundusfm.config.serve import ServeConfig
from fundusfm.data.manifest import printable
from fundusfm.errors import WeightsError
from fundusfm.inference import scorer
from fundusfm.models.loaded import Bundle
from fundusfm.screen.predict import decision_overlays, item_row, prepare_item, score_items
from fundusfm.screen.report_tables import tone
from fundusfm.serve.sniff import check_pixels, header, image_suffix
from fundusfm.serve.upload import Upload, UploadRefused
from fundusfm.tasks.shift import shift_scorer

GRADCAM_KEY = "gradcam_png"  # base64 PNG of the overlay, only when asked for
TONE_KEY = "tone"  # the report's colour class of the row (pos, neg, ungradable)


class Screener:
    """A bundle's scorer and shift scorer, built once, and the rows of uploads."""

    def __init__(self, bundle: Bundle, settings: ServeConfig):
        if bundle.kind == "segmentation":
            raise WeightsError(
                "serve screens with classifiers; this bundle segments vessels "
                "(use `fundusfm segment eval`)"
            )
        self.bundle, self.quality, self.max_pixels = bundle, settings.quality, settings.max_pixels
        self.pre = bundle.preprocessing.config()
        self.score = scorer(bundle, settings.engine)
        self.shift = shift_scorer(bundle, self.score.engine)
        self.model_lock = threading.Lock()

    @property
    def notes(self) -> list[str]:
        return [*self.score.notes, *self.shift.notes]

    def row(self, upload: Upload, gradcam: bool = False) -> dict:
        """The upload's row (plus `gradcam_png` when asked), or UploadRefused saying why not."""
        name = printable(upload.name)
        head = header(upload.data)
        suffix = image_suffix(upload, head)
        check_pixels(head, self.max_pixels, name)
        item = self._prepare(upload, suffix)
        if item["status"] == "unreadable":
            raise UploadRefused(422, "unreadable", printable(item["reason"]), name)
        with self.model_lock:
            scored = score_items(self.bundle, self.score, self.shift, [item])
            cam = self._overlay(item, scored[0][0]) if gradcam and scored else None
        row = item_row(self.bundle, item, name, scored.get(0))
        row[TONE_KEY] = tone(self.bundle, row["decision"]) if 0 in scored else row["status"]
        if cam is not None:
            row[GRADCAM_KEY] = cam
        return row

    def _prepare(self, upload: Upload, suffix: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="fundusfm-serve-") as folder:
            path = Path(folder) / f"upload{suffix}"  # never the client's name: no path games
            path.write_bytes(upload.data)
            return prepare_item(path, self.pre, self.quality)

    def _overlay(self, item: dict, probs: np.ndarray) -> str:
        """The Grad-CAM of the upload's decision, as `predict --gradcam` draws it, as a PNG."""
        cam = decision_overlays(self.bundle, [item["image"]], [probs])[0]
        png = BytesIO()
        Image.fromarray(cam).save(png, format="PNG")
        return base64.b64encode(png.getvalue()).decode("ascii")
