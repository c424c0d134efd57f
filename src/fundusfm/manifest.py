"""The image table: one row per image, its schema, its tasks, its validation.

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

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, ValidationError, model_validator
from tqdm import tqdm

from .config import ConfigError, Strict
from .decode import ImageDecodeError, read_rgb

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
            raise ConfigError(
                f"{self.path}: missing column(s) {', '.join(missing)}; "
                f"run `fundusfm data check {self.path}`"
            )

    def task(self, name: str | None = None) -> tuple[str, TaskSpec]:
        """Return a declared task by name, or the first one when `name` is None."""
        if not self.spec.tasks:
            raise ConfigError(f"{self.sidecar}: declares no tasks (see `tasks:` in the docs)")
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
        raise ConfigError(f"manifest not found: {path}")
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
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(f"{path}: cannot read as CSV ({exc})") from exc
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
            raise ConfigError(f"{side}: invalid dataset description:\n{exc}") from exc
    root = (side.parent / spec.root).resolve()
    return Manifest(path=path, table=table, spec=spec, root=root, lines=lines)


def save_manifest(table: pd.DataFrame, spec: DatasetSpec, path: Path) -> Path:
    """Write a manifest CSV and its sidecar YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    side = sidecar_path(path)
    side.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "utf-8")
    return path


def scan_folder(root: Path, pattern: str = "**/*") -> pd.DataFrame:
    """A label-free manifest of every supported image under `root` matching a glob pattern.

    image_id is the relative path without suffix; without patient information every image is
    its own patient (say so in a paper: grouped splits need real patient ids).
    """
    from .decode import SUPPORTED_SUFFIXES

    root = Path(root)
    files = sorted(
        p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
    )
    rows = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        iid = rel.rsplit(".", 1)[0]
        rows.append({"image_id": iid, "path": rel, "patient_id": iid, "eye": "unknown"})
    return pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))


def encode_labels(manifest: Manifest, task: TaskSpec) -> np.ndarray:
    """Labels as integers: (N,) class indices for binary/multiclass, (N, C) 0/1 for multilabel.

    Raises ConfigError naming the first offending row; run `fundusfm data check` for all of them.
    """
    t = manifest.table
    if task.kind == "multilabel":
        out = np.zeros((len(t), len(task.columns)), dtype=np.int64)
        for j, col in enumerate(task.columns):
            bad = ~t[col].isin(["0", "1"])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ConfigError(
                    f"{manifest.path} line {manifest.line(i)}: {col}={t[col].iat[i]!r}, need 0/1"
                )
            out[:, j] = t[col].astype(int).to_numpy()
        return out
    col = task.columns[0]
    lookup = {c: i for i, c in enumerate(task.class_names)}
    codes = t[col].map(lookup)
    if codes.isna().any():
        i = int(np.flatnonzero(codes.isna().to_numpy())[0])
        raise ConfigError(
            f"{manifest.path} line {manifest.line(i)}: {col}={t[col].iat[i]!r} is not one of "
            f"{task.classes}"
        )
    return codes.to_numpy(dtype=np.int64)


@dataclass
class Problem:
    """One thing wrong with a manifest; `line` is the CSV line (header = 1), 0 = whole file."""

    line: int
    image_id: str
    column: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "manifest"
        who = f" [{self.image_id}]" if self.image_id else ""
        return f"{where}{who} {self.column}: {self.message}"


@dataclass
class CheckReport:
    """Everything `check_manifest` found, plus the counts that were fine."""

    rows: int
    problems: list[Problem] = field(default_factory=list)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    decoded: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode_and_hash(path: Path) -> tuple[str | None, str | None]:
    try:
        arr = read_rgb(path)
    except ImageDecodeError as exc:
        return None, str(exc)
    digest = hashlib.blake2b(arr.tobytes(), digest_size=16)
    digest.update(str(arr.shape).encode())
    return digest.hexdigest(), None


def _check_labels(m: Manifest, report: CheckReport) -> None:
    t = m.table
    for name, task in m.spec.tasks.items():
        missing_cols = [c for c in task.columns if c not in t.columns]
        if missing_cols:
            report.problems.append(
                Problem(0, "", ",".join(missing_cols), f"task {name!r} needs these columns")
            )
            continue
        allowed = ["0", "1"] if task.kind == "multilabel" else task.class_names
        counts: dict[str, int] = {}
        for col in task.columns:
            values = t[col]
            for i in np.flatnonzero((values == "").to_numpy()):
                report.problems.append(
                    Problem(
                        m.line(i), t["image_id"].iat[i], col, f"missing label for task {name!r}"
                    )
                )
            bad = (values != "") & ~values.isin(allowed)
            for i in np.flatnonzero(bad.to_numpy()):
                report.problems.append(
                    Problem(
                        m.line(i),
                        t["image_id"].iat[i],
                        col,
                        f"unknown label {values.iat[i]!r} for task {name!r}; expected one of "
                        f"{allowed}",
                    )
                )
            if task.kind == "multilabel":
                counts[col] = int((values == "1").sum())
            else:
                counts = {c: int((values == c).sum()) for c in task.class_names}
        for cls, n in counts.items():
            if n == 0:
                report.problems.append(
                    Problem(0, "", name, f"class {cls!r} has no images in task {name!r}")
                )
        report.class_counts[name] = counts


class _RootTest:
    """Is a path inside the data root? Judged on the path as written (no `..` out of the root,
    no absolute path elsewhere), where the root may be reached under any alias (symlink).
    Symlinks below the root may point anywhere, as data folders are often linked in."""

    def __init__(self, m: Manifest):
        self.root = m.root
        self.resolved: dict[Path, bool] = {}

    def __call__(self, full: Path) -> bool:
        for parent in full.parents:
            if parent not in self.resolved:
                self.resolved[parent] = parent == self.root or parent.resolve() == self.root
            if self.resolved[parent]:
                return True
        return False


def check_manifest(
    manifest: Manifest, decode: bool = True, workers: int = 0, progress: bool = True
) -> CheckReport:
    """Validate a manifest and return every problem found, not only the first one."""
    m, t = manifest, manifest.table
    report = CheckReport(rows=len(t))
    if len(t) == 0:
        report.problems.append(Problem(0, "", "", "the manifest has no rows"))
        return report
    missing = [c for c in REQUIRED_COLUMNS if c not in t.columns]
    if missing:
        report.problems.append(
            Problem(0, "", ",".join(missing), f"required columns missing (need {REQUIRED_COLUMNS})")
        )
        return report

    first_row: dict[str, int] = {}
    to_decode: list[tuple[int, Path]] = []  # (row, file)
    inside = _RootTest(m)
    for i, row in enumerate(t.itertuples(index=False)):
        line, iid = m.line(i), str(row.image_id)
        if not iid:
            report.problems.append(Problem(line, "", "image_id", "empty image_id"))
        elif iid in first_row:
            report.problems.append(
                Problem(
                    line, iid, "image_id", f"duplicate image_id (first on line {first_row[iid]})"
                )
            )
        else:
            first_row[iid] = line
        if not str(row.patient_id):
            report.problems.append(
                Problem(line, iid, "patient_id", "empty patient_id (use the image_id if unknown)")
            )
        if row.eye not in EYES:
            report.problems.append(
                Problem(line, iid, "eye", f"{row.eye!r} is not one of {', '.join(EYES)}")
            )
        rel = str(row.path)
        if not rel:
            report.problems.append(Problem(line, iid, "path", "empty path"))
            continue
        full = Path(os.path.normpath(m.image_path(rel)))
        if not inside(full):
            report.problems.append(
                Problem(line, iid, "path", f"{rel!r} lies outside the data root {m.root}")
            )
            continue
        if not full.is_file():
            report.problems.append(Problem(line, iid, "path", f"file not found: {full}"))
            continue
        to_decode.append((i, full))

    if decode and to_decode:
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            results = list(
                tqdm(
                    pool.map(lambda item: _decode_and_hash(item[1]), to_decode),
                    total=len(to_decode),
                    desc="decode",
                    disable=not progress,
                    unit="img",
                )
            )
        seen: dict[str, tuple[int, str]] = {}
        for (i, full), (digest, error) in zip(to_decode, results, strict=True):
            line, iid = m.line(i), str(t["image_id"].iat[i])
            if error:
                report.problems.append(Problem(line, iid, "path", f"{full.name}: {error}"))
                continue
            report.decoded += 1
            if digest in seen:
                other_line, other_id = seen[digest]
                if other_id != iid:
                    report.problems.append(
                        Problem(
                            line,
                            iid,
                            "path",
                            f"same image content as {other_id!r} (line {other_line})",
                        )
                    )
            else:
                seen[digest] = (line, iid)
    _check_labels(m, report)
    report.problems.sort(key=lambda p: p.line)
    return report
