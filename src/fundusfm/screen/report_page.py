"""The HTML pieces of the screening report (`screen.report`): the page shell with its style
and script, the card's Markdown as HTML, and the histogram as inline SVG.

Everything here is offline and self-contained: no file, font or script is fetched from
elsewhere, and every string that came from a user (file names, reasons, class names, notes)
passes through `esc`. The script sorts the scored table by a clicked header (`data-sort`:
`num` compares `data-value` as numbers, empty last; `text` compares the cell's text) and
filters it by file name (`data-file`) and by one `data-<key>` of the row (the select's
`key=value` options).
"""

from __future__ import annotations

import html
import re

# The status and decision colours of the report (and of `fundusfm serve`'s page): a class
# `.pos` sets `--c`, which the counts, rows, histogram bars and group headings draw with.
TONES = {
    "pos": "#c62828",
    "neg": "#2e7d32",
    "ungradable": "#ef6c00",
    "unreadable": "#616161",
    "unsupported": "#78909c",
    "shifted": "#6a1b9a",
}
TONE_RULES = "".join(f".{name}{{--c:{colour}}}" for name, colour in TONES.items())
TONE_ROOT = ":root{" + "".join(f"--{name}:{colour};" for name, colour in TONES.items()) + "}"

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
.note{color:#555}.card{background:#f6f7f9;padding:.6em 1.2em;border-radius:6px}
.card h3{margin:.8em 0 .3em}.card table,table.scored{border-collapse:collapse;font-size:13px}
.card td,.card th{border:1px solid #ccc;padding:2px 6px}code{background:#eee;padding:0 3px}
.threshold{font-size:1.1em}.counts{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:8px}
.counts li{padding:6px 12px;border-radius:4px;color:#fff;font-weight:600}
.counts li{background:var(--c)}
table.scored th,table.scored td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}
table.scored th[data-sort]{cursor:pointer;user-select:none;background:#f0f0f0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
table.scored tr td:first-child{border-left:6px solid var(--c)}td.num{text-align:right}
.decision{color:var(--c);font-weight:600}.flag{color:var(--shifted);font-weight:600}
.filters{margin:.6em 0;display:flex;gap:10px;align-items:center}
.files{list-style:none;padding:0}.files li{margin:4px 0;display:flex;gap:10px;align-items:center}
h3.group{color:var(--c)}img.thumb{width:96px;height:96px;border-radius:3px}
figure{margin:.5em 1em .5em 0;display:inline-block;vertical-align:top}
"""

SCRIPT = """
(function () {
  var table = document.getElementById("scored-table");
  if (!table) return;
  var body = table.tBodies[0], text = document.getElementById("filter");
  var pick = document.getElementById("pick"), shown = document.getElementById("shown");
  var heads = table.tHead.rows[0].cells;
  function key(row, i, num) {
    var cell = row.cells[i], v = cell.getAttribute("data-value");
    if (v === null) v = cell.textContent;
    return num ? (v === "" ? NaN : parseFloat(v)) : v.toLowerCase();
  }
  function sort(th, i) {
    var num = th.getAttribute("data-sort") === "num";
    var up = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a, i, num), y = key(b, i, num);
      if (num && isNaN(x)) return isNaN(y) ? 0 : 1;
      if (num && isNaN(y)) return -1;
      var d = num ? x - y : x.localeCompare(y);
      return up ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    if (!th.hasAttribute("data-sort")) return;
    th.tabIndex = 0;
    th.addEventListener("click", function () { sort(th, i); });
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") sort(th, i); });
  });
  function apply() {
    var q = text.value.toLowerCase(), sel = pick.value, cut = sel.indexOf("="), n = 0;
    Array.prototype.forEach.call(body.rows, function (r) {
      var ok = r.getAttribute("data-file").toLowerCase().indexOf(q) >= 0 &&
        (cut < 0 || r.getAttribute("data-" + sel.slice(0, cut)) === sel.slice(cut + 1));
      r.hidden = !ok;
      if (ok) n++;
    });
    shown.textContent = n + " of " + body.rows.length + " shown";
  }
  text.addEventListener("input", apply);
  pick.addEventListener("change", apply);
})();
"""


def esc(text) -> str:
    """Any value as HTML text or attribute content (quotes included)."""
    return html.escape(str(text), quote=True)


def page(title: str, body: str) -> str:
    """The whole page: one file, its style and script inline."""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{TONE_ROOT}{TONE_RULES}{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1>{body}<script>{SCRIPT}</script></body></html>"
    )


def _inline(text: str) -> str:
    """One line of the card's Markdown: escaped, then **bold** and `code`."""
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(text))
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _table(rows: list[str]) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
    rows_html = "".join(
        "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>"


def _block(lines: list[str]) -> str:
    first = lines[0]
    if first.startswith("#"):
        level = min(len(first) - len(first.lstrip("#")) + 1, 5)
        return f"<h{level}>{_inline(first.lstrip('#').strip())}</h{level}>"
    if first.startswith("|"):
        return _table(lines)
    if first.startswith("- "):
        return "<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines) + "</ul>"
    return f"<p>{_inline(' '.join(lines))}</p>"


def markdown_html(text: str) -> str:
    """The card's Markdown (headings, bullets, pipe tables, paragraphs) as HTML."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        kind = _kind(line)
        if not line.strip():
            blocks.append([])
        elif blocks and blocks[-1] and kind != "#" and _kind(blocks[-1][0]) == kind:
            blocks[-1].append(line)
        else:
            blocks.append([line])
    return "".join(_block(b) for b in blocks if b)


def _kind(line: str) -> str:
    return line[:1] if line[:1] in "#|" else ("-" if line.startswith("- ") else "p")


# The histogram's size and margins, px: under the plot the tick labels (baseline TICK_Y below
# the axis) and then the axis label (LABEL_Y below it), with room for its descenders.
W, LEFT, TOP, PLOT_H, FONT = 440, 40, 22, 138, 11
TICK_Y, LABEL_Y, BOTTOM = 14, 32, 44
H = TOP + PLOT_H + BOTTOM


def _x(v: float) -> float:
    return LEFT + v * (W - LEFT - 10)


def bin_counts(values: list[float], cut: float | None, bins: int) -> list[tuple[int, int]]:
    """Per bin of [0, 1], the images under `cut` and those at or over it (decided positive);
    with no cut every image counts as under it."""
    counts = [[0, 0] for _ in range(bins)]
    for v in values:
        counts[min(int(v * bins), bins - 1)][int(cut is not None and v >= cut)] += 1
    return [(neg, pos) for neg, pos in counts]


def _rect(i: int, bins: int, css: str, n: int, below: int, top: int, words: str) -> str:
    lo, width, h = i / bins, (W - LEFT - 10) / bins, PLOT_H * n / top
    y = TOP + PLOT_H - PLOT_H * below / top - h
    tip = f"{lo:.2f}-{lo + 1 / bins:.2f}: {n} images{words}"
    return (
        f'<rect class="{css}" style="fill:var(--c)" data-bin="{i}" data-count="{n}" '
        f'x="{_x(lo) + 0.5:.1f}" y="{y:.1f}" width="{width - 1:.1f}" height="{h:.1f}">'
        f"<title>{tip}</title></rect>"
    )


def _bars(counts: list[tuple[int, int]], cut: float | None) -> list[str]:
    """One bar per bin, stacked where the threshold cuts it: the images under the threshold
    (neg) at the bottom, those at or over it (pos) on top, so each is in its decision's colour."""
    top, bins = max(max(neg + pos for neg, pos in counts), 1), len(counts)
    parts = []
    for i, (neg, pos) in enumerate(counts):
        if cut is None:
            parts.append(_rect(i, bins, "neg", neg, 0, top, ""))
            continue
        if neg:
            parts.append(_rect(i, bins, "neg", neg, 0, top, ", under the threshold"))
        elif not pos:  # an empty bin: a bar of no height, in the colour of its side
            parts.append(_rect(i, bins, "neg" if (i + 1) / bins <= cut else "pos", 0, 0, top, ""))
        if pos:
            parts.append(_rect(i, bins, "pos", pos, neg, top, ", at or over the threshold"))
    parts.append(f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{top}</text>')
    return parts


def histogram_svg(
    values: list[float], label: str, cut: float | None = None, cut_label: str = "", bins: int = 20
) -> str:
    """A histogram of probabilities in [0, 1] as inline SVG (`label` under the x axis), with
    `cut` drawn as a dashed line named `cut_label`; each image in its decision's colour
    (positive at or over `cut`), a bin the line cuts split in two (`_bars`)."""
    base = TOP + PLOT_H
    parts = _bars(bin_counts(values, cut, bins), cut)
    parts += [
        f'<line x1="{LEFT}" y1="{base}" x2="{W - 10}" y2="{base}" stroke="#333"/>',
        f'<text x="{LEFT - 4}" y="{base}" text-anchor="end">0</text>',
        *(
            f'<text x="{_x(t):.1f}" y="{base + TICK_Y}" text-anchor="middle">{t:g}</text>'
            for t in (0, 0.25, 0.5, 0.75, 1)
        ),
        f'<text class="axis" x="{(W + LEFT) / 2}" y="{base + LABEL_Y}" text-anchor="middle">'
        f"{esc(label)}</text>",
        f'<text transform="translate(12 {(TOP + base) / 2}) rotate(-90)" '
        'text-anchor="middle">images</text>',
    ]
    if cut is not None:
        parts.append(_threshold_mark(cut, cut_label))
    return (
        f'<svg class="histogram" role="img" aria-label="histogram of {esc(label)}" '
        f'width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-size="{FONT}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def _threshold_mark(cut: float, words: str) -> str:
    x, base = _x(cut), TOP + PLOT_H
    anchor = "start" if cut < 0.3 else "end" if cut > 0.7 else "middle"
    return (
        f'<line class="threshold" x1="{x:.1f}" y1="{TOP - 4}" x2="{x:.1f}" y2="{base}" '
        f'stroke="#000" stroke-width="2" stroke-dasharray="5,3"/>'
        f'<text class="threshold" x="{x:.1f}" y="{TOP - 8}" text-anchor="{anchor}">'
        f"{esc(words)}</text>"
    )


def fmt_threshold(cut: float) -> str:
    """A threshold as the page writes it everywhere (up to 3 decimals, no trailing zeros)."""
    return f"{cut:.3f}".rstrip("0").rstrip(".") or "0"


def threshold_words(cut: float, validated: bool) -> str:
    """How the page names a decision threshold: `validated threshold T` or
    `threshold T (not validated)`."""
    if validated:
        return f"validated threshold {fmt_threshold(cut)}"
    return f"threshold {fmt_threshold(cut)} (not validated)"
