"""The two lists of the screening report (`screen.report`): the scored images as a table
the page's script sorts and filters (one row per image: thumbnail, Grad-CAM overlay under
`--gradcam`, file, decision, probabilities to three decimals, shift), and the images not
scored, grouped by status and under each reason with its count.

Every row carries `data-file`, `data-decision` and `data-shift` for the filters, and every
number cell its value in `data-value`, so the script sorts numbers as numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd

from fundusfm.models.loaded import Bundle
from fundusfm.screen.report_page import esc

NOT_SCORED = ("ungradable", "unreadable", "unsupported")
UNGRADABLE_SHARE = 0.25  # of the thumbnails kept for ungradable images (`report.thumbnail_order`)


def tone(bundle: Bundle, decision) -> str:
    """The colour of a scored row: `neg` for normal (a binary bundle's first class, a class
    named normal, or no label over its threshold), `pos` for any finding."""
    d = cell_text(decision)
    if bundle.kind == "binary":
        return "neg" if d == str(bundle.classes[0]) else "pos"
    return "neg" if d == "" or d.lower() == "normal" else "pos"


@dataclass
class Pictures:
    """Thumbnails and Grad-CAM overlays (data: URIs) by the table's `file`."""

    thumbs: dict[str, str]
    cams: dict[str, str]
    wanted: int  # images that would have had one without the cap
    limit: int
    gradcam: bool


def cell_text(value) -> str:
    """A cell as text: NaN and None (a CSV's empty cell) as ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def img_tag(uri: str | None, alt: str, css: str = "thumb") -> str:
    if not uri:
        return '<span class="note">not shown</span>'
    return f'<img class="{css}" alt="{esc(alt)}" src="{uri}">'


def _columns(scored: pd.DataFrame, bundle: Bundle) -> list[tuple[str, str, str]]:
    """The scored table's (column, header, sort kind) after the pictures; a shift
    percentile no image has (the bundle stores no reference) is left out."""
    cols = [("file", "file", "text"), ("decision", "decision", "text")]
    cols += [(f"p_{c}", f"p_{c}", "num") for c in bundle.classes]
    cols += [("shift", "shift", "text"), ("shift_percentile", "shift percentile", "num")]
    return [c for c in cols if c[0] in scored and scored[c[0]].notna().any()]


def _cell(column: str, value) -> str:
    if column.startswith("p_") or column == "shift_percentile":
        v = float(value) if cell_text(value) else math.nan
        if math.isnan(v):
            return '<td class="num" data-value=""></td>'
        shown = f"{v:.1f}%" if column == "shift_percentile" else f"{v:.3f}"
        return f'<td class="num" data-value="{v:.6g}">{shown}</td>'
    text = cell_text(value)
    css = ' class="decision"' if column == "decision" else ""
    css = ' class="flag"' if column == "shift" and text == "shifted" else css
    return f"<td{css}>{esc(text)}</td>"


def _row(row: pd.Series, cols, bundle: Bundle, pics: Pictures) -> str:
    f = str(row["file"])
    cells = [f"<td>{img_tag(pics.thumbs.get(f), f'thumbnail of {f}')}</td>"]
    if pics.gradcam:
        cells.append(f"<td>{img_tag(pics.cams.get(f), f'Grad-CAM of {f}', 'thumb cam')}</td>")
    cells += [_cell(c, row.get(c)) for c, _, _ in cols]
    data = f'data-file="{esc(f)}" data-decision="{esc(cell_text(row.get("decision")))}"'
    data += f' data-shift="{esc(cell_text(row.get("shift")))}"'
    return f'<tr class="{tone(bundle, row.get("decision"))}" {data}>{"".join(cells)}</tr>'


def _filters(scored: pd.DataFrame) -> str:
    options = ['<option value="">every decision and shift</option>']
    for d in sorted({cell_text(v) for v in scored.get("decision", [])}):
        options.append(
            f'<option value="decision={esc(d)}">decision: {esc(d or "no label")}</option>'
        )
    for s in sorted({cell_text(v) for v in scored.get("shift", [])} - {""}):
        options.append(f'<option value="shift={esc(s)}">shift: {esc(s)}</option>')
    return (
        '<div class="filters"><input id="filter" type="search" placeholder="filter by file name" '
        f'aria-label="filter by file name"><select id="pick" aria-label="decision or shift">'
        f"{''.join(options)}</select>"
        f'<span id="shown">{len(scored)} of {len(scored)} shown</span></div>'
    )


def _cap_note(pics: Pictures) -> str:
    if pics.wanted <= pics.limit:
        return ""
    return (
        f'<p class="note">Thumbnails are shown for {pics.limit} of the {pics.wanted} scored and '
        "ungradable images only, to keep this page small: the scored images most at risk "
        "(positive decisions first, then the highest abnormal probability), with "
        f"{UNGRADABLE_SHARE:.0%} of them kept for ungradable images; every image is listed.</p>"
    )


def scored_section(table: pd.DataFrame, bundle: Bundle, pics: Pictures) -> str:
    """The scored images: thumbnails, decision, probabilities, shift; sortable, filterable."""
    scored = table[table["status"] == "scored"]
    head = f'<section id="scored"><h2>Scored images ({len(scored)})</h2>'
    if scored.empty:
        return head + '<p class="note">No image was scored.</p></section>'
    cols = _columns(scored, bundle)
    pictures_head = "<th>image</th>" + ("<th>Grad-CAM</th>" if pics.gradcam else "")
    heads = "".join(f'<th data-sort="{kind}">{esc(name)}</th>' for _, name, kind in cols)
    rows = "".join(_row(r, cols, bundle, pics) for _, r in scored.iterrows())
    return (
        head
        + '<p class="note">Click a header to sort; green: normal, red: a finding.</p>'
        + _cap_note(pics)
        + _filters(scored)
        + f'<table id="scored-table" class="scored"><thead><tr>{pictures_head}{heads}</tr>'
        + f"</thead><tbody>{rows}</tbody></table></section>"
    )


def reason_group(reason: str) -> str:
    """The heading a reason is listed under: each of its parts without the details in
    brackets, figures as N (`under-exposed (brightness 0.03)` -> `under-exposed`)."""
    parts = [p.split(" (", 1)[0].strip() for p in cell_text(reason).split("; ")]
    words = "; ".join(p for p in parts if p) or "no reason recorded"
    return re.sub(r"\d[\d.,]*\d|\d", "N", words)


def not_scored_section(table: pd.DataFrame, pics: Pictures) -> str:
    """The images not scored, by status, then under each reason with its count."""
    rest = table[table["status"].isin(NOT_SCORED)]
    parts = [f'<section id="not-scored"><h2>Not scored ({len(rest)})</h2>']
    if rest.empty:
        parts.append('<p class="note">Every image was scored.</p>')
    for status in NOT_SCORED:
        rows = rest[rest["status"] == status]
        reasons = rows["reason"] if "reason" in rows else pd.Series("", index=rows.index)
        groups = rows.groupby(reasons.map(reason_group), sort=False)
        for name, group in sorted(groups, key=lambda g: (-len(g[1]), g[0])):
            parts.append(
                f'<h3 class="group {status}" data-status="{status}" data-count="{len(group)}">'
                f'{status}: {esc(name)} ({len(group)})</h3><ul class="files">'
            )
            parts += [_file_item(r, pics) for _, r in group.iterrows()]
            parts.append("</ul>")
    return "".join(parts) + "</section>"


def _file_item(row: pd.Series, pics: Pictures) -> str:
    f = str(row["file"])
    picture = (
        img_tag(pics.thumbs.get(f), f"thumbnail of {f}") if row["status"] == "ungradable" else ""
    )
    return (
        f'<li data-file="{esc(f)}">{picture}<span><strong>{esc(f)}</strong><br>'
        f'<span class="note">{esc(cell_text(row.get("reason")))}</span></span></li>'
    )
