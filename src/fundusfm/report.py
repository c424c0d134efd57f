"""Grid results -> tables, figures and one self-contained HTML report (`fundusfm grid report`).

Writes into `<grid out>/report/`:
    results.csv      one row per finished cell: coordinates, every validation, test and
                     external metric
    summary.csv      per group (task, init, method, resolution, fraction): folds found and
                     expected, `complete` and the folds that failed, are stale or pending;
                     mean and sd over folds, and the AUROC of the pooled out-of-fold test
                     predictions with a 95% patient-level bootstrap interval
    comparisons.csv  every pair of inits on the same pooled images: for binary AUROC,
                     Obuchowski's clustered DeLong test when a patient has several images
                     (plain DeLong when none has); a paired patient-level bootstrap for macro
                     AUROC otherwise. `test` names the test, `patients` counts the clusters.
                     Incomplete groups are left out unless `allow_incomplete`.
    external.csv     per group and external set: AUROC mean and sd over the folds' models,
                     and the AUROC of their ensemble (mean score per image) with a 95%
                     patient-level bootstrap interval
    *.png, report.html
Everything is recomputed from the cells' `metrics.json` and `predictions.csv`.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from .config_grid import ExternalSet, GridConfig
from .grid import cell_dir, expand, state
from .manifest import load_manifest
from .metrics import auroc, per_class_table
from .stats import auroc_interval, compare_aurocs, paired_bootstrap

KEYS = ["task", "init", "method", "resolution", "fraction"]
NOT_DONE = ("failed", "stale", "pending")
# the header of a comparisons.csv without rows (every group incomplete, or one init)
COMPARISON_COLUMNS = [
    *("task", "method", "resolution", "fraction", "init_a", "init_b", "images", "complete"),
    *("auroc_a", "auroc_b", "difference", "p_value", "test", "patients"),
]


def external_metrics(cfg: GridConfig, d: Path) -> dict:
    """`ext_<set>_<metric>` of a cell folder's external evaluations."""
    row = {}
    for ext in cfg.external:
        path = d / "external" / ext.name / "metrics.json"
        if path.is_file():
            ext_metrics = json.loads(path.read_text())["external"]
            row.update({f"ext_{ext.name}_{k}": v for k, v in ext_metrics.items()})
    return row


def completeness(cfg: GridConfig) -> pd.DataFrame:
    """Per group (KEYS): folds done vs expected, `complete`, and the folds not done by state.

    A group pooled over fewer folds than the grid asks for covers fewer images and other
    models than its label says; the report marks it instead of pooling silently.
    """
    rows: dict[tuple, dict] = {}
    for cell in expand(cfg):
        c = cell.coordinates()
        blank = {"folds": 0, "folds_expected": 0, **{f"{s}_folds": [] for s in NOT_DONE}}
        row = rows.setdefault(tuple(c[k] for k in KEYS), {**{k: c[k] for k in KEYS}, **blank})
        row["folds_expected"] += 1
        s = state(cfg, cell)
        if s == "done":
            row["folds"] += 1
        else:
            row[f"{s}_folds"].append(str(cell.fold))
    table = pd.DataFrame(list(rows.values()))
    table["complete"] = table["folds"] == table["folds_expected"]
    for s in NOT_DONE:
        table[f"{s}_folds"] = table[f"{s}_folds"].str.join(" ")
    return table


def incomplete_lines(table: pd.DataFrame) -> list[str]:
    """One line per incomplete group of `completeness`, for the command line."""
    lines = []
    for row in table[~table["complete"]].to_dict("records"):
        where = " ".join(f"{k}={row[k]}" for k in KEYS)
        states = "; ".join(f"{s}: {row[f'{s}_folds']}" for s in NOT_DONE if row[f"{s}_folds"])
        lines.append(f"{where}: {row['folds']}/{row['folds_expected']} folds ({states})")
    return lines


def in_groups(frame: pd.DataFrame, groups: pd.DataFrame) -> np.ndarray:
    """Rows of `frame` whose KEYS belong to one of the rows of `groups`."""
    if frame.empty:
        return np.zeros(0, dtype=bool)
    wanted = list(groups[KEYS].itertuples(index=False, name=None))
    return pd.MultiIndex.from_frame(frame[KEYS]).isin(wanted)


def collect(cfg: GridConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """results (one row per done cell) and all their test predictions with coordinates."""
    rows, preds = [], []
    for cell in expand(cfg):
        if state(cfg, cell) != "done":
            continue
        d = cell_dir(cfg, cell)
        metrics = json.loads((d / "metrics.json").read_text())
        row = {"cell": cell.id, **cell.coordinates()}
        for part in ("val", "test"):
            row.update({f"{part}_{k}": v for k, v in metrics.get(part, {}).items()})
        rows.append({**row, **external_metrics(cfg, d)})
        p = pd.read_csv(d / "predictions.csv", dtype={"image_id": str})
        p = p[p.split == "test"]
        for key, value in cell.coordinates().items():
            p[key] = value
        preds.append(p)
    results = pd.DataFrame(rows)
    return results, (pd.concat(preds, ignore_index=True) if preds else pd.DataFrame())


def _arrays(frame: pd.DataFrame, kind: str, classes: list[str]):
    scores = frame[[f"score_{c}" for c in classes]].to_numpy(float)
    if kind == "multilabel":
        return frame[[f"y_{c}" for c in classes]].to_numpy(int), scores
    return frame["y_true"].to_numpy(int), scores


def summarise(
    results: pd.DataFrame, preds: pd.DataFrame, tasks: dict, patients: dict, n_boot: int
) -> pd.DataFrame:
    """Per group: mean and sd over folds, pooled out-of-fold AUROC with its patient CI."""
    metric_cols = [c for c in results.columns if c.startswith("test_")]
    out = []
    for key, group in results.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, key, strict=True))
        for col in metric_cols:
            values = pd.to_numeric(group[col], errors="coerce")
            row[f"{col}_mean"], row[f"{col}_sd"] = values.mean(), values.std(ddof=1)
        kind, classes = tasks[row["task"]]
        frame = preds[np.logical_and.reduce([preds[k] == row[k] for k in KEYS])]
        y, s = _arrays(frame, kind, classes)
        groups = frame["image_id"].map(patients).to_numpy()
        row["pooled_auroc"] = auroc(kind, y, s)
        row["pooled_auroc_ci_low"], row["pooled_auroc_ci_high"] = auroc_interval(
            kind, y, s, groups, n_boot
        )
        row["pooled_images"] = len(y)
        row["pooled_patients"] = len(np.unique(groups))
        out.append(row)
    return pd.DataFrame(out)


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
            y, sa = _arrays(fa, kind, classes)
            _, sb = _arrays(fb, kind, classes)
            groups = fa["image_id"].map(patients).to_numpy()
            coords = dict(zip(fixed, key, strict=True))
            whole = all((coords["task"], i, *key[1:]) not in lacking for i in (a, b))
            row = {**coords, "init_a": a, "init_b": b, "images": len(common), "complete": whole}
            out.append({**row, **_pair_test(kind, y, sa, sb, groups, n_boot)})
    return pd.DataFrame(out) if out else pd.DataFrame(columns=COMPARISON_COLUMNS)


def _external_patients(ext: ExternalSet) -> dict:
    """image_id -> patient_id of an external manifest (an image alone where it has none: a
    blank id must not make one patient of every image that lacks one)."""
    table = load_manifest(ext.manifest).table
    ids = table["image_id"].astype(str)
    who = table.get("patient_id", ids).astype(str).str.strip()
    return dict(zip(ids, who.where(who != "", "image:" + ids), strict=True))


def ensemble_external(
    cfg: GridConfig, ext: ExternalSet, cells: list[str], task: tuple, patients: dict, n_boot: int
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
    y, s = _arrays(frame, kind, classes)
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
    cfg: GridConfig, results: pd.DataFrame, tasks: dict, n_boot: int
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


def line_figure(
    summary: pd.DataFrame, x: str, fixed: dict, path: Path, log: bool, metric: str = "auroc"
) -> bool:
    """Mean test `metric` (sd as error bars) against `x`, one line per init, a panel per method."""
    data = summary
    for k, v in fixed.items():
        data = data[data[k] == v]
    if data[x].nunique() < 2:
        return False
    methods = list(data["method"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for init, g in data[data.method == method].groupby("init", sort=False):
            g = g.sort_values(x)
            ax.errorbar(
                g[x],
                g[f"test_{metric}_mean"],
                yerr=g[f"test_{metric}_sd"],
                marker="o",
                capsize=3,
                label=init,
            )
        ylabel = f"test {metric.upper() if metric == 'auroc' else metric} (mean, sd over folds)"
        ax.set(title=f"{method.upper()}", xlabel=x, ylabel=ylabel)
        if log:
            ax.set_xscale("log")
            ticks = sorted(data[x].unique())
            ax.set_xticks(ticks, [f"{t:.0%}" for t in ticks])
            ax.minorticks_off()
        else:
            ax.set_xticks(sorted(data[x].unique()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _roc_and_classes(preds, tasks, fixed: dict, out: Path) -> list[Path]:
    data = preds
    for k, v in fixed.items():
        data = data[data[k] == v]
    written = []
    for (task, method), g in data.groupby(["task", "method"], sort=False):
        kind, classes = tasks[task]
        if kind == "binary":
            fig, ax = plt.subplots(figsize=(4.2, 4))
            for init, gi in g.groupby("init", sort=False):
                y, s = _arrays(gi, kind, classes)
                fpr, tpr, _ = roc_curve(y, s[:, 1])
                ax.plot(fpr, tpr, label=f"{init} ({auroc(kind, y, s):.3f})")
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set(
                title=f"{task} {method.upper()}: pooled out-of-fold ROC",
                xlabel="1 - specificity",
                ylabel="sensitivity",
            )
            ax.legend(fontsize=8)
            path = out / f"roc_{task}_{method}.png"
        else:
            tables = {
                init: per_class_table(kind, *_arrays(gi, kind, classes), classes)
                for init, gi in g.groupby("init", sort=False)
            }
            fig, ax = plt.subplots(figsize=(1 + 0.9 * len(classes) * len(tables) / 2, 3.6))
            width = 0.8 / len(tables)
            for k, (init, t) in enumerate(tables.items()):
                ax.bar(np.arange(len(classes)) + k * width, t["auroc"], width, label=init)
            ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30)
            ax.set(title=f"{task} {method.upper()}: per-class AUROC", ylim=(0.0, 1.0))
            ax.legend(fontsize=8)
            path = out / f"per_class_{task}_{method}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def html_page(title: str, tables: dict[str, pd.DataFrame], images: list[Path]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        parts.append(
            f'<figure><img src="data:image/png;base64,{data}"/>'
            f"<figcaption>{html.escape(img.stem)}</figcaption></figure>"
        )
    for name, table in tables.items():
        if not table.empty:
            parts.append(f"<h2>{html.escape(name)}</h2>")
            parts.append(
                table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
            )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:"
        "collapse;font-size:12px}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def _tasks(cfg: GridConfig, results: pd.DataFrame) -> tuple[dict, dict]:
    """task -> (kind, class names) of the grid's tasks, and image_id -> patient_id."""
    manifest = load_manifest(cfg.base.data.manifest)
    tasks = {
        t: (manifest.task(t)[1].kind, manifest.task(t)[1].class_names)
        for t in results["task"].unique()
    }
    patients = dict(zip(manifest.table["image_id"], manifest.table["patient_id"], strict=True))
    return tasks, patients


def _figures(summary: pd.DataFrame, preds: pd.DataFrame, tasks: dict, out: Path) -> list[Path]:
    images = []
    top_res, top_frac = summary["resolution"].max(), summary["fraction"].max()
    for x, fixed, log in (
        ("resolution", {"fraction": top_frac}, False),
        ("fraction", {"resolution": top_res}, True),
    ):
        path = out / f"auroc_vs_{x}.png"
        if line_figure(summary, x, fixed, path, log=log):
            images.append(path)
    return images + _roc_and_classes(
        preds, tasks, {"resolution": top_res, "fraction": top_frac}, out
    )


BRIEF = (
    "folds",
    "folds_expected",
    "complete",
    *(f"{s}_folds" for s in NOT_DONE),
    "test_auroc_mean",
    "test_auroc_sd",
    "pooled_auroc",
    "pooled_auroc_ci_low",
    "pooled_auroc_ci_high",
    "pooled_images",
)


def build_report(cfg: GridConfig, n_boot: int = 1000, allow_incomplete: bool = False) -> Path:
    """Write every table, figure and the HTML report; returns the report's path.

    Groups with failed, stale or missing folds are marked in the summary and left out of
    the comparisons unless `allow_incomplete` (then their rows say `complete` False).
    """
    if cfg.kind == "segmentation":
        from .seg_report import build_seg_report

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
    comparisons = compare(compared, tasks, patients, n_boot, incomplete)
    external = external_table(cfg, results, tasks, n_boot)
    if not external.empty:
        external = groups[[*KEYS, "complete"]].merge(external, how="inner")
    for name, table in [
        ("results", results),
        ("summary", summary),
        ("comparisons", comparisons),
        ("external", external),
    ]:
        table.to_csv(out / f"{name}.csv", index=False)
    images = _figures(summary[summary["folds"] > 0], preds, tasks, out)
    left_out = "" if allow_incomplete else "; groups with missing folds are left out"
    page = html_page(
        f"fundusfm grid report: {cfg.name}",
        {
            "Summary (test part of every fold; complete = every fold done)": summary[
                [c for c in summary.columns if c in KEYS or c in BRIEF]
            ],
            f"Paired comparisons of initialisations{left_out}": comparisons,
            "External validation (AUROC: mean and sd over the folds' models; their ensemble, "
            "the mean score per image, with a 95% patient-bootstrap CI)": external,
        },
        images,
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"
