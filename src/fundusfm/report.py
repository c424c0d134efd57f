"""Grid results -> tables, figures and one self-contained HTML report (`fundusfm grid report`).

Writes into `<grid out>/report/`:
    results.csv      one row per finished cell: coordinates, every validation, test and
                     external metric
    summary.csv      per (task, init, method, resolution, fraction): mean and sd over folds,
                     and the AUROC of the pooled out-of-fold test predictions with a 95%
                     patient-level bootstrap interval
    comparisons.csv  every pair of inits on the same pooled images: DeLong's test for binary
                     AUROC, a paired patient-level bootstrap for macro AUROC otherwise
    external.csv     external-validation AUROC, mean and sd over the folds' models
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

from .config_grid import GridConfig
from .grid import cell_dir, expand, state
from .manifest import load_manifest
from .metrics import auroc, per_class_table
from .stats import bootstrap_ci, delong_test, paired_bootstrap

KEYS = ["task", "init", "method", "resolution", "fraction"]


def external_metrics(cfg: GridConfig, d: Path) -> dict:
    """`ext_<set>_<metric>` of a cell folder's external evaluations."""
    row = {}
    for ext in cfg.external:
        path = d / "external" / ext.name / "metrics.json"
        if path.is_file():
            ext_metrics = json.loads(path.read_text())["external"]
            row.update({f"ext_{ext.name}_{k}": v for k, v in ext_metrics.items()})
    return row


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


def _same_classes_auroc(kind: str, y: np.ndarray, s: np.ndarray, rows: np.ndarray) -> float:
    """AUROC of a bootstrap sample, NaN (dropped) when it lacks a class the full data scores.

    Otherwise a macro average would silently run over fewer classes in some resamples.
    """
    if kind != "binary":
        full = np.eye(s.shape[1])[y] if kind == "multiclass" else y
        sample = full[rows]
        scorable = (full.sum(0) > 0) & (full.sum(0) < len(full))
        if ((sample.sum(0) == 0) | (sample.sum(0) == len(rows)))[scorable].any():
            return float("nan")
    return auroc(kind, y[rows], s[rows])


def summarise(
    cfg: GridConfig,
    results: pd.DataFrame,
    preds: pd.DataFrame,
    tasks: dict,
    patients: dict,
    n_boot: int,
) -> pd.DataFrame:
    metric_cols = [c for c in results.columns if c.startswith("test_")]
    out = []
    for key, group in results.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, key, strict=True))
        row["folds"] = len(group)
        for col in metric_cols:
            values = pd.to_numeric(group[col], errors="coerce")
            row[f"{col}_mean"], row[f"{col}_sd"] = values.mean(), values.std(ddof=1)
        kind, classes = tasks[row["task"]]
        frame = preds[np.logical_and.reduce([preds[k] == row[k] for k in KEYS])]
        y, s = _arrays(frame, kind, classes)
        groups = frame["image_id"].map(patients).to_numpy()
        row["pooled_auroc"] = auroc(kind, y, s)
        row["pooled_auroc_ci_low"], row["pooled_auroc_ci_high"] = bootstrap_ci(
            lambda r, y=y, s=s, kind=kind: _same_classes_auroc(kind, y, s, r),
            len(y),
            groups,
            n_boot,
        )
        row["pooled_images"] = len(y)
        out.append(row)
    return pd.DataFrame(out)


def compare(preds: pd.DataFrame, tasks: dict, patients: dict, n_boot: int) -> pd.DataFrame:
    """Every pair of inits, same task/method/resolution/fraction, on the images both scored."""
    out = []
    fixed = ["task", "method", "resolution", "fraction"]
    for key, group in preds.groupby(fixed, sort=False):
        kind, classes = tasks[key[0]]
        by_init = {i: g.set_index("image_id") for i, g in group.groupby("init", sort=False)}
        for a, b in itertools.combinations(by_init, 2):
            common = by_init[a].index.intersection(by_init[b].index)
            fa, fb = by_init[a].loc[common].reset_index(), by_init[b].loc[common].reset_index()
            y, sa = _arrays(fa, kind, classes)
            _, sb = _arrays(fb, kind, classes)
            row = {
                **dict(zip(fixed, key, strict=True)),
                "init_a": a,
                "init_b": b,
                "images": len(common),
            }
            if kind == "binary":
                row.update(delong_test(y, sa[:, 1], sb[:, 1]), test="DeLong")
            else:
                groups = fa["image_id"].map(patients).to_numpy()
                both = (sa, sb)
                res = paired_bootstrap(
                    lambda r, w, y=y, both=both, kind=kind: auroc(kind, y[r], both[w][r]),
                    len(y),
                    groups,
                    n_boot,
                )
                row.update(
                    auroc_a=auroc(kind, y, sa),
                    auroc_b=auroc(kind, y, sb),
                    **res,
                    test="paired bootstrap",
                )
            out.append(row)
    return pd.DataFrame(out)


def external_table(results: pd.DataFrame, cfg: GridConfig) -> pd.DataFrame:
    cols = [f"ext_{e.name}_auroc" for e in cfg.external if f"ext_{e.name}_auroc" in results]
    if not cols:
        return pd.DataFrame()
    table = results.groupby(KEYS, sort=False)[cols].agg(["mean", "std"])
    table.columns = [f"{c}_{stat}" for c, stat in table.columns]
    return table.reset_index()


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


def build_report(cfg: GridConfig, n_boot: int = 1000) -> Path:
    """Write every table, figure and the HTML report; returns the report's path."""
    if cfg.kind == "segmentation":
        from .seg_report import build_seg_report

        return build_seg_report(cfg, n_boot)
    out = Path(cfg.out) / "report"
    out.mkdir(parents=True, exist_ok=True)
    results, preds = collect(cfg)
    if results.empty:
        raise FileNotFoundError(f"no finished cells under {cfg.out}; run `fundusfm grid run`")
    manifest = load_manifest(cfg.base.data.manifest)
    tasks = {
        t: (manifest.task(t)[1].kind, manifest.task(t)[1].class_names)
        for t in results["task"].unique()
    }
    patients = dict(zip(manifest.table["image_id"], manifest.table["patient_id"], strict=True))
    summary = summarise(cfg, results, preds, tasks, patients, n_boot)
    comparisons = compare(preds, tasks, patients, n_boot)
    external = external_table(results, cfg)
    for name, table in [
        ("results", results),
        ("summary", summary),
        ("comparisons", comparisons),
        ("external", external),
    ]:
        table.to_csv(out / f"{name}.csv", index=False)
    images = []
    top_res, top_frac = summary["resolution"].max(), summary["fraction"].max()
    if line_figure(
        summary, "resolution", {"fraction": top_frac}, out / "auroc_vs_resolution.png", log=False
    ):
        images.append(out / "auroc_vs_resolution.png")
    if line_figure(
        summary, "fraction", {"resolution": top_res}, out / "auroc_vs_fraction.png", log=True
    ):
        images.append(out / "auroc_vs_fraction.png")
    images += _roc_and_classes(preds, tasks, {"resolution": top_res, "fraction": top_frac}, out)
    brief = [
        c
        for c in summary.columns
        if c in KEYS
        or c
        in (
            "folds",
            "test_auroc_mean",
            "test_auroc_sd",
            "pooled_auroc",
            "pooled_auroc_ci_low",
            "pooled_auroc_ci_high",
            "pooled_images",
        )
    ]
    page = html_page(
        f"fundusfm grid report: {cfg.name}",
        {
            "Summary (test part of every fold)": summary[brief],
            "Paired comparisons of initialisations": comparisons,
            "External validation (AUROC over the folds' models)": external,
        },
        images,
    )
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"
