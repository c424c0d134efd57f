"""What the grid's reports share: the group keys, which groups are complete, a cell's
external metrics, the methods in words and the Holm family of a comparison. Used by
`report` (classification) and `seg_report` (segmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fundusfm.config.grid import GridConfig
from fundusfm.evaluation.stats import holm
from fundusfm.grid.cells import expand, state
from fundusfm.io import read_json

KEYS = ["task", "init", "method", "resolution", "fraction"]
NOT_DONE = ("failed", "stale", "pending")
ALPHA = 0.05  # significance level of the Holm-adjusted p-values
WILCOXON = "Wilcoxon signed-rank (paired per-image Dice)"  # the segmentation report's test
# one Holm family: the pairwise comparisons of inits at one task, method, resolution, fraction
FAMILY = ["task", "method", "resolution", "fraction"]
METHOD_WORDS = {
    "lf": "LF (linear fine-tuning of a frozen backbone)",
    "ff": "FF (full fine-tuning)",
    "partial": "partial fine-tuning (last stages)",
    "frozen": "frozen encoder (decoder trained)",
    "full": "full fine-tuning of encoder and decoder",
}


def method_words(method: str) -> str:
    return METHOD_WORDS.get(method, method)


def add_holm(comparisons: pd.DataFrame, p: str) -> pd.DataFrame:
    """`p_holm`: the `p` column adjusted by Holm's method within each FAMILY (the pairwise
    comparisons of every init at one task, method, resolution and fraction)."""
    out = comparisons.copy()
    if out.empty:
        out["p_holm"] = pd.Series(dtype=float)
        return out
    out["p_holm"] = out.groupby(FAMILY, sort=False)[p].transform(lambda v: holm(v.to_numpy()))
    return out


def external_metrics(cfg: GridConfig, d: Path) -> dict:
    """`ext_<set>_<metric>` of a cell folder's external evaluations."""
    row = {}
    for ext in cfg.external:
        path = d / "external" / ext.name / "metrics.json"
        if path.is_file():
            ext_metrics = read_json(path)["external"]
            row.update({f"ext_{ext.name}_{k}": v for k, v in ext_metrics.items()})
    return row


def at_axis_resolutions(frame: pd.DataFrame, cfg: GridConfig) -> pd.DataFrame:
    """Rows of inits with their own input size (`axes.init_resolution`) repeated at every
    resolution of the axis, so that the comparisons pair them with every other init there;
    `input_resolution` keeps the size each model was fed."""
    frame = frame.assign(input_resolution=frame["resolution"])
    own = getattr(cfg.axes, "init_resolution", {})
    if not own or frame.empty:
        return frame
    mine = frame["init"].isin(list(own))
    copies = [frame[mine].assign(resolution=r) for r in cfg.axes.resolution]
    return pd.concat([frame[~mine], *copies], ignore_index=True)


def once_per_pair(comparisons: pd.DataFrame, cfg: GridConfig) -> pd.DataFrame:
    """Two inits that both run at their own size meet at every axis resolution with the same
    images and scores: keep that pair at the first one only, so it is tested (and counted in
    a Holm family) once."""
    own = list(getattr(cfg.axes, "init_resolution", {}))
    if len(own) < 2 or comparisons.empty:
        return comparisons
    both = comparisons["init_a"].isin(own) & comparisons["init_b"].isin(own)
    return comparisons[~both | (comparisons["resolution"] == cfg.axes.resolution[0])]


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
