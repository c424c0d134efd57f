"""Figures of a grid report (`fundusfm grid report`), each with its title and caption in words.

Curve figures plot, per task, the pooled out-of-fold test figure of each init (classification:
AUROC; segmentation: mean per-image Dice) against the labelled fraction and against the
input resolution, a panel per method, with the 95% patient-bootstrap interval as a shaded
band. Against the fraction the x position is the realised share of the training pool (mean
over folds), labelled with the nominal fraction in brackets. The per-fold mean and sd are
in the tables, not in the figures: a band and an error bar of different quantities on one
curve would invite reading one as the other.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from fundusfm.evaluation.metrics import per_class_table
from fundusfm.grid.html import Figure, interval
from fundusfm.grid.tables import method_words
from fundusfm.io import write_atomic

BAND = "the shaded band is the 95% percentile bootstrap interval over patients ({n} resamples)"


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


def save(fig, path: Path) -> Path:
    """Write a figure as PNG atomically and close it."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def _curves(ax, data: pd.DataFrame, x: str, value: str) -> None:
    """One line per init with its interval band; dashed where the group lacks folds."""
    for init, g in data.groupby("init", sort=False):
        g = g.sort_values(x)
        at = g["share_mean"] if x == "fraction" and "share_mean" in g else g[x]
        whole = bool(g["complete"].all()) if "complete" in g else True
        (line,) = ax.plot(
            at,
            g[value],
            marker="o",
            linestyle="-" if whole else "--",
            label=init if whole else f"{init} (missing folds)",
        )
        low, high = g.get(f"{value}_ci_low"), g.get(f"{value}_ci_high")
        if low is not None and high is not None:
            ax.fill_between(at, low, high, color=line.get_color(), alpha=0.15, linewidth=0)


def line_figure(
    summary: pd.DataFrame, x: str, fixed: dict, path: Path, log: bool, value: str, ylabel: str
) -> bool:
    """`value` with its CI band against `x`, one line per init, a panel per method."""
    data = summary
    for k, v in fixed.items():
        data = data[data[k] == v]
    data = data[data[value].notna()]
    if data[x].nunique() < 2:
        return False
    methods = list(data["method"].unique())
    fig, axes = plt.subplots(
        1, len(methods), figsize=(0.4 + 4.8 * len(methods), 4.0), squeeze=False
    )
    for ax, method in zip(axes[0], methods, strict=True):
        _curves(ax, data[data.method == method], x, value)
        realised = "share_mean" in data and data["share_mean"].notna().any()
        xlabel = (
            ("labelled share of the training pool (nominal)" if realised else "labelled fraction")
            if x == "fraction"
            else "input resolution (px)"
        )
        ax.set(title=method_words(method), xlabel=xlabel, ylabel=ylabel)
        ax.title.set_fontsize(9)
        if log:
            ax.set_xscale("log")
            ax.set_xticks(*fraction_ticks(data))
            ax.minorticks_off()
        else:
            ax.set_xticks(sorted(data[x].unique()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    where = ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in fixed.items()
    )
    fig.suptitle(f"{ylabel}, {where}", fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return True


def _folds_text(data: pd.DataFrame) -> str:
    done, expected = data["folds"], int(data["folds_expected"].max())
    if done.min() == done.max() == expected:
        every = "the one fold" if expected == 1 else f"all {expected} folds"
        return f"each point pools the test parts of {every}"
    return (
        f"each point pools {int(done.min())} to {int(done.max())} of the {expected} folds; "
        "dashed lines mark groups with missing folds"
    )


def curve_figures(
    summary: pd.DataFrame, out: Path, value: str, name: str, stem: str, n_boot: int
) -> list[Figure]:
    """Per task: `value` (named `name`) against the fraction (at the largest resolution) and
    against the resolution (at the largest fraction), with CI bands."""
    figures = []
    tasks = list(summary["task"].unique())
    for task in tasks:
        data = summary[summary["task"] == task]
        top_res, top_frac = data["resolution"].max(), data["fraction"].max()
        for x, fixed, log in (
            ("fraction", {"task": task, "resolution": top_res}, True),
            ("resolution", {"task": task, "fraction": top_frac}, False),
        ):
            suffix = "" if len(tasks) == 1 else f"_{task}"
            path = out / f"{stem}_vs_{x}{suffix}.png"
            if not line_figure(data, x, fixed, path, log, value, name):
                continue
            realised = "share_mean" in data and data["share_mean"].notna().any()
            against = (
                f"the labelled share of each fold's training pool (realised share, nominal "
                f"fraction in brackets; log scale) at {top_res} px"
                if x == "fraction" and realised
                else f"the labelled fraction (log scale) at {top_res} px"
                if x == "fraction"
                else f"the input resolution in pixels at labelled fraction {top_frac:g}"
            )
            caption = (
                f"{name} of task {task} against {against}: one line per initialisation, one "
                f"panel per adaptation method; {BAND.format(n=n_boot)}; {_folds_text(data)}."
            )
            title = f"{task}: {name} by {'labelled fraction' if x == 'fraction' else x}"
            figures.append(Figure(path, title, caption))
    return figures


def _ci_of(summary: pd.DataFrame, where: dict) -> str:
    row = summary[np.logical_and.reduce([summary[k] == v for k, v in where.items()])]
    if row.empty:
        return ""
    r = row.iloc[0]
    return interval(r["pooled_auroc"], r["pooled_auroc_ci_low"], r["pooled_auroc_ci_high"])


def _roc(g: pd.DataFrame, tasks, summary, where: dict, path: Path) -> Figure:
    kind, classes = tasks[where["task"]]
    fig, ax = plt.subplots(figsize=(4.6, 4.3))
    for init, gi in g.groupby("init", sort=False):
        y, s = arrays(gi, kind, classes)
        fpr, tpr, _ = roc_curve(y, s[:, 1])
        ax.plot(fpr, tpr, label=f"{init}: {_ci_of(summary, {**where, 'init': init})}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(title=f"{where['task']}, {where['method'].upper()}: pooled out-of-fold ROC")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity")
    ax.legend(fontsize=7, title="AUROC [95% CI]", title_fontsize=7)
    fig.tight_layout()
    caption = (
        f"ROC curves of the pooled out-of-fold test predictions of task {where['task']} with "
        f"{method_words(where['method'])} at {where['resolution']} px and labelled fraction "
        f"{where['fraction']:g}, one per initialisation; the legend gives each pooled AUROC "
        "with its 95% patient-bootstrap interval; the dotted diagonal is chance."
    )
    title = f"{where['task']}, {where['method'].upper()}: ROC curves"
    return Figure(save(fig, path), title, caption)


def _per_class(g: pd.DataFrame, tasks, where: dict, path: Path) -> Figure:
    kind, classes = tasks[where["task"]]
    tables = {
        init: per_class_table(kind, *arrays(gi, kind, classes), classes)
        for init, gi in g.groupby("init", sort=False)
    }
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(classes) * len(tables) / 2, 3.8))
    width = 0.8 / len(tables)
    for k, (init, t) in enumerate(tables.items()):
        ax.bar(np.arange(len(classes)) + k * width, t["auroc"], width, label=init)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=30)
    ax.set(title=f"{where['task']}, {where['method'].upper()}: per-class AUROC", ylim=(0.0, 1.0))
    ax.set(ylabel="AUROC (one class against the rest)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    caption = (
        f"AUROC of each class against the rest on the pooled out-of-fold test predictions of "
        f"task {where['task']} with {method_words(where['method'])} at {where['resolution']} "
        f"px and labelled fraction {where['fraction']:g}, one bar per initialisation."
    )
    title = f"{where['task']}, {where['method'].upper()}: AUROC per class"
    return Figure(save(fig, path), title, caption)


def report_figures(
    summary: pd.DataFrame, preds: pd.DataFrame, tasks: dict, out: Path, n_boot: int
) -> list[Figure]:
    """Curves with CI bands, then per task and method (at the largest resolution and
    fraction) ROC curves (binary) or per-class AUROC (multiclass, multilabel)."""
    figures = curve_figures(summary, out, "pooled_auroc", "pooled test AUROC", "auroc", n_boot)
    for (task, method), g in preds.groupby(["task", "method"], sort=False):
        top_res = summary.loc[summary.task == task, "resolution"].max()
        top_frac = summary.loc[summary.task == task, "fraction"].max()
        g = g[(g.resolution == top_res) & (g.fraction == top_frac)]
        if g.empty:
            continue
        where = {"task": task, "method": method, "resolution": top_res, "fraction": top_frac}
        if tasks[task][0] == "binary":
            figures.append(_roc(g, tasks, summary, where, out / f"roc_{task}_{method}.png"))
        else:
            figures.append(_per_class(g, tasks, where, out / f"per_class_{task}_{method}.png"))
    return figures
