"""The grid report on hand-made predictions (no training): the pooled AUROC interval is
`metric_intervals`' own, comparisons name the test they ran, and the HTML report of a tiny
grid written by hand has every section, intervals beside values, Holm-adjusted p-values, and
a methods paragraph that states the grid's protocol (checked on the HTML, not a screenshot)."""

import html
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fundusfm.config.core import SplitConfig, load_config
from fundusfm.config.grid import GridConfig
from fundusfm.data.manifest import encode_labels, load_manifest
from fundusfm.data.splits import fold_sets, labelled_counts, write_splits
from fundusfm.evaluation.metrics import binary_auroc
from fundusfm.evaluation.stats import (
    CLUSTERED_DELONG,
    DELONG,
    clustered_delong_test,
    delong_test,
    metric_intervals,
)
from fundusfm.grid.cells import cell_dir, expand, fingerprint
from fundusfm.grid.figures import _curves, fraction_ticks
from fundusfm.grid.html import interval, p_value
from fundusfm.grid.report import COMPARISON_COLUMNS, build_report, compare, summarise
from fundusfm.grid.tables import KEYS, in_groups
from fundusfm.io import write_json

COORDS = {"task": "abnormal", "method": "lf", "resolution": 64, "fraction": 1.0}
TASKS = {"abnormal": ("binary", ["normal", "abnormal"])}


def predictions(rng, patients: int, eyes: int, init: str, signal: float) -> pd.DataFrame:
    """Pooled test predictions of one init: `eyes` images per patient, labels per patient."""
    y = np.repeat(rng.integers(0, 2, patients), eyes)
    score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, len(y)))))
    return pd.DataFrame(
        {
            "image_id": [f"p{i // eyes}_e{i % eyes}" for i in range(len(y))],
            "fold": np.arange(len(y)) % 3,
            "split": "test",
            "y_true": y,
            "score_normal": 1 - score,
            "score_abnormal": score,
            **COORDS,
            "init": init,
        }
    )


def patients_of(frame: pd.DataFrame) -> dict:
    return {i: i.split("_")[0] for i in frame["image_id"]}


def summary_of(frame: pd.DataFrame, n_boot: int) -> pd.Series:
    results = pd.DataFrame(
        [{**COORDS, "init": "a", "fold": k, "test_auroc": 0.7} for k in range(3)]
    )
    return summarise(results, frame, TASKS, patients_of(frame), n_boot).iloc[0]


def test_pooled_auroc_interval_is_metric_intervals_and_narrows_with_more_patients():
    rng = np.random.default_rng(0)
    widths = []
    for patients in (30, 600):
        frame = predictions(rng, patients, 2, "a", 1.0)
        row = summary_of(frame, n_boot=300)
        y, s = frame["y_true"].to_numpy(), frame[["score_normal", "score_abnormal"]].to_numpy()
        groups = frame["image_id"].map(patients_of(frame)).to_numpy()
        ref = metric_intervals("binary", y, s, TASKS["abnormal"][1], None, groups, n_boot=300)
        assert row.pooled_auroc == pytest.approx(ref["auroc"]["value"], abs=1e-12)
        assert (row.pooled_auroc_ci_low, row.pooled_auroc_ci_high) == (
            ref["auroc"]["ci_low"],
            ref["auroc"]["ci_high"],
        )  # same resamples, same statistic: identical, not merely close
        assert row.pooled_patients == patients and row.pooled_images == 2 * patients
        widths.append(row.pooled_auroc_ci_high - row.pooled_auroc_ci_low)
    assert widths[1] < widths[0] / 2.5  # 20x the patients: about 1/sqrt(20) the width


@pytest.mark.parametrize("eyes", [1, 2])
def test_compare_runs_the_test_that_fits_and_reports_it(eyes):
    rng = np.random.default_rng(eyes)
    a = predictions(rng, 80, eyes, "a", 1.2)
    b = a.assign(
        init="b", score_abnormal=np.clip(a.score_abnormal + rng.normal(0, 0.3, len(a)), 0, 1)
    )
    b["score_normal"] = 1 - b["score_abnormal"]
    table = compare(pd.concat([a, b]), TASKS, patients_of(a), n_boot=10)
    (row,) = table.to_dict("records")
    y, sa, sb = a.y_true.to_numpy(), a.score_abnormal.to_numpy(), b.score_abnormal.to_numpy()
    if eyes == 1:
        want, name = delong_test(y, sa, sb), DELONG
    else:
        groups = a.image_id.map(patients_of(a)).to_numpy()
        want, name = clustered_delong_test(y, sa, sb, groups), CLUSTERED_DELONG
    assert row["test"] == name and row["patients"] == 80 and row["images"] == 80 * eyes
    assert row["p_value"] == pytest.approx(want["p_value"], rel=1e-9, abs=0)
    assert 0 < row["p_value"] <= 1 and row["complete"]


def test_only_the_incomplete_group_leaves_the_comparisons():
    rng = np.random.default_rng(3)
    frames = []
    for fraction in (0.5, 1.0):
        for init in ("a", "b"):
            frames.append(predictions(rng, 30, 2, init, 1.0).assign(fraction=fraction))
    preds = pd.concat(frames, ignore_index=True)
    incomplete = pd.DataFrame([{**COORDS, "init": "b", "fraction": 0.5}])[KEYS]
    kept = preds[~in_groups(preds, incomplete)]
    assert set(zip(kept.init, kept.fraction, strict=True)) == {("a", 0.5), ("a", 1.0), ("b", 1.0)}
    table = compare(kept, TASKS, patients_of(preds), n_boot=10, incomplete=incomplete)
    assert list(table.fraction) == [1.0] and table.complete.all()
    allowed = compare(preds, TASKS, patients_of(preds), n_boot=10, incomplete=incomplete)
    assert dict(zip(allowed.fraction, allowed.complete, strict=True)) == {0.5: False, 1.0: True}


def test_summary_states_realised_share_labelled_images_and_holdout(tmp_path):
    frame = predictions(np.random.default_rng(1), 30, 2, "a", 1.0)
    coords = {**COORDS, "fraction": 0.01, "init": "a"}
    frame["fraction"] = 0.01
    results = pd.DataFrame(
        [
            {**coords, "fold": k, "test_auroc": 0.7, "holdout_auroc": 0.6 + 0.1 * k,
             "share": share, "train_images": 5, "val_images": 5 + k, "labelled_images": 10 + k}
            for k, share in enumerate([0.02, 0.025, 0.03])
        ]
    )  # fmt: skip
    row = summarise(results, frame, TASKS, patients_of(frame), 20).iloc[0]
    assert row.labelled_share == "2.5% (0.01)"  # realised, nominal in brackets
    assert row.labelled_images_mean == 11
    assert row.holdout_auroc_mean == pytest.approx(0.7)
    summary = summarise(results, frame, TASKS, patients_of(frame), 20)
    ticks, labels = fraction_ticks(summary.assign(fraction=0.01))
    assert ticks == [pytest.approx(0.025)] and labels == ["2.5% (0.01)"]


# --- the HTML report of a tiny grid whose cells are written by hand (no training) ---------

INITS = {"scratch": 0.2, "imagenet": 1.0, "fundus": 2.0}  # init -> signal in its scores
MISSING = ("fundus", 0.5, 2)  # (init, fraction, fold) never run: one incomplete group
INTERVAL = re.compile(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]")


class Page(HTMLParser):
    """Section ids, figure captions, the methods text and every src of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.captions, self.srcs, self.pre = [], [], [], ""
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs["id"])
        if tag in ("img", "script", "link"):
            self.srcs.append(attrs.get("src") or attrs.get("href") or tag)
        if tag in ("figcaption", "pre"):
            self._in = tag
            self.captions += [""] if tag == "figcaption" else []

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "figcaption":
            self.captions[-1] += data
        elif self._in == "pre":
            self.pre += data


def _cell_files(cfg, cell, manifest, splits, rng) -> None:
    """predictions.csv, metrics.json, an external evaluation and the done marker of a cell."""
    _, spec = manifest.task("abnormal")
    y = pd.Series(encode_labels(manifest, spec), index=manifest.table["image_id"])
    d = cell_dir(cfg, cell)
    (d / "external" / "same").mkdir(parents=True)
    for ids, where, split in (
        (fold_sets(splits, cell.fold, cell.fraction)["test"], d, "test"),
        (list(y.index), d / "external" / "same", "external"),
    ):
        truth = y.loc[ids].to_numpy()
        signal = INITS[cell.init_label] * (2 * truth - 1) + rng.normal(0, 1, len(ids))
        score = 1 / (1 + np.exp(-signal))
        frame = pd.DataFrame(
            {"image_id": ids, "fold": cell.fold, "split": split, "y_true": truth,
             "score_0": 1 - score, "score_1": score}
        )  # fmt: skip
        frame.to_csv(where / "predictions.csv", index=False)
        metrics = {"auroc": binary_auroc(truth, score)}
        key = "test" if split == "test" else "external"
        body = {key: metrics, "labelled": labelled_counts(splits, cell.fold, cell.fraction)}
        write_json(where / "metrics.json", body if split == "test" else {key: metrics})
    (d / "done").write_text(fingerprint(cfg, cell))


def _explain_files(out: Path, manifest) -> None:
    """What `fundusfm explain gradcam` / `tsne` would write under OUT/explain."""
    ids = list(manifest.table["image_id"][:3])
    for init in ("scratch", "fundus"):
        folder = out / "explain" / "gradcam" / init
        (folder / "overlays").mkdir(parents=True)
        for i in ids:
            Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "overlays" / f"{i}_1.png")
        rows = [{"image": i, "class": "1", "probability": 0.9, "road": 0.1} for i in ids]
        pd.DataFrame(rows).to_csv(folder / "gradcam.csv", index=False)
        write_json(folder / "summary.json", {"maps": 3, "unreadable": 0, "road_mean": 0.1})
    tsne = out / "explain" / "tsne"
    tsne.mkdir(parents=True)
    Image.new("RGB", (120, 60), (255, 255, 255)).save(tsne / "tsne.png")
    pd.DataFrame([{"model": "scratch", "silhouette_features": 0.12345}]).to_csv(
        tsne / "separation.csv", index=False
    )


@pytest.fixture(scope="module")
def tiny_report(synth_set: Path, tmp_path_factory) -> dict:
    """A 3-init x 2-fraction x 3-fold LF grid written by hand, one cell missing, with an
    external set and explain outputs; its report built once."""
    root = tmp_path_factory.mktemp("tiny_report")
    split_cfg = SplitConfig(folds=3, fractions=[0.5, 1.0], val_fraction=0.2, task="abnormal")
    splits, _ = write_splits(synth_set, split_cfg, root / "splits.csv")
    sets = {
        "name": "tiny", "out": root / "g", "base.data.manifest": synth_set,
        "base.data.splits": root / "splits.csv", "base.data.task": "abnormal",
        "axes.init": "[scratch, imagenet, fundus]", "axes.method": "[lf]",
        "axes.resolution": "[64]", "axes.fraction": "[0.5, 1.0]", "axes.fold": "[0, 1, 2]",
        "external": str([{"name": "same", "manifest": str(synth_set), "task": "abnormal"}]),
    }  # fmt: skip
    cfg = load_config(GridConfig, None, [f"{k}={v}" for k, v in sets.items()])
    manifest, rng = load_manifest(synth_set), np.random.default_rng(0)
    for cell in expand(cfg):
        if (cell.init_label, cell.fraction, cell.fold) != MISSING:
            _cell_files(cfg, cell, manifest, splits, rng)
    _explain_files(root / "g", manifest)
    path = build_report(cfg, n_boot=50)
    text = path.read_text(encoding="utf-8")
    return {"cfg": cfg, "out": path.parent, "text": text, "page": Page(text)}


def test_report_has_every_section_and_needs_no_network(tiny_report):
    page = tiny_report["page"]
    assert page.ids == [
        "headline", "figures", "tables", "external", "gradcam", "tsne", "methods", "incomplete"
    ]  # fmt: skip
    assert page.srcs and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert "<script" not in tiny_report["text"] and "http" not in "".join(page.srcs)
    # captions say in words what is drawn, never a file name; the curves carry their CI
    figures = [c for c in page.captions if len(c) > 80]
    assert len(figures) >= 3 and not any(".png" in c for c in page.captions)
    assert any("fraction" in c and "95% percentile bootstrap interval" in c for c in figures)
    assert any(c.startswith("scratch") is False and "probability 0.900" in c for c in page.captions)
    assert "0.123" in tiny_report["text"] and "0.12345" not in tiny_report["text"]


def test_headline_names_the_best_init_with_its_interval_and_holm(tiny_report):
    out, text = tiny_report["out"], tiny_report["text"]
    summary = pd.read_csv(out / "summary.csv")
    top = summary[summary.fraction == 1.0].sort_values("pooled_auroc").iloc[-1]
    assert top.init == "fundus"  # the strongest signal wins
    shown = (
        f"{top.pooled_auroc:.3f} [{top.pooled_auroc_ci_low:.3f}, {top.pooled_auroc_ci_high:.3f}]"
    )
    assert INTERVAL.fullmatch(shown)
    headline = text[text.index('id="headline"') : text.index('id="figures"')]
    assert f"Best initialisation by pooled out-of-fold test AUROC: fundus, {shown}" in headline
    assert "labelled fraction 1" in headline and "3 pairwise comparisons" in headline
    comparisons = pd.read_csv(out / "comparisons.csv")
    assert list(comparisons.columns) == [*COMPARISON_COLUMNS, "p_holm"]
    (half,) = comparisons[comparisons.fraction == 0.5].itertuples()  # fundus lacks a fold
    assert {half.init_a, half.init_b} == {"scratch", "imagenet"} and half.p_holm == half.p_value
    full = comparisons[comparisons.fraction == 1.0]
    p = full.p_value.to_numpy()
    order = np.argsort(p)
    steps = np.maximum.accumulate(np.array([3, 2, 1]) * p[order])  # Holm by hand, m = 3
    want = np.empty(3)
    want[order] = np.minimum(steps, 1)
    np.testing.assert_allclose(full.p_holm, want)
    assert (comparisons.p_holm >= comparisons.p_value).all()
    for r in full.itertuples():
        shown_p = "<0.001" if r.p_holm < 0.001 else f"{r.p_holm:.3f}"
        assert html.escape(shown_p) in headline
    assert CLUSTERED_DELONG in headline or DELONG in headline


def test_methods_paragraph_states_the_grids_protocol(tiny_report):
    methods = tiny_report["page"].pre
    assert "40 images of 20 patients were split by patient into 3 folds" in methods
    assert "stratified on the abnormal labels (split seed 0)" in methods
    assert "Labelled fractions 0.5, 1 of each fold's training pool" in methods
    assert "64 px" in methods and "50 resamples" in methods and "Holm's step-down" in methods
    assert "scratch (random initialisation)" in methods and "external set(s) same" in methods
    assert "Grad-CAM" in methods and "t-SNE" in methods
    incomplete = tiny_report["text"].split('id="incomplete"')[1]
    assert "init=fundus method=lf resolution=64 fraction=0.5: 2/3 folds (pending: 2)" in incomplete


def test_curves_draw_a_ci_band_per_init():
    summary = pd.DataFrame(
        [
            {**COORDS, "init": i, "fraction": f, "pooled_auroc": 0.7, "pooled_auroc_ci_low": 0.6,
             "pooled_auroc_ci_high": 0.8, "complete": True}
            for i in ("a", "b") for f in (0.5, 1.0)
        ]
    )  # fmt: skip
    fig, ax = plt.subplots()
    _curves(ax, summary, "fraction", "pooled_auroc")
    assert len(ax.lines) == 2 and len(ax.collections) == 2  # a line and a band per init
    plt.close(fig)
    assert interval(0.8734, 0.81249, 0.9211) == "0.873 [0.812, 0.921]"
    assert interval(0.5, np.nan, 0.6) == "0.500 [no CI]" and p_value(0.0004) == "<0.001"
