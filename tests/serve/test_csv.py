"""POST /v1/csv: the rows the page holds become `fundusfm predict`'s predictions.csv, text for
text, even after a browser's JSON has turned 0.0 into 0."""

from __future__ import annotations

import json
import os
import random

import pandas as pd
from fastapi.testclient import TestClient

from fundusfm.serve.app import create_app
from fundusfm.serve.table import predictions_csv
from tests.serve.conftest import SETTINGS, page_row, post
from tests.serve.test_api import corpus_files


def as_a_browser_sends(value):
    """JSON through JavaScript: a whole float comes back an integer (0.0 -> 0)."""
    if isinstance(value, dict):
        return {k: as_a_browser_sends(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_a_browser_sends(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def written(client, rows: list[dict]) -> str:
    answer = client.post("/v1/csv", content=json.dumps({"rows": as_a_browser_sends(rows)}))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    return answer.text


def test_the_corpus_through_the_api_is_predicts_csv_text_for_text(served):
    """Every file of the corpus (byte-named ones too) sent alone, its rows sent back in
    shuffled order: predict's predictions.csv, but for the unsupported file's reason (serve
    also says what its type and bytes were)."""
    answers = {}
    for rel in corpus_files(served.folder):
        name = os.fsdecode(rel)
        answer = post(served.client, rel, (served.folder / name).read_bytes(), "?gradcam=true")
        answers[name] = page_row(answer)
    assert "gradcam_png" in answers["good.png"] and "tone" in answers["good.png"]
    rows = [r for name, r in answers.items() if name != "notes.txt"]
    random.Random(0).shuffle(rows)
    predicted = (served.predicted / "predictions.csv").read_text("utf-8")
    kept = [line for line in predicted.splitlines(True) if not line.startswith("notes.txt,")]
    assert len(kept) == len(predicted.splitlines()) - 1
    assert written(served.client, rows) == "".join(kept)


def test_booleans_whole_floats_and_missing_values_are_written_as_pandas_writes_them():
    measures = {"fov_fraction": 1.0, "brightness": 0.5, "saturated": 0.0, "focus": 2.0}
    scored = {"status": "scored", "reason": "", "p_x": 0.0, "decision": "x", "shift": "shifted"}
    a = {"file": "a.png", **scored, "shift_image_stats": True, **measures}
    b = {"file": "b.png", **scored, "p_x": 1.0, "shift_image_stats": False, **measures}
    c = {"file": "c.txt", "status": "unsupported", "reason": "not an image"}
    d = {"file": "d.jpg", "status": "unreadable", "reason": "truncated"}
    unknown = dict.fromkeys(measures)  # predict's unreadable row: measures, all unknown
    in_predicts_order = [c, a, b, {**d, **unknown}]  # unsupported first, then by path
    table = pd.DataFrame(in_predicts_order).sort_values("file", kind="stable")
    expected = table.reset_index(drop=True).to_csv(index=False)
    sent = as_a_browser_sends([d, b, c, a])  # the page's order, d as the page makes it
    assert sent[1]["p_x"] == 1 and isinstance(sent[1]["p_x"], int)
    got = predictions_csv(sent, ["x"])
    assert got == expected
    assert "a.png,scored,,0.0,x,shifted,True,1.0,0.5,0.0,2.0" in got.splitlines()


def test_bad_rows_are_a_json_400_and_too_many_a_413(served):
    c = served.client
    for body in (b"not json", b'{"rows": 3}', b'{"rows": [{"file": "a"}]}', b"[]"):
        answer = c.post("/v1/csv", content=body)
        assert answer.status_code == 400 and answer.json()["error"] == "bad_rows", body
    nested = c.post("/v1/csv", json={"rows": [{"file": "a", "status": "x", "p": [1]}]})
    assert nested.status_code == 400 and "list or an object" in nested.json()["detail"]
    small = TestClient(
        create_app(served.bundle, SETTINGS.model_copy(update={"max_upload_bytes": 100}))
    )
    rows = [{"file": f"{i}.png", "status": "scored"} for i in range(20)]
    assert small.post("/v1/csv", json={"rows": rows}).status_code == 413
    assert written(c, []) == "file,status\n"
