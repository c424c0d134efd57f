"""Figures and the self-contained HTML page of a grid report (`fundusfm grid report`).

Line figures plot the mean test metric over folds (sd as error bars) per init, a panel per
method; against the labelled fraction the x position is the realised share of the training
pool (mean over folds), labelled with the nominal fraction in brackets.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from fundusfm.evaluation.metrics import auroc, per_class_table


def arrays(frame: pd.DataFrame, kind: str, classes: list[str]):
    """Labels and (N, C) scores of prediction rows (predictions.csv columns)."""
    scores = frame[[f"score_{c}" for c in classes]].to_numpy(float)
    if kind == "multilabel":
        return frame[[f"y_{c}" for c in classes]].to_numpy(int), scores
    return frame["y_true"].to_numpy(int), scores


def fraction_ticks(data: pd.DataFrame) -> tuple[list[float], list[str]]:
    """Tick positions (realised share, mean over folds) and labels 'share (nominal)'."""
    if "share_mean" not in data or data["share_mean"].isna().all():
        ticks = sorted(data["fraction"].unique())
        return ticks, [f"{t:.0%}" for t in ticks]
    shares = data.groupby("fraction")["share_mean"].mean().sort_index()
    return list(shares.values), [f"{v:.1%} ({f:g})" for f, v in shares.items()]


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
            at = g["share_mean"] if x == "fraction" and "share_mean" in g else g[x]
            whole = bool(g["complete"].all()) if "complete" in g else True
            ax.errorbar(
                at,
                g[f"test_{metric}_mean"],
                yerr=g[f"test_{metric}_sd"],
                marker="o",
                capsize=3,
                linestyle="-" if whole else "--",
                label=init if whole else f"{init} (missing folds)",
            )
        ylabel = f"test {metric.upper() if metric == 'auroc' else metric} (mean, sd over folds)"
        xlabel = "labelled share of the training pool (nominal)" if x == "fraction" else x
        ax.set(title=f"{method.upper()}", xlabel=xlabel, ylabel=ylabel)
        if log:
            ax.set_xscale("log")
            ax.set_xticks(*fraction_ticks(data))
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
                y, s = arrays(gi, kind, classes)
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
                init: per_class_table(kind, *arrays(gi, kind, classes), classes)
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


PROTOCOL = (
    "What each figure is (folds, labelled shares, pooled AUROC, patient-bootstrap intervals, "
    "clustered tests) and what may be compared: docs/protocol.md in fundusfm."
)


def html_page(title: str, tables: dict[str, pd.DataFrame], images: list[Path]) -> str:
    """One self-contained page: the figures inlined as PNG, then the tables."""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p><em>{html.escape(PROTOCOL)}</em></p>"]
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


def report_figures(
    summary: pd.DataFrame, preds: pd.DataFrame, tasks: dict, out: Path
) -> list[Path]:
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
