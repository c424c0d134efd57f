"""`POST /v1/csv`: rows as the `predictions.csv` that `fundusfm predict` writes for the files.

The page sends back the rows `/v1/predict` answered (and, for a refused upload, the row it
shows: `file`, `status` = the error's name, `reason` = its detail); the server writes them
with predict's own pandas call, so the page's download is predict's file, text for text:
    - the values are predict's Python values again: item_row writes no integer, so a JSON
      number is a float (a browser writes 0.0 back as 0); booleans, strings and nulls stay
    - `tone` and `gradcam_png` (shown on the page, not predict's columns) are dropped, and
      a row of a status predict gives an image file carries the quality measures, empty
      when unknown, as predict's rows do
    - the table is predict's own (`predictions_table`): its columns in one order, the rows
      sorted by file
"""

from __future__ import annotations

import json

from fundusfm.screen.predict import MEASURES, predictions_table
from fundusfm.serve.screening import GRADCAM_KEY, TONE_KEY
from fundusfm.serve.upload import UploadRefused

SHOWN_ONLY = (GRADCAM_KEY, TONE_KEY)
IMAGE_STATUSES = ("scored", "ungradable", "unreadable")  # rows item_row makes: measures


def bad_rows(detail: str) -> UploadRefused:
    return UploadRefused(
        400, "bad_rows", f'{detail}; send {{"rows": [row, ...]}}, the rows /v1/predict gave'
    )


def parse_rows(body: bytes) -> list[dict]:
    """The request's rows: a JSON object {"rows": [{column: value}]} with scalar values."""
    try:
        rows = json.loads(body)["rows"]
    except (ValueError, KeyError, TypeError) as exc:
        raise bad_rows(f"the body is not JSON with a list of rows ({exc})") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise bad_rows("rows must be a list of objects")
    for row in rows:
        if not isinstance(row.get("file"), str) or not isinstance(row.get("status"), str):
            raise bad_rows("every row needs a file and a status (text)")
        if any(isinstance(v, dict | list) for v in row.values()):
            raise bad_rows(f"the row of {row['file']!r} holds a list or an object")
    return rows


def _typed(value):
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def predict_row(raw: dict) -> dict:
    """A row as predict's table holds it (see the module's notes)."""
    row = {k: _typed(v) for k, v in raw.items() if k not in SHOWN_ONLY}
    if row["status"] in IMAGE_STATUSES:
        row.update({k: row.get(k) for k in MEASURES})
    return row


def predictions_csv(rows: list[dict], classes: list) -> str:
    """`predictions.csv`'s text for these rows (`/v1/predict`'s), as predict writes it
    (`screen.predict.predictions_table`: its column order and sorting)."""
    table = predictions_table([predict_row(r) for r in rows], classes)
    return table.to_csv(index=False)
