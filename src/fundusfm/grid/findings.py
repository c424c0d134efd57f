"""What a grid report says in words: the headline (the best init of each setting with its
interval, and which differences survive Holm's adjustment), the tables as they are shown
(three decimals, intervals beside their values) and the list of incomplete groups.

Shared by the classification report (`report`, pooled AUROC) and the segmentation report
(`seg_report`, mean per-image Dice): a `Measure` names the columns each one uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fundusfm.grid.gallery import explain_sentences, gradcam_section, tsne_section
from fundusfm.grid.html import (
    Figure,
    Section,
    count,
    esc,
    figure,
    interval,
    mean_sd,
    number,
    p_value,
    paragraph,
    table,
)
from fundusfm.grid.tables import ALPHA, FAMILY, KEYS, WILCOXON, method_words


@dataclass(frozen=True)
class Measure:
    """The summary column a report ranks inits by (its CI: `<value>_ci_low/_high`), its name
    in words, the columns of the two inits' values and the p-value in its comparisons, the
    test's name where the comparisons do not say it, and the summary's image count."""

    value: str
    name: str
    a: str
    b: str
    p: str
    images: str
    test: str | None = None


AUROC = Measure(
    "pooled_auroc",
    "pooled out-of-fold test AUROC",
    "auroc_a",
    "auroc_b",
    "p_value",
    "pooled_images",
)
DICE = Measure(
    "image_dice", "mean per-image test Dice", "dice_a", "dice_b", "wilcoxon_p", "images", WILCOXON
)


def _where(frame: pd.DataFrame, where: dict) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[np.logical_and.reduce([frame[k] == v for k, v in where.items()])]


def _value(row, m: Measure) -> str:
    return interval(row[m.value], row.get(f"{m.value}_ci_low"), row.get(f"{m.value}_ci_high"))


def pair_rows(pairs: pd.DataFrame, m: Measure) -> pd.DataFrame:
    """Comparisons as shown: the two values, the difference (with its interval where the
    test gives one), the test, raw and Holm-adjusted p and whether that is below ALPHA."""
    rows = []
    for r in pairs.to_dict("records"):
        low, high = r.get("ci_low", np.nan), r.get("ci_high", np.nan)
        diff = interval(r["difference"], low, high).replace(" [no CI]", "")
        rows.append(
            {
                "comparison": f"{r['init_a']} vs {r['init_b']}",
                "a": number(r[m.a]),
                "b": number(r[m.b]),
                "difference (a - b)": diff,
                "test": r.get("test", m.test),
                "images": r["images"],
                "p": p_value(r[m.p]),
                "Holm p": p_value(r["p_holm"]),
                f"significant (Holm p < {ALPHA:g})": "yes" if r["p_holm"] < ALPHA else "no",
                "complete": "yes" if r.get("complete", True) else "no: missing folds",
            }
        )
    return pd.DataFrame(rows)


def _verdict(best: str, pairs: pd.DataFrame, inits: int) -> str:
    """Whether the best init's lead over each other init survives Holm's adjustment."""
    mine = pairs[(pairs.init_a == best) | (pairs.init_b == best)] if len(pairs) else pairs
    if inits < 2:
        return "There is no other initialisation to compare it with here."
    if mine.empty:
        return (
            "It was not compared with the others here: its group or theirs lacks folds "
            "(`grid report --allow-incomplete` compares them, marked)."
        )
    other = np.where(mine.init_a == best, mine.init_b, mine.init_a)
    sig = (mine["p_holm"] < ALPHA).to_numpy()
    won, lost = sorted(other[sig]), sorted(other[~sig])
    if not lost:
        return f"{best} is significantly better than every other initialisation here."
    text = f"{best}'s lead over {', '.join(lost)} is not significant after Holm adjustment"
    return text + (f"; over {', '.join(won)} it is." if won else ".")


def _family_text(pairs: pd.DataFrame, m: Measure) -> str:
    tests = sorted({str(t) for t in pairs.get("test", pd.Series([m.test])).dropna()})
    sig = pairs[pairs["p_holm"] < ALPHA]
    found = (
        "significant after adjustment: "
        + "; ".join(
            f"{r.init_a} vs {r.init_b} (difference {number(r.difference)}, Holm p "
            f"{p_value(r.p_holm)})"
            for r in sig.itertuples()
        )
        if len(sig)
        else "the difference is not significant after adjustment"
        if len(pairs) == 1
        else f"none of the {len(pairs)} differences is significant after adjustment"
    )
    return (
        f"Holm adjustment within one family: the {count(len(pairs), 'pairwise comparison')} of "
        f"initialisations at this task, method, resolution and fraction (test: "
        f"{', '.join(tests) or m.test}); {found}."
    )


def _setting(where: dict, at: pd.DataFrame, pairs: pd.DataFrame, m: Measure) -> str:
    """One setting's block: best init, the others, the comparisons and the family."""
    ranked = at.sort_values(m.value, ascending=False)
    best = ranked.iloc[0]
    share = best.get("share_mean", np.nan)
    realised = f" (realised share {share:.1%})" if np.isfinite(share) else ""
    head = (
        f"{where['task']}, {method_words(where['method'])}, {where['resolution']} px, "
        f"labelled fraction {where['fraction']:g}{realised}"
    )
    missing = "" if best.get("complete", True) else ", missing folds"
    lead = (
        f"Best initialisation by {m.name}: {best.init}, {_value(best, m)} (95% patient-"
        f"bootstrap CI; {int(best[m.images])} images; {int(best.folds)} of "
        f"{int(best.folds_expected)} folds{missing})."
    )
    others = "; ".join(f"{r.init} {_value(r._asdict(), m)}" for r in ranked.iloc[1:].itertuples())
    parts = [
        f"<h3>{esc(head)}</h3>",
        f"<p><b>{esc(lead)}</b> {esc(_verdict(best.init, pairs, len(ranked)))}",
    ]
    parts.append(f"</p>{paragraph('Others: ' + others) if others else ''}")
    if not pairs.empty:
        parts += [table(pair_rows(pairs, m)), paragraph(_family_text(pairs, m), "note")]
    return "".join(parts)


def headline(summary: pd.DataFrame, comparisons: pd.DataFrame, m: Measure) -> str:
    """Per task, method and resolution, at the largest fraction with results: the best init
    with its interval, and every pairwise comparison with raw and Holm-adjusted p."""
    shown = summary[(summary["folds"] > 0) & summary[m.value].notna()]
    blocks = []
    for (task, method, res), g in shown.groupby(["task", "method", "resolution"], sort=False):
        top = g["fraction"].max()
        where = {"task": task, "method": method, "resolution": res, "fraction": top}
        blocks.append(_setting(where, g[g["fraction"] == top], _where(comparisons, where), m))
    if not blocks:
        return paragraph("No group has a finished fold yet: nothing to report.")
    intro = (
        f"For each task, adaptation method and resolution, at the largest labelled fraction "
        f"with results: the best initialisation by {m.name} with its 95% interval (a "
        f"percentile bootstrap over patients), and each pair of initialisations compared on "
        f"the same images, with raw and Holm-adjusted p-values (significant: adjusted p < "
        f"{ALPHA:g}). Every setting is in the tables below."
    )
    return paragraph(intro, "note") + "".join(blocks)


def _coordinates(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The coordinate columns as shown (a fraction as given in the config: 0.5, not 0.500)."""
    view = frame[[k for k in keys if k in frame]].copy().reset_index(drop=True)
    if "fraction" in view:
        view["fraction"] = [f"{v:g}" for v in view["fraction"]]
    return view


def summary_view(summary: pd.DataFrame, m: Measure, extra: dict[str, str]) -> pd.DataFrame:
    """The summary as shown: coordinates, folds, fold mean and sd of `extra` (column stem ->
    label), and the pooled measure with its interval."""
    summary = summary.reset_index(drop=True)
    view = _coordinates(summary, KEYS)
    if "labelled_share" in summary:
        view["labelled share (nominal)"] = summary["labelled_share"]
    view["folds"] = [f"{d}/{e}" for d, e in zip(summary.folds, summary.folds_expected, strict=True)]
    for stem, label in extra.items():
        if f"{stem}_mean" in summary and summary[f"{stem}_mean"].notna().any():
            pairs = zip(summary[f"{stem}_mean"], summary[f"{stem}_sd"], strict=True)
            view[f"{label} (mean \u00b1 sd over folds)"] = [mean_sd(a, b) for a, b in pairs]
    view[f"{m.name} [95% CI]"] = [_value(r, m) for r in summary.to_dict("records")]
    view["images"] = summary[m.images].map(lambda v: "" if pd.isna(v) else str(int(v)))
    return view


def comparison_view(comparisons: pd.DataFrame, m: Measure) -> pd.DataFrame:
    """Every comparison as shown, each with its setting."""
    if comparisons.empty:
        return pd.DataFrame()
    return pd.concat([_coordinates(comparisons, FAMILY), pair_rows(comparisons, m)], axis=1)


def external_view(external: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per group and external set: mean and sd over the folds' models, and their ensemble's
    AUROC with its interval."""
    if external.empty:
        return external
    external = external.reset_index(drop=True)
    view = _coordinates(external, KEYS)
    for name in names:
        p = f"ext_{name}"
        if f"{p}_auroc_mean" in external:
            pairs = zip(external[f"{p}_auroc_mean"], external[f"{p}_auroc_std"], strict=True)
            view[f"{name}: AUROC (mean \u00b1 sd over models)"] = [mean_sd(a, b) for a, b in pairs]
        if f"{p}_ensemble_auroc" in external:
            view[f"{name}: ensemble AUROC [95% CI]"] = [
                interval(r[f"{p}_ensemble_auroc"], r[f"{p}_ensemble_auroc_ci_low"],
                         r[f"{p}_ensemble_auroc_ci_high"])
                for r in external.to_dict("records")
            ]  # fmt: skip
            view[f"{name}: images"] = external[f"{p}_ensemble_images"]
    return view


def _lacking(n: int) -> str:
    return f"{count(n, 'group')} {'lacks' if n == 1 else 'lack'} folds"


def incomplete_text(lines: list[str], allow_incomplete: bool) -> str:
    """The incomplete groups, and what the report did with them."""
    fate = (
        "compared anyway (--allow-incomplete), their comparison rows marked"
        if allow_incomplete
        else "left out of the comparisons (`grid report --allow-incomplete` keeps them, marked)"
    )
    intro = (
        f"{_lacking(len(lines))} (failed, stale or not run yet): their pooled figures cover"
        " fewer images and fewer models than their labels say. They are marked in "
        f"summary.csv, dashed in the figures, and {fate}."
    )
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return f"{paragraph(intro)}<ul>{items}</ul>"


def sections(
    root: Path,
    summit: str,
    figures: list[Figure],
    tables: dict[str, pd.DataFrame],
    external: pd.DataFrame | None,
    methods: Callable[[list[str]], str],
    lines: list[str],
    allow_incomplete: bool,
) -> list[Section]:
    """The page's sections in order: headline, figures, tables, external validation, the
    Grad-CAM gallery and t-SNE panels (when their files exist), methods, incomplete groups.
    `methods(extra)` writes the methods paragraph, `extra` the explain sentences."""
    if lines:
        summit = paragraph(
            f"{count(len(lines), 'group')} lack folds: see Incomplete groups.", "note"
        ) + (summit)
    drawn = "".join(figure(f) for f in figures) or paragraph(
        "No curve: it needs two labelled fractions or two resolutions.", "note"
    )
    shown = "".join(f"<h3>{esc(k)}</h3>{table(v)}" for k, v in tables.items())
    out = [
        Section("headline", "Headline", summit),
        Section("figures", "Figures", drawn),
        Section("tables", "Tables", shown),
    ]
    if external is not None:
        out.append(Section("external", "External validation", external_text(external)))
    grad, tsne = gradcam_section(root), tsne_section(root)
    out += [s for s in (grad, tsne) if s is not None]
    text = methods(explain_sentences(grad is not None, tsne is not None))
    note = paragraph("Generated from the grid's settings and splits; paste as it stands.", "note")
    out.append(Section("methods", "Methods", f'{note}<pre class="methods">{esc(text)}</pre>'))
    if lines:
        out.append(
            Section("incomplete", "Incomplete groups", incomplete_text(lines, allow_incomplete))
        )
    return out


def external_text(view: pd.DataFrame) -> str:
    intro = (
        "Every fold's model scored each external set: AUROC as mean and sd over the folds' "
        "models, and the AUROC of their ensemble (the mean score per image, each image once) "
        "with a 95% patient-bootstrap interval."
    )
    return paragraph(intro, "note") + table(view)
