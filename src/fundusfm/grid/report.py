"""Grid results -> tables, figures and one self-contained HTML report (`fundusfm grid report`).

Writes into `<grid out>/report/`:
    results.csv      one row per finished cell: coordinates, every validation, test and
                     external metric
    summary.csv      per group (task, init, method, resolution, fraction): folds found and
                     expected, `complete` and the folds that failed, are stale or pending;
                     `labelled_share` (the realised share of the training pool, mean over
                     folds, with the nominal fraction in brackets) and the labelled images
                     used (training + validation); mean and sd over folds of every test (and
                     held-out) metric, and the AUROC of the pooled out-of-fold test
                     predictions with a 95% patient-level bootstrap interval
    comparisons.csv  every pair of inits on the same pooled images: for binary AUROC,
                     Obuchowski's clustered DeLong test when a patient has several images
                     (plain DeLong when none has); a paired patient-level bootstrap for macro
                     AUROC otherwise. `test` names the test, `patients` counts the clusters,
                     `p_holm` is `p_value` adjusted by Holm's method within its family (the
                     pairs of inits at one task, method, resolution and fraction).
                     `resolution_a`/`_b` are the sizes the two models were fed: an init
                     with its own (`axes.init_resolution`, e.g. a ViT at 224) is compared
                     with the others at every resolution of the axis.
                     Incomplete groups are left out unless `allow_incomplete`.
    external.csv     per group and external set: AUROC mean and sd over the folds' models,
                     and the AUROC of their ensemble (mean score per image) with a 95%
                     patient-level bootstrap interval
    *.png            AUROC against fraction and resolution with CI bands, ROC curves or
                     per-class AUROC (`figures`)
    report.html      one offline page (`html`): headline, figures with captions, tables,
                     external validation, Grad-CAM gallery and t-SNE panels when
                     `fundusfm explain` wrote them under <grid out>/explain (`gallery`), the
                     methods paragraph (`methods`), incomplete groups
Everything is recomputed from the cells' `metrics.json` and `predictions.csv`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from fundusfm.config.grid import (
    ClassificationExternal,
    ClassificationGrid,
    GridConfig,
    SegmentationGrid,
)
from fundusfm.data.manifest import load_manifest, patient_of
from fundusfm.evaluation.metrics import auroc
from fundusfm.evaluation.stats import auroc_interval, compare_aurocs, paired_bootstrap
from fundusfm.grid.cells import cell_dir, expand, state
from fundusfm.grid.figures import arrays, report_figures
from fundusfm.grid.findings import (
    AUROC,
    comparison_view,
    external_view,
    headline,
    sections,
    summary_view,
)
from fundusfm.grid.html import PROTOCOL, page
from fundusfm.grid.methods import classification_methods, split_facts
from fundusfm.grid.seg_report import build_seg_report
from fundusfm.grid.tables import (
    KEYS,
    add_holm,
    at_axis_resolutions,
    completeness,
    external_metrics,
    in_groups,
    incomplete_lines,
    once_per_pair,
)
from fundusfm.io import read_json, write_csv, write_text_atomic

# the header of a comparisons.csv without rows (every group incomplete, or one init)
COMPARISON_COLUMNS = [
    *("task", "method", "resolution", "fraction", "init_a", "init_b", "images", "complete"),
    *("resolution_a", "resolution_b"),
    *("auroc_a", "auroc_b", "difference", "p_value", "test", "patients"),
]


LABELLED = ("share", "share_patients", "train_images", "val_images", "labelled_images")


def labelled_columns(metrics: dict) -> dict:
    """What a cell trained and selected on (metrics.json `labelled`; absent in older cells)."""
    labelled = metrics.get("labelled") or {}
    return {k: labelled.get(k, np.nan) for k in LABELLED}


def collect(cfg: ClassificationGrid) -> tuple[pd.DataFrame, pd.DataFrame]:
    """results (one row per done cell) and all their test predictions with coordinates."""
    rows, preds = [], []
    for cell in expand(cfg):
        if state(cfg, cell) != "done":
            continue
        d = cell_dir(cfg, cell)
        metrics = read_json(d / "metrics.json")
        row = {"cell": cell.id, **cell.coordinates(), **labelled_columns(metrics)}
        for part in ("val", "test", "holdout"):
            row.update({f"{part}_{k}": v for k, v in metrics.get(part, {}).items()})
        rows.append({**row, **external_metrics(cfg, d)})
        p = pd.read_csv(d / "predictions.csv", dtype={"image_id": str})
        p = p[p.split == "test"]
        for key, value in cell.coordinates().items():
            p[key] = value
        preds.append(p)
    results = pd.DataFrame(rows)
    return results, (pd.concat(preds, ignore_index=True) if preds else pd.DataFrame())


def summarise(
    results: pd.DataFrame, preds: pd.DataFrame, tasks: dict, patients: dict, n_boot: int
) -> pd.DataFrame:
    """Per group: mean and sd over folds, pooled out-of-fold AUROC with its patient CI."""
    metric_cols = [c for c in results.columns if c.startswith(("test_", "holdout_"))]
    metric_cols += [c for c in LABELLED if c in results.columns]
    out = []
    for key, group in results.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, key, strict=True))
        for col in metric_cols:
            values = pd.to_numeric(group[col], errors="coerce")
            row[f"{col}_mean"], row[f"{col}_sd"] = values.mean(), values.std(ddof=1)
        kind, classes = tasks[row["task"]]
        frame = preds[np.logical_and.reduce([preds[k] == row[k] for k in KEYS])]
        y, s = arrays(frame, kind, classes)
        groups = frame["image_id"].map(patients).to_numpy()
        row["pooled_auroc"] = auroc(kind, y, s)
        row["pooled_auroc_ci_low"], row["pooled_auroc_ci_high"] = auroc_interval(
            kind, y, s, groups, n_boot
        )
        row["pooled_images"] = len(y)
        row["pooled_patients"] = len(np.unique(groups))
        out.append(row)
    table = pd.DataFrame(out)
    if "share_mean" in table:  # what the fraction really is: realised share (nominal)
        table.insert(
            len(KEYS), "labelled_share", [_share_label(r) for r in table.to_dict("records")]
        )
    return table


def _share_label(row: dict) -> str:
    share = row.get("share_mean")
    if share is None or not np.isfinite(share):
        return f"({row['fraction']:g})"
    return f"{share:.1%} ({row['fraction']:g})"


def _pair_test(kind, y, sa, sb, groups, n_boot) -> dict:
    """Binary AUROC: (clustered) DeLong; otherwise a paired patient bootstrap of macro AUROC."""
    if kind == "binary":
        return compare_aurocs(y, sa[:, 1], sb[:, 1], groups)
    both = (sa, sb)
    res = paired_bootstrap(lambda r, w: auroc(kind, y[r], both[w][r]), len(y), groups, n_boot)
    return {
        "auroc_a": auroc(kind, y, sa),
        "auroc_b": auroc(kind, y, sb),
        **res,
        "test": "paired bootstrap (patients)",
        "patients": len(np.unique(groups)),
    }


def _fed(frame: pd.DataFrame) -> int | None:
    """The input size a model's rows were scored at (`tables.at_axis_resolutions`)."""
    if "input_resolution" not in frame or frame.empty:
        return None
    return int(frame["input_resolution"].iloc[0])


def compare(
    preds: pd.DataFrame,
    tasks: dict,
    patients: dict,
    n_boot: int,
    incomplete: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every pair of inits, same task/method/resolution/fraction, on the images both scored.

    `incomplete` (groups of `completeness`) only marks rows: `complete` is False when either
    init's group lacks folds; leaving such groups out is the caller's choice.
    """
    out = []
    fixed = ["task", "method", "resolution", "fraction"]
    lacking = set() if incomplete is None else set(incomplete[KEYS].itertuples(index=False))
    for key, group in preds.groupby(fixed, sort=False):
        kind, classes = tasks[key[0]]
        by_init = {i: g.set_index("image_id") for i, g in group.groupby("init", sort=False)}
        for a, b in itertools.combinations(by_init, 2):
            common = by_init[a].index.intersection(by_init[b].index)
            fa, fb = by_init[a].loc[common].reset_index(), by_init[b].loc[common].reset_index()
            y, sa = arrays(fa, kind, classes)
            _, sb = arrays(fb, kind, classes)
            groups = fa["image_id"].map(patients).to_numpy()
            coords = dict(zip(fixed, key, strict=True))
            whole = all((coords["task"], i, *key[1:]) not in lacking for i in (a, b))
            row = {**coords, "init_a": a, "init_b": b, "images": len(common), "complete": whole}
            row |= {f"resolution_{x}": _fed(by_init[i]) for x, i in (("a", a), ("b", b))}
            out.append({**row, **_pair_test(kind, y, sa, sb, groups, n_boot)})
    return pd.DataFrame(out) if out else pd.DataFrame(columns=COMPARISON_COLUMNS)


def _external_patients(ext: ClassificationExternal) -> dict:
    """image_id -> patient_id of an external manifest (an image alone where it has none: a
    blank id must not make one patient of every image that lacks one)."""
    table = load_manifest(ext.manifest).table
    return dict(zip(table["image_id"].astype(str), patient_of(table), strict=True))


def ensemble_external(
    cfg: ClassificationGrid,
    ext: ClassificationExternal,
    cells: list[str],
    task: tuple,
    patients: dict,
    n_boot: int,
) -> dict:
    """AUROC with a patient-bootstrap CI of the folds' models' mean score per external image.

    Every fold's model scores the same external images, so pooling their predictions would
    count each image k times; the ensemble scores each image once. Images some model did not
    score are left out.
    """
    paths = [Path(cfg.out) / "cells" / c / "external" / ext.name / "predictions.csv" for c in cells]
    frames = [pd.read_csv(p, dtype={"image_id": str}) for p in paths if p.is_file()]
    if not frames:
        return {}
    kind, classes = task
    labels = ["y_true"] if kind != "multilabel" else [f"y_{c}" for c in classes]
    grouped = pd.concat(frames).groupby("image_id", sort=False)
    frame = pd.concat(
        [grouped[labels].first(), grouped[[f"score_{c}" for c in classes]].mean()], axis=1
    )[grouped.size() == len(frames)].reset_index()
    y, s = arrays(frame, kind, classes)
    groups = frame["image_id"].map(patients).fillna(frame["image_id"]).to_numpy()
    low, high = auroc_interval(kind, y, s, groups, n_boot)
    p = f"ext_{ext.name}_ensemble"
    return {
        f"{p}_auroc": auroc(kind, y, s),
        f"{p}_auroc_ci_low": low,
        f"{p}_auroc_ci_high": high,
        f"{p}_models": len(frames),
        f"{p}_images": len(frame),
    }


def external_table(
    cfg: ClassificationGrid, results: pd.DataFrame, tasks: dict, n_boot: int
) -> pd.DataFrame:
    """Per group and external set: AUROC mean and sd over the folds' models, and their
    ensemble's AUROC with a 95% patient-bootstrap interval."""
    if not cfg.external or results.empty:
        return pd.DataFrame()
    patients = {ext.name: _external_patients(ext) for ext in cfg.external}
    out = []
    for key, group in results.groupby(KEYS, sort=False):
        row = {**dict(zip(KEYS, key, strict=True)), "models": len(group)}
        for ext in cfg.external:
            col = f"ext_{ext.name}_auroc"
            if col in group:
                values = pd.to_numeric(group[col], errors="coerce")
                row[f"{col}_mean"], row[f"{col}_std"] = values.mean(), values.std(ddof=1)
            row.update(
                ensemble_external(
                    cfg, ext, list(group["cell"]), tasks[row["task"]], patients[ext.name], n_boot
                )
            )
        out.append(row)
    return pd.DataFrame(out)


def _tasks(cfg: ClassificationGrid, results: pd.DataFrame) -> tuple[dict, dict]:
    """task -> (kind, class names) of the grid's tasks, and image_id -> patient_id."""
    manifest = load_manifest(cfg.base.data.manifest)
    tasks = {
        t: (manifest.task(t)[1].kind, manifest.task(t)[1].class_names)
        for t in results["task"].unique()
    }
    patients = dict(zip(manifest.table["image_id"], patient_of(manifest.table), strict=True))
    return tasks, patients


SHOWN = {"test_auroc": "test AUROC", "holdout_auroc": "held-out AUROC"}


def _page(
    cfg: ClassificationGrid, tables: dict, figures, tasks: dict, n_boot: int, allow: bool
) -> str:
    """The HTML report of a classification grid from its tables (`build_report`'s; the
    summary says which groups are incomplete)."""
    summary, comparisons, external = tables["summary"], tables["comparisons"], tables["external"]
    tests = sorted(comparisons["test"].dropna().unique()) if len(comparisons) else []
    task_names = [f"{t} ({k}; classes {', '.join(map(str, c))})" for t, (k, c) in tasks.items()]

    def methods(extra: list[str]) -> str:
        facts = split_facts(cfg.base.data.splits)
        return classification_methods(cfg, facts, n_boot, task_names, tests, extra)

    left_out = "" if allow else "; groups with missing folds are left out"
    shown = {
        "Summary (test part of every fold; pooled: all folds' test images together)": (
            summary_view(summary, AUROC, SHOWN)
        ),
        f"Paired comparisons of initialisations{left_out}": comparison_view(comparisons, AUROC),
    }
    names = [e.name for e in cfg.external]
    parts = sections(
        Path(cfg.out),
        headline(summary, comparisons, AUROC),
        figures,
        shown,
        external_view(external, names) if cfg.external else None,
        methods,
        incomplete_lines(summary),
        allow,
    )
    return page(f"fundusfm grid report: {cfg.name}", PROTOCOL, parts)


def build_report(cfg: GridConfig, n_boot: int = 1000, allow_incomplete: bool = False) -> Path:
    """Write every table, figure and the HTML report; returns the report's path.

    Groups with failed, stale or missing folds are marked in the summary and left out of
    the comparisons unless `allow_incomplete` (then their rows say `complete` False).
    """
    if isinstance(cfg, SegmentationGrid):
        return build_seg_report(cfg, n_boot, allow_incomplete)
    out = Path(cfg.out) / "report"
    out.mkdir(parents=True, exist_ok=True)
    results, preds = collect(cfg)
    if results.empty:
        raise FileNotFoundError(f"no finished cells under {cfg.out}; run `fundusfm grid run`")
    tasks, patients = _tasks(cfg, results)
    groups = completeness(cfg)
    incomplete = groups[~groups["complete"]]
    summary = groups.merge(summarise(results, preds, tasks, patients, n_boot), how="left")
    compared = preds if allow_incomplete else preds[~in_groups(preds, incomplete)]
    compared = at_axis_resolutions(compared, cfg)
    lacking = at_axis_resolutions(incomplete, cfg)
    pairs = once_per_pair(compare(compared, tasks, patients, n_boot, lacking), cfg)
    comparisons = add_holm(pairs, "p_value")
    external = external_table(cfg, results, tasks, n_boot)
    if not external.empty:
        external = groups[[*KEYS, "complete"]].merge(external, how="inner")
    tables = {
        "results": results,
        "summary": summary,
        "comparisons": comparisons,
        "external": external,
    }
    for name, table in tables.items():
        write_csv(out / f"{name}.csv", table)
    figures = report_figures(summary[summary["folds"] > 0], preds, tasks, out, n_boot)
    html = _page(cfg, tables, figures, tasks, n_boot, allow_incomplete)
    return write_text_atomic(out / "report.html", html)
