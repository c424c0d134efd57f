"""The page in a real headless browser (Playwright driving Debian's chromium, no browser
download): two photographs set on the file input (what a drop does) become two rows equal
to the API's answers, a refused file becomes a row naming its error, and the CSV the page
downloads holds those rows."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import httpx
import pytest

from fundusfm.serve.server import background

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags chromium's own connections are refused by a
# closed network, and it can stall; the rest keep it quiet and headless as root.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHOTOS = ["good.png", "exif rotated.jpg"]

if importlib.util.find_spec("playwright") is None:
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)
if not CHROMIUM.is_file():
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


def _rows(page) -> dict[str, dict[str, str]]:
    """The results table: file -> {column: text}, and whether a Grad-CAM image is shown."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#results tbody tr')].map(
            (tr) => [tr.dataset.file, Object.fromEntries([...tr.querySelectorAll('td')].map(
              (td) => [td.dataset.col, td.dataset.value ?? (td.querySelector('img') ? 'img'
                : td.textContent)]))]))"""
    )


def _api(url: str, served, names: list[str]) -> dict[str, dict]:
    with httpx.Client(base_url=url, timeout=60) as client:
        return {
            n: client.post(
                "/v1/predict", files={"file": (n, (served.folder / n).read_bytes())}
            ).json()
            for n in names
        }


def _wait_for(page, n: int) -> None:
    """Until `n` rows are finished (a locator: the page's CSP forbids evaluating strings)."""
    from playwright.sync_api import expect

    expect(page.locator("#results tbody tr[data-done]")).to_have_count(n, timeout=60_000)


def test_dropped_photos_show_the_apis_rows_and_download_as_csv(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with background(served.app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            broken = []  # script errors and CSP refusals: the page must run under its own CSP
            page.on("pageerror", lambda exc: broken.append(str(exc)))
            page.on("console", lambda m: "Security Policy" in m.text and broken.append(m.text))
            page.goto(url + "/")
            page.locator("#results-head th").first.wait_for()
            assert "resnet10 fundus bench model" in page.text_content("#model-summary")
            assert "threshold 0.5 (validated)" in page.text_content("#model-summary")
            page.set_input_files("#files", [str(served.folder / n) for n in PHOTOS])
            _wait_for(page, 2)
            shown, expected = _rows(page), _api(url, served, PHOTOS)
            page.set_input_files("#files", [str(served.folder / "truncated.jpg")])
            _wait_for(page, 3)
            refused = _rows(page)["truncated.jpg"]
            with page.expect_download() as download:
                page.click("#download")
            saved = tmp_path / "predictions.csv"
            download.value.save_as(saved)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert broken == []
    for name in PHOTOS:
        row, answer = shown[name], expected[name]
        assert row["status"] == answer["status"] == "scored", name
        assert row["decision"] == answer["decision"], name
        assert float(row["p_abnormal"]) == pytest.approx(answer["p_abnormal"], abs=1e-9)
        assert row["shift"] == answer["shift"] and row["gradcam_png"] == "img", name
    assert refused["status"] == "unreadable" and "truncated" in refused["reason"]
    with saved.open(newline="", encoding="utf-8") as f:
        table = {r["file"]: r for r in csv.DictReader(f)}
    assert list(table) == [*PHOTOS, "truncated.jpg"]
    assert [table[n]["decision"] for n in PHOTOS] == [expected[n]["decision"] for n in PHOTOS]
    assert "gradcam_png" not in next(iter(table.values()))


def test_api_docs_render_in_the_browser_without_a_network(served):
    """/docs is Swagger UI from the installed package: the operations appear offline."""
    from playwright.sync_api import expect, sync_playwright

    with background(served.app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/docs")
            expect(page.locator(".opblock-summary-path").first).to_be_visible(timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_text_contents()
        finally:
            browser.close()
    assert {"/v1/predict", "/v1/model"} <= {t.strip().replace("\u200b", "") for t in paths}
