"""The screening report (`DIR/report.html`): read as HTML, never as a screenshot.

One folder is screened once (two photographs, one with markup in its name, a black image,
a broken JPEG, a text file) with `--gradcam`; each test reads a part of its page. The page
is parsed with the stdlib's `html.parser` (elements, attributes, text) and its sections are
cut out by their ids. A last, slow test clicks and types in a headless chromium.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from fundusfm import __version__
from fundusfm.bench.screening import random_bundle
from fundusfm.bundle import BundleMeta
from fundusfm.models.loaded import Bundle, load_bundle
from fundusfm.screen.predict import screen
from fundusfm.screen.report import overlay_uri, thumbnail_order, write_report
from fundusfm.screen.report_page import H, bin_counts, histogram_svg
from fundusfm.screen.report_tables import reason_group
from tests.browser import launch, need_browser
from tests.conftest import TINY_ARCH
from tests.fakes import fundus

ODD = '<script>alert(1)<\\script> & "q".png'  # markup, a quote and an ampersand in a name
SCORED = ["eye1.png", "eye2.png", ODD]


class Elements(HTMLParser):
    """Every start tag as (tag, attributes, the text up to the next tag)."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.found: list[list] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.found.append([tag, dict(attrs), ""])

    def handle_data(self, data):
        if self.found:
            self.found[-1][2] += data


def section(page: str, name: str) -> str:
    start = page.index(f'<section id="{name}">')
    return page[start : page.index("</section>", start)]


def rows(page: str) -> dict[str, str]:
    """The scored table's rows: file (unescaped) -> the row's HTML."""
    found = re.findall(r'<tr class="\w+" data-file="([^"]*)"[^>]*>(.*?)</tr>', page)
    return {Elements(f'<p title="{f}">').found[0][1]["title"]: html for f, html in found}


def image_of(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    folder = root / "photos"
    for seed, name in enumerate(SCORED):
        fundus(folder / name, size=(96, 96), seed=seed + 1)
    Image.new("RGB", (96, 96)).save(folder / "black.png")  # no field of view: ungradable
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    path = random_bundle(TINY_ARCH, 64, root / "bundle")
    out = root / "out"
    screen(path, folder, out, progress=False, workers=0, gradcam=True)
    page = (out / "report.html").read_bytes().decode("utf-8")  # valid UTF-8
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    return {
        "root": root,
        "folder": folder,
        "out": out,
        "page": page,
        "table": table,
        "bundle": path,
    }


def test_the_card_comes_first_with_the_threshold_and_its_validated_word(run):
    page = run["page"]
    card = section(page, "card")
    assert page.index('id="card"') < page.index('id="counts"') < page.index('id="histogram"')
    assert page.index('id="histogram"') < page.index('id="scored"') < page.index('id="not-scored"')
    assert "threshold 0.5 (not validated)" in card and "engine: torch" in card
    for words in ("Model description", "Training data", "Evaluation", "Preprocessing"):
        assert words in card, words  # the card's own sections, as `weights info` words them
    assert "field-of-view crop" in card and "resized to 64 px" in card


def test_an_unvalidated_threshold_is_called_so_in_the_card_and_on_the_histogram(run, tmp_path):
    bundle = load_bundle(run["bundle"])
    task = bundle.meta.task.model_copy(update={"thresholds_validated": False})
    meta = bundle.meta.model_copy(update={"task": task})
    write_report(run["table"], tmp_path, dataclasses.replace(bundle, meta=meta), [], "torch")
    page = (tmp_path / "report.html").read_text("utf-8")
    assert "threshold 0.5 (not validated)" in section(page, "card")
    svg = section(page, "histogram")
    assert re.search(r'<text class="threshold"[^>]*>threshold 0.5 \(not validated\)</text>', svg)
    assert "validated threshold" not in page


def test_the_card_says_what_it_was_trained_on_and_its_validation_metrics(run, tmp_path):
    """A run's bundle/ with its metrics.json beside it: the card's tables, as `weights info`."""
    bundle = load_bundle(run["bundle"])
    config = {"data": {"task": "abnormal", "fold": 2}, "model": {"init": "imagenet+fundus"}}
    prov = bundle.meta.provenance.model_copy(
        update={"manifest": "/data/eyes/manifest.csv", "manifest_sha256": "ab12", "config": config}
    )
    (tmp_path / "bundle").mkdir()
    metrics = {"val": {"auroc": 0.8125, "sensitivity": 0.75}, "labelled": {"train_images": 40}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    meta = bundle.meta.model_copy(update={"provenance": prov})
    moved = dataclasses.replace(bundle, path=tmp_path / "bundle", meta=meta)
    write_report(run["table"], tmp_path, moved, [], "torch")
    card = section((tmp_path / "report.html").read_text("utf-8"), "card")
    assert "eyes/manifest.csv" in card and "imagenet+fundus" in card and "Trained on 40" in card
    cells = [e[2] for e in Elements(card).found if e[0] in ("td", "th")]
    assert cells[:3] == ["part", "auroc", "sensitivity"]
    assert cells[3:6] == ["validation", "0.812", "0.750"]


def test_counts_equal_the_tables_and_the_groups(run):
    page, table = run["page"], run["table"]
    counts = [e[1] for e in Elements(section(page, "counts")).found if "data-count" in e[1]]
    shown = rows(page)
    for c in counts:
        n = int(c["data-count"])
        if c.get("data-status") == "scored":
            assert n == sum(f'data-decision="{c["data-decision"]}"' in r for r in _row_tags(page))
            assert n == ((table.status == "scored") & (table.decision == c["data-decision"])).sum()
        elif "data-status" in c:
            listed = section(page, "not-scored")
            groups = re.findall(rf'data-status="{c["data-status"]}" data-count="(\d+)"', listed)
            assert n == sum(int(g) for g in groups) == (table.status == c["data-status"]).sum()
    scored = sum(int(c["data-count"]) for c in counts if c.get("data-status") == "scored")
    assert scored == len(shown) == 3 and f"{len(table)} files, 3 scored" in page


def _row_tags(page: str) -> list[str]:
    return re.findall(r'<tr class="\w+" data-file="[^"]*"[^>]*>', page)


def test_the_histogram_is_drawn_with_the_threshold_stated(run):
    part = section(run["page"], "histogram")
    assert part.count('<svg class="histogram"') == 1 and "p_abnormal" in part
    line = re.search(r'<line class="threshold" x1="([\d.]+)"', part)
    ticks = dict(
        (t, float(x))
        for x, t in re.findall(
            r'<text x="([\d.]+)" y="\d+" text-anchor="middle">([\d.]+)</text>', part
        )
    )
    assert line and float(line.group(1)) == pytest.approx(ticks["0.5"])  # drawn at 0.5
    assert ">threshold 0.5 (not validated)</text>" in part and "validated threshold" not in part
    bars = re.findall(r'data-bin="(\d+)" data-count="(\d+)"', part)
    assert len({b for b, _ in bars}) == 20 and sum(int(n) for _, n in bars) == 3


def _rects(svg: str) -> list[tuple[str, int, int]]:
    """The histogram's bars as (class, bin, images)."""
    found = re.findall(r'<rect class="(\w+)"[^>]*data-bin="(\d+)" data-count="(\d+)"', svg)
    return [(css, int(b), int(n)) for css, b, n in found]


def test_a_bin_the_threshold_cuts_is_split_by_the_images_decisions():
    """Threshold 0.27 inside bin [0.25, 0.30): 0.26 is decided normal, 0.28 abnormal, and
    each is drawn in the colour of its own decision (not of the bin's midpoint)."""
    svg = histogram_svg([0.26, 0.28, 0.29, 0.1, 0.9], "p_abnormal", 0.27, "threshold 0.27")
    bars = [r for r in _rects(svg) if r[2]]
    assert sorted(r for r in bars if r[1] == 5) == [("neg", 5, 1), ("pos", 5, 2)]
    assert ("neg", 2, 1) in bars and ("pos", 18, 1) in bars and len(bars) == 4
    assert bin_counts([0.26, 0.28, 0.27], 0.27, 20)[5] == (1, 2)  # at the threshold: positive
    assert all(css == "neg" for css, _, _ in _rects(histogram_svg([0.26, 0.8], "p_dr")))


def test_the_stacked_parts_of_a_cut_bin_sit_on_each_other():
    svg = histogram_svg([0.26, 0.28, 0.28], "p", 0.27)
    heights = dict(
        (css, (float(y), float(h)))
        for css, y, h in re.findall(
            r'<rect class="(\w+)"[^>]*data-bin="5"[^>]*y="([\d.]+)"[^>]*height="([\d.]+)"', svg
        )
    )
    (neg_y, neg_h), (pos_y, pos_h) = heights["neg"], heights["pos"]
    assert pos_h == pytest.approx(2 * neg_h, abs=0.2) and pos_y + pos_h == pytest.approx(neg_y)


def test_the_axis_label_and_the_tick_labels_fit_in_the_histogram():
    """11 px text: the tick labels' baseline, then the axis label a line lower with room
    for its descenders (`p_` hangs below the baseline) inside the SVG's height."""
    svg = histogram_svg([0.5], "p_abnormal", 0.5)
    height = float(re.search(r'<svg [^>]*height="([\d.]+)"', svg).group(1))
    font = float(re.search(r'font-size="([\d.]+)"', svg).group(1))
    ticks = [
        float(y)
        for y in re.findall(r'<text x="[\d.]+" y="([\d.]+)" text-anchor="middle">[\d.]+<', svg)
    ]
    label = float(re.search(r'<text class="axis" x="[\d.]+" y="([\d.]+)"', svg).group(1))
    assert height == H and len(ticks) == 5
    assert label - font >= max(ticks) + 0.3 * font  # the label's top under the ticks' descent
    assert label + 0.3 * font <= height  # its descenders inside the picture


def test_each_scored_file_has_a_row_with_its_thumbnail(run):
    shown = rows(run["page"])
    assert set(shown) == set(SCORED) == set(run["table"].file[run["table"].status == "scored"])
    for name, html in shown.items():
        thumb = re.search(r'<img class="thumb" alt="thumbnail of [^"]*" src="([^"]+)"', html)
        assert thumb, name
        img = image_of(thumb.group(1))
        assert img.format == "JPEG" and img.size == (96, 96)
        assert re.findall(r'<td class="num" data-value="([\d.e-]+)">(\d\.\d{3})</td>', html)


def test_gradcam_overlays_sit_in_their_own_rows(run):
    shown, cams = rows(run["page"]), sorted((run["out"] / "gradcam").glob("*.png"))
    assert len(cams) == 3
    seen = set()
    for name, html in shown.items():
        stem = Path(name).stem
        (mine,) = [c for c in cams if c.name.rsplit("_", 1)[0] == stem]
        cam = re.search(r'<img class="thumb cam" alt="Grad-CAM of [^"]*" src="([^"]+)"', html)
        assert cam and cam.group(1) == overlay_uri(mine), name
        seen.add(cam.group(1))
    assert len(seen) == 3  # three different overlays, one per row


def test_images_not_scored_are_listed_under_their_reason(run):
    part = section(run["page"], "not-scored")
    groups = re.findall(
        r'<h3 class="group (\w+)"[^>]*>(.*?)</h3><ul class="files">(.*?)</ul>', part
    )
    found = {(s, h): re.findall(r'<li data-file="([^"]*)">', items) for s, h, items in groups}
    assert found[("ungradable", "ungradable: no field of view (1)")] == ["black.png"]
    assert found[("unreadable", "unreadable: not a recognised image format (1)")] == ["broken.jpg"]
    assert "Error" not in part  # user words, never a Python class name
    assert found[("unsupported", "unsupported: not an image format fundusfm reads (1)")] == [
        "notes.txt"
    ]
    black = next(items for s, _, items in groups if s == "ungradable")
    assert '<img class="thumb"' in black and "nearly) black" in black  # picture and full reason
    assert "<img" not in next(items for s, _, items in groups if s == "unreadable")


def test_reasons_group_without_the_figures_of_one_image():
    assert reason_group("under-exposed (brightness 0.03); out of focus (focus 0.001)") == (
        "under-exposed; out of focus"
    )
    assert reason_group("field of view covers 12% of the image") == (
        "field of view covers N% of the image"
    )
    assert reason_group("") == "no reason recorded"


def test_the_decoders_bomb_reason_groups_under_its_words(tmp_path: Path):
    """Pillow's own bomb message has brackets of its own: the heading keeps the words."""
    from fundusfm.data.decode import ImageDecodeError, read_rgb

    bomb = tmp_path / "bomb.png"
    Image.new("1", (15000, 15000)).save(bomb)  # 225 MP: over Pillow's 179 MP bomb limit
    with pytest.raises(ImageDecodeError) as err:
        read_rgb(bomb)
    assert reason_group(str(err.value)) == "decompression bomb refused"


def test_a_file_name_with_markup_is_escaped_everywhere(run):
    page = run["page"]
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    elements = Elements(page).found
    assert [e[0] for e in elements].count("script") == 1  # only the page's own script
    assert ODD in {e[1].get("data-file") for e in elements}  # the name survives, unescaped
    assert not [e for e in elements if e[0] in ("link", "iframe") or "onerror" in e[1]]


def test_the_table_sorts_and_filters_in_the_page_with_no_outside_file(run):
    page = run["page"]
    elements = Elements(section(page, "scored")).found
    heads = {e[2]: e[1].get("data-sort") for e in elements if e[0] == "th"}
    assert heads["file"] == heads["decision"] == "text"
    assert heads["p_normal"] == heads["p_abnormal"] == "num"
    assert heads["image"] is None and heads["Grad-CAM"] is None  # pictures do not sort
    ids = {e[1].get("id"): e[0] for e in elements}
    assert ids["filter"] == "input" and ids["pick"] == "select" and ids["scored-table"] == "table"
    options = [e[1]["value"] for e in elements if e[0] == "option"]
    assert "" in options and any(o.startswith("decision=") for o in options)
    script = page[page.index("<script>") : page.index("</script>")]
    assert "aria-sort" in script and "parseFloat" in script and "data-file" in script
    assert not re.search(r'(src|href)="(?!data:|#|predictions\.csv)', page)  # nothing fetched


def _thumbed(page: str) -> list[str]:
    """The files whose thumbnail the page shows (unescaped), in page order."""
    thumbs = [e[1] for e in Elements(page).found if e[0] == "img" and e[1]["class"] == "thumb"]
    return [t["alt"].removeprefix("thumbnail of ") for t in thumbs]


def test_thumbnails_are_capped_and_a_missing_one_never_fails_the_report(run, tmp_path):
    """Capped at 2 of 3 scored and 1 ungradable: the riskiest scored image and the
    ungradable one; a source removed since gives no thumbnail, never a failed report."""
    bundle, table = load_bundle(run["bundle"]), run["table"]
    riskiest = table[table.status == "scored"].sort_values("p_abnormal").file.iloc[-1]
    sources = {f: run["folder"] / f for f in table.file}
    cams = {"eye2.png": tmp_path / "no_cam.png"}
    write_report(table, tmp_path, bundle, [], "torch", sources, cams, limit=2)
    page = (tmp_path / "report.html").read_text("utf-8")
    assert "shown for 2 of the 4 scored and ungradable images" in page
    assert "positive decisions first" in page and "25% of them kept for ungradable" in page
    assert len(rows(page)) == 3 and sorted(_thumbed(page)) == sorted([riskiest, "black.png"])
    assert '<img class="thumb cam"' not in page
    sources[riskiest] = tmp_path / "gone.png"
    write_report(table, tmp_path, bundle, [], "torch", sources, cams, limit=2)
    page = (tmp_path / "report.html").read_text("utf-8")
    assert len(rows(page)) == 3 and _thumbed(page) == ["black.png"]


def _risky_table() -> pd.DataFrame:
    """Six scored images (p_abnormal, decided at 0.3) and three ungradable, by file name."""
    probs = {"a": 0.1, "b": 0.9, "c": 0.35, "d": 0.2, "e": 0.5, "f": 0.05}
    scored = [
        {"file": f, "status": "scored", "p_normal": 1 - p, "p_abnormal": p}
        | {"decision": "abnormal" if p >= 0.3 else "normal"}
        for f, p in probs.items()
    ]
    ungradable = [{"file": f"u{i}", "status": "ungradable", "reason": "dark"} for i in (1, 2, 3)]
    return pd.DataFrame([*scored, *ungradable])


def test_thumbnails_go_to_the_riskiest_images_and_some_to_ungradable_ones():
    binary = _bundle("binary", ["normal", "abnormal"], [0.3])
    table = _risky_table()
    assert thumbnail_order(table, binary, 4) == ["b", "e", "c", "u1"]  # not a, b, c, d
    assert thumbnail_order(table, binary, 6) == ["b", "e", "c", "d", "u1", "u2"]
    assert thumbnail_order(table, binary, 20) == ["b", "e", "c", "d", "a", "f", "u1", "u2", "u3"]
    assert thumbnail_order(table, binary, 1) == ["u1"]  # the one kept for an ungradable image
    assert thumbnail_order(table[table.status == "scored"], binary, 2) == ["b", "e"]


def test_a_positive_decision_comes_before_a_higher_probability_that_is_not_one():
    """Multilabel: dr at 0.8 under its 0.9 threshold is not decided; amd at 0.3 over its
    0.2 threshold is, so that image is looked at first."""
    multi = _bundle("multilabel", ["dr", "amd"], [0.9, 0.2])
    table = pd.DataFrame(
        [
            {"file": "high", "status": "scored", "p_dr": 0.8, "p_amd": 0.1, "decision": ""},
            {"file": "called", "status": "scored", "p_dr": 0.1, "p_amd": 0.3, "decision": "amd"},
            {"file": "low", "status": "scored", "p_dr": 0.2, "p_amd": 0.1, "decision": ""},
        ]
    )
    assert thumbnail_order(table, multi, 3) == ["called", "high", "low"]
    grades = _bundle("multiclass", ["normal", "dr", "amd"], [])
    table = _table(["normal", "dr", "amd"], ["normal", "dr", "amd"])  # normal at 0.7 is no risk
    assert thumbnail_order(table, grades, 3) == ["1.png", "2.png", "0.png"]


def test_the_page_says_which_folder_was_screened_when_and_by_which_version(run, tmp_path):
    assert f"Screened <code>{run['folder']}</code> on <time" in run["page"]
    when = datetime(2024, 5, 6, 7, 8, 9).astimezone()
    bundle = load_bundle(run["bundle"])
    write_report(run["table"], tmp_path, bundle, [], folder="photos/<in>", when=when)
    page = (tmp_path / "report.html").read_text("utf-8")
    line = page[page.index("</h1>") : page.index("<nav>")]  # at the top, before everything
    assert "<code>photos/&lt;in&gt;</code>" in line and f"fundusfm {__version__}" in line
    assert f'datetime="{when.isoformat(timespec="seconds")}"' in line
    assert "2024-05-06T07:08:09" in line


def _bundle(kind: str, classes: list[str], thresholds: list[float]) -> Bundle:
    meta = BundleMeta.model_validate(
        {
            "architecture": {"arch": TINY_ARCH, "head": "linear", "outputs": len(classes)},
            "task": {"name": "grades", "kind": kind, "classes": classes, "thresholds": thresholds},
            "preprocessing": {"resolution": 64},
            "provenance": {"made_by": "a test"},
        }
    )
    return Bundle(Path("nowhere"), meta, torch.nn.Linear(2, 2))


def _table(classes: list[str], decisions: list[str]) -> pd.DataFrame:
    probs = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]
    scored = [
        {
            "file": f"{i}.png",
            "status": "scored",
            **{f"p_{c}": p for c, p in zip(classes, ps, strict=True)},
            "decision": d,
        }
        for i, (ps, d) in enumerate(zip(probs, decisions, strict=True))
    ]
    return pd.DataFrame([*scored, {"file": "x.txt", "status": "unsupported", "reason": "txt"}])


def test_multiclass_and_multilabel_get_one_histogram_per_class(tmp_path):
    classes = ["normal", "dr", "amd"]
    write_report(
        _table(classes, ["normal", "dr", "amd"]), tmp_path, _bundle("multiclass", classes, []), []
    )
    part = section((tmp_path / "report.html").read_text("utf-8"), "histogram")
    assert part.count('<svg class="histogram"') == 3 and '<line class="threshold"' not in part
    assert "no threshold is drawn" in part
    write_report(
        _table(classes, ["normal", "dr", ""]),
        tmp_path,
        _bundle("multilabel", classes, [0.5, 0.4, 0.3]),
        [],
    )
    page = (tmp_path / "report.html").read_text("utf-8")
    part = section(page, "histogram")
    assert part.count('<svg class="histogram"') == part.count('<line class="threshold"') == 3
    assert ">validated threshold 0.4</text>" in part and "each with its own threshold" in part
    assert re.search(r'<li class="neg" data-status="scored" data-decision="" data-count="1">', page)


@pytest.mark.slow
def test_clicks_sort_and_typing_filters_in_a_browser(run):
    need_browser()
    from playwright.sync_api import sync_playwright

    table = run["table"].set_index("file")
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, broken = browser.new_page(), []
            page.on("pageerror", lambda exc: broken.append(str(exc)))
            page.goto((run["out"] / "report.html").as_uri())
            order = "() => [...document.querySelectorAll('#scored-table tbody tr')]"
            order += ".map((r) => r.dataset.file)"
            header = page.locator("#scored-table th", has_text="p_abnormal")
            header.click()
            assert page.evaluate(order) == table.p_abnormal[SCORED].sort_values().index.tolist()
            header.click()
            assert (
                page.evaluate(order)
                == table.p_abnormal[SCORED].sort_values(ascending=False).index.tolist()
            )
            page.fill("#filter", "EYE")
            assert page.text_content("#shown") == "2 of 3 shown"
            assert page.locator("#scored-table tbody tr:not([hidden])").count() == 2
            page.fill("#filter", "")
            chosen = table.decision[SCORED[0]]
            page.select_option("#pick", f"decision={chosen}")
            expected = (table.decision[SCORED] == chosen).sum()
            assert page.text_content("#shown") == f"{expected} of 3 shown"
            assert not broken
        finally:
            browser.close()
