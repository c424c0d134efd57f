"""The JSON API through FastAPI's test client: every input of docs/robustness.md is answered
as `predict` answers it (the same row, or a 4xx JSON naming the problem), limits, the model
card, the OpenAPI page, unknown paths, temporary files and pickles."""

from __future__ import annotations

import asyncio
import base64
import os
import pickle
import tempfile
import threading
from io import BytesIO

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from fundusfm.config.serve import ServeConfig
from fundusfm.data.manifest import printable
from fundusfm.screen.report_page import TONES, threshold_words
from fundusfm.screen.report_page import page as report_page
from fundusfm.serve import screening
from fundusfm.serve.app import create_app
from fundusfm.serve.gate import Gate
from fundusfm.serve.upload import UploadRefused
from tests.serve.conftest import SETTINGS, good_photo, multipart, post, same

ANSWERS = {"scored": 200, "ungradable": 200, "unreadable": 422, "unsupported": 415}


def corpus_files(folder) -> list[bytes]:
    """Every file under the corpus as a relative path in bytes (names need not be UTF-8)."""
    root = os.fsencode(folder)
    return sorted(
        os.path.relpath(os.path.join(top, name), root)
        for top, _, names in os.walk(root)
        for name in names
    )


def test_every_robustness_input_is_answered_as_predict_answers_it(served):
    files = corpus_files(served.folder)
    assert len(files) == len(served.table) >= 17  # the whole corpus, byte-named files too
    assert set(served.table["status"]) == set(ANSWERS)  # every kind of answer is exercised
    for rel in files:
        name = os.fsdecode(rel)
        expected = served.table.loc[printable(name)]  # predict's name for it
        data = (served.folder / name).read_bytes()
        answer = post(served.client, rel, data)
        assert answer.status_code == ANSWERS[expected["status"]], (name, answer.json())
        body = answer.json()
        if answer.status_code == 200:  # the same row as predict's, column for column
            assert body.pop("tone") in ("pos", "neg", "ungradable"), name  # and its colour
            assert set(body) <= set(served.table.columns), name
            for column in served.table.columns:
                assert same(expected[column], body.get(column)), (name, column, body)
        else:  # a JSON error naming the problem in predict's words
            said = body.pop("detail")
            assert body == {"error": expected["status"], "file": expected["file"]}, name
            if expected["status"] == "unsupported":  # and what else serve looked at
                assert said.startswith(expected["reason"] + "; nor are its content type"), said
            else:
                assert said == expected["reason"], name
        assert post(served.client, "good.png", good_photo(served)).json()["status"] == "scored"


def test_probabilities_and_decision_equal_predicts_for_a_good_photo(served):
    row = post(served.client, "good.png", good_photo(served)).json()
    expected = served.table.loc["good.png"]
    assert row["status"] == expected["status"] == "scored"
    assert row["decision"] == expected["decision"] and row["decision"] in ("normal", "abnormal")
    for c in ("normal", "abnormal"):
        assert abs(row[f"p_{c}"] - expected[f"p_{c}"]) <= 1e-6
    assert row["p_abnormal"] + row["p_normal"] == pytest.approx(1, abs=1e-6)
    assert row["shift"] == "unavailable"  # random_bundle stores no shift reference
    assert row["tone"] == {"normal": "neg", "abnormal": "pos"}[row["decision"]]  # the report's


def test_one_pixel_and_black_images_are_ungradable_with_the_reason(served):
    tiny = BytesIO()
    Image.new("RGB", (1, 1), (180, 90, 40)).save(tiny, format="PNG")
    row = post(served.client, "one.png", tiny.getvalue()).json()
    assert row["status"] == "ungradable" and "only 1x1 pixels" in row["reason"]
    assert "p_normal" not in row and "decision" not in row and row["tone"] == "ungradable"
    black = post(served.client, "black.png", (served.folder / "black.png").read_bytes()).json()
    assert black["status"] == "ungradable" and "no field of view" in black["reason"]


def test_over_the_size_limit_is_413_read_or_declared_and_serving_goes_on(served):
    client = TestClient(
        create_app(served.bundle, SETTINGS.model_copy(update={"max_upload_bytes": 2_000}))
    )
    body, kind = multipart("big.png", b"\0" * 5_000)
    declared = client.post("/v1/predict", content=body, headers={"content-type": kind})
    assert declared.status_code == 413
    assert (
        declared.json()["error"] == "too_large" and "2,000-byte limit" in declared.json()["detail"]
    )
    chunks = (body[i : i + 500] for i in range(0, len(body), 500))  # no Content-Length
    streamed = client.post("/v1/predict", content=chunks, headers={"content-type": kind})
    assert streamed.status_code == 413 and "max_upload_bytes" in streamed.json()["detail"]
    small = BytesIO()
    Image.new("RGB", (20, 20)).save(small, format="PNG")
    assert post(client, "small.png", small.getvalue()).status_code == 200


def test_bad_requests_get_json_errors_that_say_what_to_send(served):
    c = served.client
    assert c.post("/v1/predict", content=b"x").json()["error"] == "not_multipart"
    body, kind = multipart("a.png", good_photo(served), field="image")
    answer = c.post("/v1/predict", content=body, headers={"content-type": kind})
    assert answer.status_code == 400 and "no field 'file'" in answer.json()["detail"]
    answer = post(c, "a.png", good_photo(served), "?gradcam=perhaps")
    assert answer.status_code == 400 and "gradcam" in answer.json()["detail"]
    assert c.get("/static/nothing.js").json()["error"] == "not_found"
    nameless = post(c, "photo", b"just words")  # no suffix, no image type, no image bytes
    assert nameless.status_code == 415 and "(no extension)" in nameless.json()["detail"]
    garbled = c.post("/v1/predict", content=b"--x\r\nnonsense", headers={"content-type": kind})
    assert garbled.status_code == 400 and garbled.json()["error"] in ("bad_form", "no_file")


def test_gradcam_is_a_png_overlay_at_the_bundles_resolution(served):
    row = post(served.client, "good.png", good_photo(served), "?gradcam=true").json()
    image = Image.open(BytesIO(base64.b64decode(row.pop("gradcam_png"))))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    plain = post(served.client, "good.png", good_photo(served)).json()
    assert "gradcam_png" not in plain and plain == row
    off = TestClient(create_app(served.bundle, SETTINGS.model_copy(update={"gradcam": False})))
    refused = post(off, "good.png", good_photo(served), "?gradcam=true")
    assert refused.status_code == 400 and refused.json()["error"] == "gradcam_off"


def test_model_card_holds_the_threshold_validated_and_the_cards_text(served):
    info = served.client.get("/v1/model").json()
    words = threshold_words(0.5, False)  # the screening report's words: one rule
    assert words == "threshold 0.5 (not validated)"  # random weights: nothing validated
    note = "0.5: a benchmark bundle with random weights"
    assert info["threshold"] == {"values": [0.5], "validated": False, "note": note, "words": words}
    assert info["classes"] == ["normal", "abnormal"] and info["task"]["kind"] == "binary"
    assert info["preprocessing"]["resolution"] == 64 and info["preprocessing"]["crop"]
    assert info["server"]["engine"] == "torch" and info["server"]["max_upload_bytes"] > 0
    assert info["server"]["max_pixels"] == 40_000_000
    assert "## Model description" in info["card"] and "## Training data" in info["card"]
    assert any("shift unavailable" in note for note in info["notes"])


def test_page_docs_and_openapi_answer(served):
    page = served.client.get("/")
    assert page.status_code == 200 and "/static/page.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "Download CSV" in served.client.get("/").text
    assert "text/javascript" in served.client.get("/static/page.js").headers["content-type"]
    docs = served.client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert "http" not in docs.text.replace("http-equiv", "")  # nothing from a CDN: offline
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert served.client.get(f"/static-offline-docs/{asset}").status_code == 200
    spec = served.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["required"] == ["file"]
    assert {"413", "415", "422"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])
    assert (
        "/v1/model" in spec["paths"]
        and "application/json" in (spec["paths"]["/v1/csv"]["post"]["requestBody"]["content"])
    )


def test_the_page_has_the_reports_colours_from_its_style(served):
    page, css = served.client.get("/").text, served.client.get("/static/tones.css")
    assert "/static/tones.css" in page and css.headers["content-type"].startswith("text/css")
    report = report_page("report", "")
    for name, colour in TONES.items():  # one source: report_page.TONES
        rule = f".{name}{{--c:{colour}}}"
        assert rule in report and rule in css.text, name
        assert f"--{name}:{colour};" in css.text and f"--{name}:{colour};" in report


def test_unknown_paths_and_methods_get_the_apps_error_shape_and_a_favicon_is_served(served):
    shape = set(UploadRefused(404, "x", "y").body())  # {"error", "detail"}, as refusals
    for answer, status, error in (
        (served.client.get("/v1/nothing"), 404, "not_found"),
        (served.client.get("/v1/predict"), 405, "method_not_allowed"),
        (served.client.post("/v1/model"), 405, "method_not_allowed"),
        (served.client.get("/static/nothing.js"), 404, "not_found"),
    ):
        assert answer.status_code == status and set(answer.json()) == shape, answer.json()
        assert answer.json()["error"] == error
    assert "POST /v1/predict" in served.client.get("/v1/nothing").json()["detail"]
    icon = served.client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.text.startswith("<svg")


def test_uploads_live_in_a_temporary_folder_that_is_removed(served, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    prepare = screening.prepare_item

    def spy(path, *args):
        seen.append((path, path.is_file(), path.parent.parent == tmp_path))
        return prepare(path, *args)

    monkeypatch.setattr(screening, "prepare_item", spy)
    for name in ("good.png", "truncated.jpg", "zero.jpg", "bomb.png", "notes.txt"):
        post(served.client, name, (served.folder / name).read_bytes())
    escape = post(served.client, "../../escape.png", good_photo(served)).json()
    assert escape["file"] == "../../escape.png" and escape["status"] == "scored"  # a label only
    assert len(seen) == 5 and all(on_disk and inside for _, on_disk, inside in seen)
    assert list(tmp_path.iterdir()) == []  # every upload's folder is gone


def test_nothing_is_pickled(served, monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    client = TestClient(create_app(served.bundle, SETTINGS))
    assert post(client, "good.png", good_photo(served), "?gradcam=true").status_code == 200


def test_the_gate_scores_a_bounded_number_and_refuses_past_the_queue():
    gate, release, inside = Gate(concurrent=1, waiting=1), threading.Event(), []

    def work(i):
        inside.append(i)
        release.wait(5)
        return i

    async def main():
        first = asyncio.ensure_future(gate.run(work, 1))
        second = asyncio.ensure_future(gate.run(work, 2))
        await asyncio.sleep(0.1)
        assert inside == [1]  # one at a time: the second waits
        with pytest.raises(UploadRefused) as busy:
            await gate.run(work, 3)
        release.set()
        return await first, await second, busy.value.status

    assert asyncio.run(main()) == (1, 2, 503)
    gate.close()
    assert gate.pool is None and asyncio.run(gate.run(len, "abc")) == 3  # new threads
    gate.close()


def test_settings_are_typed_and_bounded():
    assert ServeConfig().host == "127.0.0.1" and ServeConfig().max_upload_bytes == 20_000_000
    with pytest.raises(ValueError, match="max_upload_bytes"):
        ServeConfig(max_upload_bytes=0)
    with pytest.raises(ValueError, match="engine"):
        ServeConfig(engine="tensorrt")


def test_black_png_in_the_corpus_is_predicts_ungradable(served):
    assert served.table.loc["black.png", "status"] == "ungradable"
    assert np.isnan(served.table.loc["black.png", "p_normal"])


def test_an_unexpected_error_is_a_json_500_and_the_next_upload_is_scored(served, monkeypatch):
    client = TestClient(served.app, raise_server_exceptions=False)

    def broken(*_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(screening, "score_items", broken)
    answer = post(client, "good.png", good_photo(served))
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal", "detail": "RuntimeError: a bug; please report it"}
    monkeypatch.undo()
    assert post(client, "good.png", good_photo(served)).json()["status"] == "scored"
