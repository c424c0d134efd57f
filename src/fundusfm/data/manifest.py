"""The image table: one row per image, its schema and its tasks (checks: `validate.py`).

A manifest is a CSV with the columns `image_id, path, patient_id, eye` plus label columns,
and a sidecar YAML of the same name (`manifest.csv` -> `manifest.yaml`) that says where the
images live (`root`) and which tasks the label columns define:

    name: my-clinic
    root: .                     # image paths are relative to this folder
    tasks:
      abnormal: {kind: binary, columns: [abnormal], classes: ["0", "1"]}
      disease:  {kind: multiclass, columns: [disease], classes: [normal, dr, amd]}
      diseases: {kind: multilabel, columns: [dr, amd]}

Binary and multiclass tasks read one column whose values must be one of `classes`
(for binary, the second class is the positive one). Multilabel tasks read one 0/1 column
per class. The task type is therefore always explicit, never guessed from the values.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, ValidationError, model_validator

from fundusfm.config.core import Strict
from fundusfm.data.decode import SUPPORTED_SUFFIXES
from fundusfm.errors import ConfigError, DataError
from fundusfm.io import write_text_atomic

REQUIRED_COLUMNS = ("image_id", "path", "patient_id", "eye")
EYES = ("left", "right", "unknown")


class TaskSpec(Strict):
    """One prediction task defined on the manifest's label columns."""

    kind: Literal["binary", "multiclass", "multilabel"]
    columns: list[str]
    classes: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_classes(cls, data: dict) -> dict:
        """Binary tasks default to classes 0/1; a multilabel task's classes are its columns."""
        if isinstance(data, dict):
            data = dict(data)
            if data.get("kind") == "binary" and not data.get("classes"):
                data["classes"] = ["0", "1"]
            if data.get("kind") == "multilabel":
                if data.get("classes") and list(data["classes"]) != list(data.get("columns", [])):
                    raise ValueError("a multilabel task's classes are its columns; leave them out")
                data["classes"] = list(data.get("columns", []))
        return data

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.kind in ("binary", "multiclass") and len(self.columns) != 1:
            raise ValueError(f"a {self.kind} task reads exactly one column, got {self.columns}")
        if self.kind == "binary" and len(self.classes or []) != 2:
            raise ValueError(f"a binary task has two classes, got {self.classes}")
        if self.kind == "multiclass" and not self.classes:
            raise ValueError("a multiclass task needs its list of classes")
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.classes or [])


class DatasetSpec(Strict):
    """The sidecar YAML of a manifest."""

    name: str = ""
    root: str = "."
    tasks: dict[str, TaskSpec] = Field(default_factory=dict)


@dataclass
class Manifest:
    """A loaded manifest: the table (all values as strings), its spec and its data root."""

    path: Path
    table: pd.DataFrame
    spec: DatasetSpec
    root: Path
    lines: np.ndarray | None = None  # CSV line of each row (header = 1); blank lines skipped

    def __post_init__(self) -> None:
        if self.lines is None or len(self.lines) != len(self.table):
            self.lines = np.arange(len(self.table)) + 2

    def line(self, row: int) -> int:
        return int(self.lines[row])

    def require(self, *columns: str) -> None:
        """Raise a clear error when the table lacks columns a stage needs."""
        missing = [c for c in columns if c not in self.table.columns]
        if missing:
            raise DataError(
                f"{self.path}: missing column(s) {', '.join(missing)}; "
                f"run `fundusfm data check {self.path}`"
            )

    def require_unique_ids(self) -> None:
        """Raise a clear error for an empty or repeated image_id (splits and runs key on it)."""
        self.require("image_id")
        ids = self.table["image_id"]
        empty = np.flatnonzero((ids == "").to_numpy())
        if len(empty):
            raise DataError(
                f"{self.path} line {self.line(int(empty[0]))}: empty image_id; every row needs "
                f"a unique id (run `fundusfm data check {self.path}` to list all problems)"
            )
        repeated = np.flatnonzero(ids.duplicated().to_numpy())
        if len(repeated):
            i = int(repeated[0])
            first = int(np.flatnonzero((ids == ids.iat[i]).to_numpy())[0])
            raise DataError(
                f"{self.path} line {self.line(i)}: image_id {ids.iat[i]!r} repeats line "
                f"{self.line(first)} ({len(repeated)} repeated ids in all); ids must be unique: "
                f"rename or remove the copies (run `fundusfm data check {self.path}`)"
            )

    def task(self, name: str | None = None) -> tuple[str, TaskSpec]:
        """Return a declared task by name, or the first one when `name` is None."""
        if not self.spec.tasks:
            raise DataError(f"{self.sidecar}: declares no tasks (see `tasks:` in the docs)")
        if name is None:
            name = next(iter(self.spec.tasks))
        if name not in self.spec.tasks:
            raise ConfigError(
                f"task {name!r} is not declared in {self.sidecar}; "
                f"declared: {', '.join(self.spec.tasks)}"
            )
        return name, self.spec.tasks[name]

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    def image_path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p


def sidecar_path(manifest_path: Path) -> Path:
    return Path(manifest_path).with_suffix(".yaml")


def read_table(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a manifest CSV as stripped strings, with the file line of every row.

    Tolerates a BOM, `;` or tab delimiters and CRLF endings; blank lines are skipped but
    counted, so problems are reported at the line an editor shows (a quoted value that
    spans lines still shifts the count).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        table = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            sep=None,
            engine="python",
            encoding="utf-8-sig",
            skip_blank_lines=False,
        )
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8 (in Excel: 'CSV UTF-8')"
        ) from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as CSV ({exc})") from exc
    table.columns = [str(c).strip() for c in table.columns]
    table = table.fillna("").apply(lambda col: col.str.strip())  # " P1" is "P1"
    lines = np.arange(len(table)) + 2
    keep = (table != "").any(axis=1).to_numpy()
    return table[keep].reset_index(drop=True), lines[keep]


def load_manifest(path: Path) -> Manifest:
    """Load a manifest CSV and its sidecar YAML (which may be absent: no tasks, root = folder)."""
    path = Path(path)
    table, lines = read_table(path)
    side = sidecar_path(path)
    spec = DatasetSpec()
    if side.is_file():
        try:
            spec = DatasetSpec.model_validate(yaml.safe_load(side.read_text("utf-8")) or {})
        except (ValidationError, yaml.YAMLError) as exc:
            raise DataError(f"{side}: invalid dataset description:\n{exc}") from exc
    root = (side.parent / spec.root).resolve()
    return Manifest(path=path, table=table, spec=spec, root=root, lines=lines)


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (Linux names decoded with
    surrogate escapes) are shown as `\\xNN`, so `b"caf\\xe9.jpg"` reads `caf\\xe9.jpg`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    """Whether a file name can be written to a UTF-8 manifest as it is."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def save_manifest(table: pd.DataFrame, spec: DatasetSpec, path: Path) -> Path:
    """Write a manifest CSV and its sidecar YAML (each whole or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = table.to_csv(index=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where, value = next(
            (
                (f"line {i + 2}, column {c}", v)
                for c in table.columns
                for i, v in enumerate(table[c].astype(str))
                if not is_utf8(v)
            ),
            ("the header", ",".join(map(str, table.columns))),
        )
        raise DataError(
            f"cannot write {path}: {where}: '{printable(value)}' is not valid UTF-8 "
            "(a file name in another system's encoding?); rename it"
        ) from exc
    write_text_atomic(path, text)
    spec_text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    write_text_atomic(sidecar_path(path), spec_text)
    return path


def scan_folder(
    root: Path, pattern: str = "**/*", skipped: list[str] | None = None
) -> pd.DataFrame:
    """A label-free manifest of every supported image under `root` matching a glob pattern.

    image_id is the relative path without suffix; without patient information every image is
    its own patient (say so in a paper: grouped splits need real patient ids). Files whose
    names are not valid UTF-8 cannot be written to a manifest: they are left out and their
    names (as `printable` shows them) appended to `skipped`, when given.
    """

    root = Path(root)
    files = sorted(
        p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
    )
    rows = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if not is_utf8(rel):
            if skipped is not None:
                skipped.append(printable(rel))
            continue
        iid = rel.rsplit(".", 1)[0]
        rows.append({"image_id": iid, "path": rel, "patient_id": iid, "eye": "unknown"})
    return pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))


def patient_of(table: pd.DataFrame) -> pd.Series:
    """Each row's patient for grouping (bootstrap, folds): its `patient_id`, or the image
    alone where that is blank or absent (blank ids must not make one patient of them all)."""
    ids = table["image_id"].astype(str)
    who = table["patient_id"].astype(str).str.strip() if "patient_id" in table else ids
    return who.where(who != "", "image:" + ids)


def encode_labels(manifest: Manifest, task: TaskSpec) -> np.ndarray:
    """Labels as integers: (N,) class indices for binary/multiclass, (N, C) 0/1 for multilabel.

    Raises DataError naming the first offending row; run `fundusfm data check` for all of them.
    """
    t = manifest.table
    manifest.require(*task.columns)  # a clear error, not a KeyError, for a missing column
    if task.kind == "multilabel":
        out = np.zeros((len(t), len(task.columns)), dtype=np.int64)
        for j, col in enumerate(task.columns):
            bad = ~t[col].isin(["0", "1"])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                _bad_label(manifest, i, col, "0/1")
            out[:, j] = t[col].astype(int).to_numpy()
        return out
    col = task.columns[0]
    lookup = {c: i for i, c in enumerate(task.class_names)}
    codes = t[col].map(lookup)
    if codes.isna().any():
        _bad_label(manifest, int(np.flatnonzero(codes.isna().to_numpy())[0]), col, task.classes)
    return codes.to_numpy(dtype=np.int64)


def _bad_label(manifest: Manifest, i: int, col: str, allowed) -> None:
    """Raise the error for the first row whose label is empty or not an allowed value."""
    t, where = manifest.table, f"{manifest.path} line {manifest.line(i)}"
    n = int((t[col] == "").sum())
    if t[col].iat[i] == "":
        raise DataError(
            f"{where}: empty label in column {col} ({n} empty in all); fill in a label or "
            f"remove the row (run `fundusfm data check {manifest.path}` to list all problems)"
        )
    raise DataError(f"{where}: {col}={t[col].iat[i]!r} is not one of {allowed}")


def scan_to_manifest(root: Path, out: Path, pattern: str = "**/*") -> tuple[int, list[str]]:
    """`fundusfm data scan`: write the label-free manifest of `root` to `out`; returns the
    number of images and the names skipped (not valid UTF-8)."""
    skipped: list[str] = []
    table = scan_folder(root, pattern, skipped)
    if table.empty:
        names = f" ({len(skipped)} skipped: names not valid UTF-8)" if skipped else ""
        raise DataError(f"no JPEG/PNG/TIFF/BMP/GIF images under {root} match {pattern!r}{names}")
    rel_root = os.path.relpath(Path(root).resolve(), Path(out).parent.resolve())
    save_manifest(table, DatasetSpec(name=Path(root).name, root=rel_root), out)
    return len(table), skipped
