"""What the grid's reports share: the group keys, which groups are complete, a cell's
external metrics. Used by `report` (classification) and `seg_report` (segmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fundusfm.config.grid import GridConfig
from fundusfm.grid.cells import expand, state
from fundusfm.io import read_json

KEYS = ["task", "init", "method", "resolution", "fraction"]
NOT_DONE = ("failed", "stale", "pending")


def external_metrics(cfg: GridConfig, d: Path) -> dict:
    """`ext_<set>_<metric>` of a cell folder's external evaluations."""
    row = {}
    for ext in cfg.external:
        path = d / "external" / ext.name / "metrics.json"
        if path.is_file():
            ext_metrics = read_json(path)["external"]
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
