"""The page in a real headless browser (Playwright driving the system's chromium, no browser
download): two photographs dropped on the drop zone (a real `drop` event whose DataTransfer
holds Files made in the page, one a pasted-style image without a suffix) and two chosen
with the file input become rows equal to the API's answers, coloured as the report colours
them; a refused file becomes a row naming its error; the CSV the page downloads is
`fundusfm predict`'s predictions.csv for the same files; a shifted row is highlighted.

The browser is `chromium` on PATH (as .ci/run finds and installs it) or $FUNDUSFM_CHROMIUM;
without one the tests skip, unless $FUNDUSFM_REQUIRE_BROWSER is set (.ci/run sets it), when
their absence is an error: CI never skips them.
"""

from __future__ import annotations

import base64
import json
import shutil
from io import BytesIO

import httpx
import pytest
from PIL import Image

from fundusfm.screen.predict import screen
from fundusfm.serve.server import background
from tests.browser import launch, need_browser
from tests.fakes import camera_frame

pytestmark = pytest.mark.slow
CHOSEN = ["exif rotated.jpg", "truncated.jpg"]  # set on the file input
PASTED = "pasted image"  # a dropped PNG named as a paste names it: no suffix
REPORT = {"pos": "rgb(198, 40, 40)", "neg": "rgb(46, 125, 50)", "shifted": "rgb(106, 27, 154)"}


need_browser()


def _rows(page) -> dict[str, dict[str, str]]:
    """The results table: file -> {column: text (an image: 'img')}, plus the row's `tone`
    and `shift` attributes and the decision's and the shift cell's computed colours."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#results tbody tr')].map(
            (tr) => [tr.dataset.file, Object.assign(Object.fromEntries(
              [...tr.querySelectorAll('td')].map((td) => [td.dataset.col,
                td.dataset.value ?? (td.querySelector('img') ? 'img' : td.textContent)])), {
              tone: tr.dataset.tone, shifted: tr.dataset.shift === 'shifted',
              colour: getComputedStyle(tr.querySelector('[data-col=decision]')).color,
              background: getComputedStyle(tr.querySelector('[data-col=shift]')).backgroundColor,
              shift_colour: getComputedStyle(tr.querySelector('[data-col=shift]')).color,
            })]))"""
    )


def _wait_for(page, n: int) -> None:
    """Until `n` rows are finished (a locator: the page's CSP forbids evaluating strings)."""
    from playwright.sync_api import expect

    expect(page.locator("#results tbody tr[data-done]")).to_have_count(n, timeout=60_000)


def _drop(page, files: list[tuple[str, bytes, str]]) -> None:
    """A real drop on the drop zone: a DataTransfer holding Files built in the page."""
    items = [(name, base64.b64encode(data).decode(), kind) for name, data, kind in files]
    transfer = page.evaluate_handle(
        """(items) => {
          const transfer = new DataTransfer();
          for (const [name, b64, type] of items) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name, { type }));
          }
          return transfer;
        }""",
        items,
    )
    page.dispatch_event("#drop", "dragenter", {"dataTransfer": transfer})
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def _png(rgb) -> bytes:
    out = BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def _predicted(served, tmp_path, pasted: bytes) -> str:
    """predict's predictions.csv of the same four files (the pasted one named .png), its
    name written as the page names it."""
    folder = tmp_path / "same files"
    folder.mkdir()
    for name in ["good.png", *CHOSEN]:
        shutil.copy(served.folder / name, folder / name)
    (folder / f"{PASTED}.png").write_bytes(pasted)
    screen(served.bundle, folder, tmp_path / "out", batch_size=1, workers=0, progress=False)
    text = (tmp_path / "out" / "predictions.csv").read_text("utf-8")
    return text.replace(f"{PASTED}.png,", f"{PASTED},")


def _watch(page) -> list[str]:
    """Script errors, CSP refusals and 404s: the page must run under its own CSP and ask
    for nothing that is not there (its icon included)."""
    broken = []
    page.on("pageerror", lambda exc: broken.append(str(exc)))
    page.on("console", lambda m: "Security Policy" in m.text and broken.append(m.text))
    page.on("response", lambda r: r.status == 404 and broken.append(f"404 {r.url}"))
    return broken


def test_dropped_and_chosen_photos_show_the_apis_rows_and_download_predicts_csv(served, tmp_path):
    from playwright.sync_api import sync_playwright

    good, pasted = (served.folder / "good.png").read_bytes(), _png(camera_frame(5)[0])
    dropped = [("good.png", good, "image/png"), (PASTED, pasted, "image/png")]
    with background(served.app) as url, sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            broken = _watch(page)
            page.goto(url + "/")
            page.locator("#results-head th").first.wait_for()
            summary = page.text_content("#model-summary")
            _drop(page, dropped)
            _wait_for(page, 2)
            shown = _rows(page)
            page.set_input_files("#files", [str(served.folder / n) for n in CHOSEN])
            _wait_for(page, 4)
            refused = _rows(page)["truncated.jpg"]
            with page.expect_download() as download:
                page.click("#download")
            saved = download.value.path().read_text("utf-8")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
        with httpx.Client(base_url=url, timeout=60) as client:
            files = {n: {"file": (n, data, kind)} for n, data, kind in dropped}
            expected = {n: client.post("/v1/predict", files=f).json() for n, f in files.items()}
    assert broken == []
    assert "resnet10 fundus bench model" in summary
    assert "decision at the threshold 0.5 (not validated);" in summary  # the report's words
    assert set(shown) == {"good.png", PASTED}
    for name, row in shown.items():
        answer = expected[name]
        assert row["status"] == answer["status"] == "scored", name
        assert row["decision"] == answer["decision"], name
        assert float(row["p_abnormal"]) == pytest.approx(answer["p_abnormal"], abs=1e-9)
        assert row["shift"] == answer["shift"] and row["gradcam_png"] == "img", name
        assert row["tone"] == answer["tone"] and row["colour"] == REPORT[answer["tone"]]
        assert not row["shifted"]
    assert refused["status"] == "unreadable" and "truncated" in refused["reason"]
    assert refused["tone"] == "unreadable"
    assert saved == _predicted(served, tmp_path, pasted)  # predict's file, text for text


def test_a_shifted_row_is_highlighted_in_the_reports_shift_colour(served):
    """The server's answer is replaced by a shifted one (random_bundle stores no shift
    reference): its row is tinted and its shift cell drawn in the report's colour."""
    from playwright.sync_api import sync_playwright

    (row,) = json.loads(served.table.loc[["good.png"]].to_json(orient="records"))
    answer = {**row, "decision": "abnormal", "tone": "pos", "shift": "shifted"}
    with background(served.app) as url, sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.route("**/v1/predict*", lambda route: route.fulfill(json=answer))
            page.goto(url + "/")
            page.locator("#results-head th").first.wait_for()
            page.set_input_files("#files", [str(served.folder / "good.png")])
            _wait_for(page, 1)
            (shown,) = _rows(page).values()
        finally:
            browser.close()
    assert shown["shifted"] and shown["shift"] == "shifted"
    assert shown["shift_colour"] == REPORT["shifted"] and shown["colour"] == REPORT["pos"]
    assert shown["background"] not in ("rgba(0, 0, 0, 0)", "transparent", "rgb(255, 255, 255)")


def test_api_docs_render_in_the_browser_without_a_network(served):
    """/docs is Swagger UI from the installed package: the operations appear offline."""
    from playwright.sync_api import expect, sync_playwright

    with background(served.app) as url, sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.goto(url + "/docs")
            expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_text_contents()
        finally:
            browser.close()
    assert {"/v1/predict", "/v1/model"} <= {t.strip().replace("\u200b", "") for t in paths}
