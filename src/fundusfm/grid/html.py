"""The grid report's HTML page: sections of plain HTML with inline CSS, figures inlined as
base64 PNG, no script, no web font and no link to fetch, so the one file opens offline and
can be mailed or archived beside the paper.

Every number on the page is written by `number`, `interval` or `p_value` (three decimals,
an interval in brackets beside its value), so the page and its tables read the same way.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;"
    "line-height:1.45;color:#222}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;"
    "margin-top:2em}h3{margin-bottom:.3em}table{border-collapse:collapse;font-size:12px;"
    "margin:.5em 0 1em}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}"
    "img{max-width:100%}figure{margin:1em 0 2em}figcaption{font-size:13px;color:#444;"
    "max-width:900px}nav a{margin-right:1em}.sig{font-weight:bold;color:#1a6b1a}"
    ".note{color:#555;font-size:13px}.gallery{display:flex;flex-wrap:wrap;gap:8px}"
    ".gallery figure{margin:0;width:200px}.gallery figcaption{font-size:11px}"
    "pre.methods{white-space:pre-wrap;background:#f6f6f6;padding:1em;border:1px solid #ddd;"
    "font-family:inherit;font-size:14px}"
)
PROTOCOL = (
    "What each number is (folds, labelled shares, pooled figures, patient-bootstrap intervals, "
    "clustered tests, Holm's adjustment) and what may be compared: docs/protocol.md in fundusfm."
)


@dataclass(frozen=True)
class Figure:
    """A figure file with what it shows in words: a title and a caption."""

    path: Path
    title: str
    caption: str


@dataclass(frozen=True)
class Section:
    """One section of the page: its anchor id, its heading and its body (HTML)."""

    id: str
    heading: str
    body: str


def _missing(value) -> bool:
    try:
        return value is None or not np.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def number(value, digits: int = 3) -> str:
    """A figure to `digits` decimals; blank when there is none."""
    return "" if _missing(value) else f"{float(value):.{digits}f}"


def interval(value, low, high, digits: int = 3) -> str:
    """'0.873 [0.812, 0.921]': a value with its interval beside it."""
    if _missing(value):
        return ""
    if _missing(low) or _missing(high):
        return f"{number(value, digits)} [no CI]"
    return f"{number(value, digits)} [{number(low, digits)}, {number(high, digits)}]"


def mean_sd(mean, sd, digits: int = 3) -> str:
    """'0.873 ± 0.021': a mean over folds with its sd (a spread, not an interval)."""
    if _missing(mean):
        return ""
    return (
        number(mean, digits) if _missing(sd) else f"{number(mean, digits)} ± {number(sd, digits)}"
    )


def p_value(p) -> str:
    """A p-value to three decimals, '<0.001' below that; 'n/a' where no test could run."""
    if _missing(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 fold', '3 folds'."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def esc(text) -> str:
    return html.escape(str(text))


def paragraph(text: str, css: str | None = None) -> str:
    """Plain text as one paragraph (escaped)."""
    attr = f' class="{css}"' if css else ""
    return f"<p{attr}>{esc(text)}</p>"


def table(frame: pd.DataFrame) -> str:
    """A table with every float to three decimals (text columns are shown as they are)."""
    if frame.empty:
        return paragraph("(no rows)", "note")
    return frame.to_html(index=False, float_format=number, na_rep="", border=0)


def png_data(path: Path, max_side: int | None = None) -> str:
    """A PNG file as a data: URL; shrunk to `max_side` pixels when given (gallery tiles)."""
    if max_side is None:
        raw = Path(path).read_bytes()
    else:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def figure(fig: Figure) -> str:
    """A figure inlined, its title and caption beneath it."""
    return (
        f'<figure><img alt="{esc(fig.title)}" src="{png_data(fig.path)}"/>'
        f"<figcaption><b>{esc(fig.title)}.</b> {esc(fig.caption)}</figcaption></figure>"
    )


def gallery(tiles: list[tuple[Path, str]], max_side: int = 200) -> str:
    """Small images side by side, each with a one-line caption."""
    parts = [
        f'<figure><img alt="{esc(text)}" src="{png_data(path, max_side)}"/>'
        f"<figcaption>{esc(text)}</figcaption></figure>"
        for path, text in tiles
    ]
    return f'<div class="gallery">{"".join(parts)}</div>'


def page(title: str, intro: str, sections: list[Section]) -> str:
    """The whole page: title, a line on what it is, links to the sections, the sections."""
    nav = " ".join(f'<a href="#{s.id}">{esc(s.heading)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{esc(s.heading)}</h2>{s.body}</section>' for s in sections
    )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>{paragraph(intro, 'note')}<nav>{nav}</nav>{body}</body></html>"
    )
