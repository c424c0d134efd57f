"""The user's own images: a folder of class folders (`folder`) or a CSV table (`csv`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fundusfm.data.adapters.common import binary_task, images_under, importer
from fundusfm.data.manifest import TaskSpec
from fundusfm.data.manifest import read_table as read_sniffed
from fundusfm.errors import DataError


@importer("folder")
def image_folder(root: Path):
    """Generic ImageFolder: ROOT/<class>/**/image; every image its own patient."""
    rows = []
    for path in images_under(root):
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            continue
        label = rel.parts[0]
        rows.append(
            {
                "image_id": rel.with_suffix("").as_posix(),
                "path": rel.as_posix(),
                "patient_id": rel.with_suffix("").as_posix(),
                "eye": "unknown",
                "split": "all",
                "source": "folder",
                "label": label,
                "abnormal": int(label.lower() != "normal"),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, {}, []
    classes = sorted(frame["label"].unique())
    tasks = {"label": TaskSpec(kind="multiclass", columns=["label"], classes=classes)}
    if "normal" in {c.lower() for c in classes}:
        tasks["abnormal"] = binary_task(frame)
    else:
        frame = frame.drop(columns="abnormal")
    return frame, tasks, ["every image is its own patient (ImageFolder has no patient ids)"]


@importer("csv")
def csv_table(root: Path):
    """Generic table: ROOT/labels.csv (or the only CSV) with path,label[,patient_id,eye,split]."""
    table_path = root / "labels.csv"
    if not table_path.is_file():
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise DataError(f"{root}: put the table in labels.csv (path,label[,patient_id])")
        table_path = found[0]
    t, lines = read_sniffed(table_path)  # a BOM, `;` or tab delimiters and CRLF are fine
    missing = [c for c in ("path", "label") if c not in t.columns]
    if missing:
        raise DataError(
            f"{table_path}: missing columns {missing}; needs path,label (found: "
            f"{', '.join(t.columns)})"
        )
    for col in ("path", "label"):
        if (t[col] == "").any():
            i = int((t[col] == "").to_numpy().argmax())
            raise DataError(
                f"{table_path} line {lines[i]}: empty {col} ({int((t[col] == '').sum())} of "
                f"{len(t)} rows); fill it in or remove the row"
            )
    repeated = t["path"].duplicated().to_numpy()
    if repeated.any():
        second = int(repeated.argmax())
        first = int((t["path"] == t["path"].iat[second]).to_numpy().argmax())
        raise DataError(
            f"{table_path} lines {lines[first]} and {lines[second]} both list "
            f"{t['path'].iat[second]!r}; keep one row per image"
        )
    absent = ~t["path"].map(lambda rel: (root / rel).is_file()).to_numpy()
    if absent.any():
        i = int(absent.argmax())
        raise DataError(
            f"{table_path} line {lines[i]}: no file {t['path'].iat[i]!r} under {root} "
            f"({int(absent.sum())} of {len(t)} missing); paths are relative to that folder"
        )
    ids = t["path"].str.replace(r"\.[^./]+$", "", regex=True)
    if "patient_id" in t:  # a blank patient id is the image's own, never one shared patient
        t["patient_id"] = t["patient_id"].where(t["patient_id"] != "", ids)
    frame = pd.DataFrame(
        {
            "image_id": ids,
            "path": t["path"],
            "patient_id": t.get("patient_id", ids),
            "eye": t.get("eye", "unknown"),
            "split": t.get("split", "all"),
            "source": "csv",
            "label": t["label"],
        }
    )
    classes = sorted(frame["label"].unique())
    tasks = {"label": TaskSpec(kind="multiclass", columns=["label"], classes=classes)}
    if "normal" in {c.lower() for c in classes}:
        frame["abnormal"] = (frame["label"].str.lower() != "normal").astype(int)
        tasks["abnormal"] = binary_task(frame)
    return frame, tasks, [] if "patient_id" in t else ["no patient_id column: one per image"]
