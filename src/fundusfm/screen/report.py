"""The screening report (`DIR/report.html` of `fundusfm predict`): one page a person reads.

Top to bottom: the bundle's card (the description, training data and evaluation sections of
`card.card_overview`, the words `fundusfm weights info` prints, with the run's metrics from
`weights.card_metrics`), the decision threshold and whether it was validated, the engine and
the notes; counts per status (scored images per decision, ungradable, unreadable,
unsupported, and how many scored images are shifted); a histogram of the abnormal
probability with the threshold drawn (binary: `p_<classes[1]>`; multiclass and multilabel:
one per class, with each label's threshold for multilabel and none for multiclass, which
decides by the highest probability); the scored images as a table sortable by a click on a
header and filterable by file name and decision or shift, each row with a thumbnail of the
image as the bundle sees it (its FOV crop, 96 px) and, under `--gradcam`, that row's
Grad-CAM overlay; last, the images not scored grouped by status and reason.

The page opens with what was screened: the input folder as given, when (local ISO time) and
the fundusfm version. It is one offline file (images as data: URIs, style and script inline;
`report_page`) in UTF-8, every user-provided string escaped. At most `THUMBNAILS` images get
a thumbnail, so a folder of 10,000 stays a page of a few MB, and they go first to the images a
person must look at (`thumbnail_order`): a quarter of the limit is kept for ungradable images
(more when fewer scored images need one), the rest goes to the scored images by risk,
positive decisions first, then the highest abnormal probability (binary: `p_<classes[1]>`;
multiclass and multilabel: the highest probability of a class not named normal), ties by
file name. The page says so when the limit is reached. A thumbnail that cannot be made is
left out: it never fails the report.
"""

from __future__ import annotations

import base64
import io
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from fundusfm import __version__
from fundusfm.card import card_overview
from fundusfm.config.core import PreprocessConfig
from fundusfm.data.preprocess import crop_resize, decode_for
from fundusfm.io import write_text_atomic
from fundusfm.models.loaded import Bundle
from fundusfm.screen.report_page import (
    esc,
    fmt_threshold,
    histogram_svg,
    markdown_html,
    page,
    threshold_words,
)
from fundusfm.screen.report_tables import (
    NOT_SCORED,
    UNGRADABLE_SHARE,
    Pictures,
    cell_text,
    not_scored_section,
    scored_section,
    tone,
)
from fundusfm.weights import shown_metrics

THUMBNAILS = 500  # images that get a thumbnail (`thumbnail_order`)
THUMB_SIDE = 96
CHECKED = ("in-distribution", "shifted")  # `shift` values of images compared with a reference


def write_report(
    table: pd.DataFrame,
    out: Path,
    bundle: Bundle,
    notes: list[str],
    engine: str = "",
    sources: dict[str, Path] | None = None,
    gradcams: dict[str, Path] | None = None,
    limit: int = THUMBNAILS,
    folder: Path | str | None = None,
    when: datetime | None = None,
) -> Path:
    """Write `out/report.html` for a predictions table (see the module docstring).

    `sources` maps a row's `file` to the file it was read from (thumbnails), `gradcams` to
    its Grad-CAM overlay; rows missing from either get no picture. `folder` is the screened
    folder as the user gave it, `when` the time of the screening (default: now)."""
    pics = pictures(table, bundle, sources or {}, gradcams, limit)
    body = "".join(
        [
            run_line(folder, when or datetime.now()),
            _nav(),
            card_section(bundle, notes, engine),
            counts_section(table, bundle),
            histogram_section(table, bundle),
            scored_section(table, bundle, pics),
            not_scored_section(table, pics),
        ]
    )
    return write_text_atomic(Path(out) / "report.html", page("fundusfm screening report", body))


def run_line(folder: Path | str | None, when: datetime) -> str:
    """What was screened, when (local time, ISO 8601) and by which fundusfm."""
    stamp = when.astimezone().isoformat(timespec="seconds")
    screened = f"<code>{esc(folder)}</code>" if folder is not None else "a folder not named"
    return (
        f'<p class="run">Screened {screened} on <time datetime="{stamp}">{stamp}</time> '
        f"with fundusfm {esc(__version__)}.</p>"
    )


def _nav() -> str:
    links = [("card", "model"), ("counts", "counts"), ("histogram", "histogram")]
    links += [("scored", "scored images"), ("not-scored", "not scored")]
    return "<nav>" + " · ".join(f'<a href="#{i}">{t}</a>' for i, t in links) + "</nav>"


def _uri(img: Image.Image, fmt: str) -> str:
    buf, img = io.BytesIO(), img.convert("RGB")
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=80)
    else:  # a heat map: 128 colours keep it and halve the bytes of a full-colour PNG
        img.quantize(128, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail(path: Path | None, pre: PreprocessConfig | None, side: int = THUMB_SIDE):
    """The image as the bundle sees it (its FOV crop, square) at `side` px as a JPEG data:
    URI, decoded at reduced size (JPEG draft); None when it cannot be made."""
    if path is None or pre is None:
        return None
    try:
        small = pre.model_copy(update={"resolution": side})
        rgb, _ = decode_for(Path(path), small)
        try:
            img = Image.fromarray(crop_resize(rgb, small)[0])
        except Exception:  # no field of view to crop to (ungradable): the whole frame
            img = ImageOps.pad(Image.fromarray(rgb), (side, side))
        return _uri(img, "JPEG")
    except Exception:  # a thumbnail is never worth failing the report
        return None


def overlay_uri(path: Path | None, side: int = THUMB_SIDE):
    """A Grad-CAM overlay shrunk to `side` px, as a PNG data: URI (lossless, 128 colours)."""
    if path is None:
        return None
    try:
        with Image.open(path) as img:
            img.thumbnail((side, side))
            return _uri(img, "PNG")
    except Exception:
        return None


def _thumb_config(bundle: Bundle) -> PreprocessConfig | None:
    try:
        return bundle.preprocessing.config()
    except Exception:  # a bundle without a FOV crop: no thumbnails rather than no report
        return None


def pictures(table, bundle: Bundle, sources: dict, gradcams: dict | None, limit: int) -> Pictures:
    """Thumbnails (and overlays of scored images) of the images `thumbnail_order` chooses."""
    scored, ungradable = _files(table, "scored"), _files(table, "ungradable")
    chosen = thumbnail_order(table, bundle, limit)
    pre, cams, scored_set = _thumb_config(bundle), gradcams or {}, set(scored)
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decodes without the GIL
        thumbs = list(pool.map(lambda f: thumbnail(sources.get(f), pre), chosen))
        overlays = list(
            pool.map(lambda f: overlay_uri(cams.get(f)) if f in scored_set else None, chosen)
        )
    return Pictures(
        {f: t for f, t in zip(chosen, thumbs, strict=True) if t},
        {f: c for f, c in zip(chosen, overlays, strict=True) if c},
        len(scored) + len(ungradable),
        limit,
        gradcams is not None,
    )


def thumbnail_order(table: pd.DataFrame, bundle: Bundle, limit: int) -> list[str]:
    """The files that get a thumbnail: up to `limit`, a `UNGRADABLE_SHARE` of it (at least
    one) kept for ungradable images, more when fewer scored images need one; the rest
    scored images by `risk`, highest first (see the module docstring)."""
    ungradable = _files(table, "ungradable")
    rows = table[table["status"] == "scored"]
    risks = risk(rows, bundle)
    ranked = sorted(zip(rows["file"].astype(str), risks, strict=True), key=lambda r: (-r[1], r[0]))
    keep = min(len(ungradable), max(math.ceil(limit * UNGRADABLE_SHARE), limit - len(ranked)))
    return [f for f, _ in ranked[: max(limit - keep, 0)]] + ungradable[:keep]


def risk(scored: pd.DataFrame, bundle: Bundle) -> list[float]:
    """How much each scored row needs a person's look, for ordering: 1 + its abnormal
    probability when decided positive, else that probability (binary: `p_<classes[1]>`,
    otherwise the highest `p_` of a class not named normal); no probability counts as 0."""
    classes = [str(c) for c in bundle.classes]
    found = (
        classes[1:2] if bundle.kind == "binary" else [c for c in classes if c.lower() != "normal"]
    )
    columns = [f"p_{c}" for c in found if f"p_{c}" in scored]
    probs = scored[columns].apply(pd.to_numeric, errors="coerce") if columns else None
    p = probs.max(axis=1).fillna(0.0) if probs is not None else pd.Series(0.0, scored.index)
    decided = scored.get("decision", pd.Series(None, index=scored.index, dtype=object))
    positive = [tone(bundle, d) == "pos" for d in decided]
    return [float(v) + float(pos) for v, pos in zip(p, positive, strict=True)]


def _files(table: pd.DataFrame, status: str) -> list[str]:
    return [str(f) for f in table.loc[table["status"] == status, "file"]]


def cuts(bundle: Bundle) -> dict[str, tuple[float, bool] | None]:
    """The probability columns the histograms show, each with its (threshold, validated)
    (binary: the positive class; multilabel: every label; multiclass: every class, no cut)."""
    classes, cut = [str(c) for c in bundle.classes], bundle.thresholds
    ok = bundle.thresholds_validated and bool(cut)  # none stored: 0.5, not validated
    if bundle.kind == "binary":
        return {classes[1]: (cut[0] if cut else 0.5, ok)}
    if bundle.kind == "multilabel":
        cut = cut if len(cut) == len(classes) else [0.5] * len(classes)
        return {c: (t, ok) for c, t in zip(classes, cut, strict=True)}
    return dict.fromkeys(classes)


def _threshold_line(bundle: Bundle) -> str:
    drawn = cuts(bundle)
    if bundle.kind == "multiclass":
        return "Decision: the class of highest probability (multiclass: no threshold)."
    if bundle.kind == "binary":
        ((positive, (cut, ok)),) = drawn.items()
        return (
            f"Decision: {esc(positive)} when p_{esc(positive)} ≥ {fmt_threshold(cut)}, at the "
            f"bundle's <strong>{esc(threshold_words(cut, ok))}</strong>."
        )
    each = ", ".join(f"{esc(c)}: {esc(threshold_words(t, v))}" for c, (t, v) in drawn.items())
    return f"Decisions: every label at or over its own threshold ({each})."


def card_section(bundle: Bundle, notes: list[str], engine: str) -> str:
    """The bundle's card, its threshold, the bundle's path, the engine and the notes."""
    metrics, unread = shown_metrics(bundle.path, bundle.meta)
    parameters = sum(p.numel() for p in bundle.model.parameters())
    card = markdown_html(card_overview(bundle.meta, parameters, metrics))
    said = "".join(f"<li>{esc(n)}</li>" for n in [*notes, *unread])
    return (
        '<section id="card"><h2>The model</h2>'
        f'<p class="threshold">{_threshold_line(bundle)}</p>'
        f"<p>bundle: <code>{esc(bundle.path)}</code><br>engine: {esc(engine or 'torch')}</p>"
        + (f"<h3>Notes</h3><ul>{said}</ul>" if said else "")
        + f'<div class="card">{card}</div></section>'
    )


def _decision_counts(table: pd.DataFrame, bundle: Bundle) -> dict[str, int]:
    scored = table[table["status"] == "scored"]
    found = [cell_text(d) for d in scored.get("decision", pd.Series(dtype=object))]
    order = [str(c) for c in bundle.classes] if bundle.kind != "multilabel" else []
    counts = {d: found.count(d) for d in order}
    counts.update({d: found.count(d) for d in sorted(set(found) - set(order))})
    return counts


def counts_section(table: pd.DataFrame, bundle: Bundle) -> str:
    """Counts per status (scored per decision) in the status colours, shifted images flagged."""
    items = [
        f'<li class="{tone(bundle, d)}" data-status="scored" data-decision="{esc(d)}" '
        f'data-count="{n}">scored, {esc(d or "no label")}: {n}</li>'
        for d, n in _decision_counts(table, bundle).items()
    ]
    for status in NOT_SCORED:
        n = int((table["status"] == status).sum())
        items.append(
            f'<li class="{status}" data-status="{status}" data-count="{n}">{status}: {n}</li>'
        )
    if "shift" in table:
        n, checked = int((table["shift"] == "shifted").sum()), table["shift"].isin(CHECKED).any()
        said = f"{n}" if checked else "not checked (no reference in the bundle)"
        items.append(
            f'<li class="shifted" data-shift="shifted" data-count="{n}">'
            f"shifted (scored, unlike the validation images): {said}</li>"
        )
    scored = int((table["status"] == "scored").sum())
    return (
        f'<section id="counts"><h2>Counts</h2><p>{len(table)} files, {scored} scored; every '
        f'row is in <a href="predictions.csv">predictions.csv</a>.</p>'
        f'<ul class="counts">{"".join(items)}</ul></section>'
    )


def _histogram_caption(bundle: Bundle, n: int) -> str:
    if bundle.kind == "binary":
        ((positive, (cut, ok)),) = cuts(bundle).items()
        return (
            f"The abnormal probability (p_{esc(positive)}) of the {n} scored images, 20 bins; the "
            f"dashed line is the {esc(threshold_words(cut, ok))}: images at or over it are "
            f"called {esc(positive)} (red)."
        )
    if bundle.kind == "multilabel":
        return (
            f"One histogram per label (p_&lt;label&gt;) of the {n} scored images, each with "
            "its own threshold."
        )
    return (
        f"One histogram per class (p_&lt;class&gt;) of the {n} scored images; a multiclass bundle "
        "decides by the highest probability, so no threshold is drawn."
    )


def histogram_section(table: pd.DataFrame, bundle: Bundle) -> str:
    """Histograms of the scored images' probabilities, the decision threshold drawn."""
    scored = table[table["status"] == "scored"]
    head = '<section id="histogram"><h2>Probabilities</h2>'
    if scored.empty:
        return head + '<p class="note">No image was scored.</p></section>'
    figures = []
    for c, cut in cuts(bundle).items():
        column = scored[f"p_{c}"] if f"p_{c}" in scored else pd.Series(dtype=float)
        values = pd.to_numeric(column, errors="coerce").dropna().clip(0, 1).tolist()
        words = threshold_words(*cut) if cut else ""
        svg = histogram_svg(values, f"p_{c}", cut[0] if cut else None, words)
        figures.append(f"<figure>{svg}</figure>")
    caption = f"<p>{_histogram_caption(bundle, len(scored))}</p>"
    return head + "".join(figures) + caption + "</section>"
