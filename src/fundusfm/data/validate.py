"""`fundusfm data check`: validate a manifest and report every problem at once.

Checks the required columns, ids (empty, duplicated), patient ids, eye values, paths (empty,
outside the data root, missing), every image (decodes fully: empty, truncated, not an image,
decompression bomb, too small to hold a field of view), the same pixels under two ids, and
the labels of every declared task (missing, unknown, a class without images). Problems
carry the CSV line an editor shows.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fundusfm.data.decode import read_rgb
from fundusfm.data.manifest import EYES, REQUIRED_COLUMNS, Manifest
from fundusfm.data.preprocess import check_min_side
from fundusfm.errors import ImageDecodeError
from fundusfm.io import write_csv


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

    def write_csv(self, path: Path) -> None:
        """The problems as a table (line, image_id, column, message)."""
        rows = [p.__dict__ for p in self.problems]
        write_csv(path, pd.DataFrame(rows, columns=["line", "image_id", "column", "message"]))


def _decode_and_hash(path: Path) -> tuple[str | None, str | None]:
    try:
        arr = read_rgb(path)
        check_min_side(arr)
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


def _check_rows(m: Manifest, report: CheckReport) -> list[tuple[int, Path]]:
    """Ids, patients, eyes and paths of every row; returns the (row, file) pairs to decode."""
    first_row: dict[str, int] = {}
    to_decode: list[tuple[int, Path]] = []
    inside = _RootTest(m)
    add = report.problems.append
    for i, row in enumerate(m.table.itertuples(index=False)):
        line, iid = m.line(i), str(row.image_id)
        if not iid:
            add(Problem(line, "", "image_id", "empty image_id"))
        elif iid in first_row:
            first = first_row[iid]
            add(Problem(line, iid, "image_id", f"duplicate image_id (first on line {first})"))
        else:
            first_row[iid] = line
        if not str(row.patient_id):
            add(Problem(line, iid, "patient_id", "empty patient_id (use the image_id if unknown)"))
        if row.eye not in EYES:
            add(Problem(line, iid, "eye", f"{row.eye!r} is not one of {', '.join(EYES)}"))
        rel = str(row.path)
        if not rel:
            add(Problem(line, iid, "path", "empty path"))
            continue
        full = Path(os.path.normpath(m.image_path(rel)))
        if not inside(full):
            add(Problem(line, iid, "path", f"{rel!r} lies outside the data root {m.root}"))
        elif not full.is_file():
            add(Problem(line, iid, "path", f"file not found: {full}"))
        else:
            to_decode.append((i, full))
    return to_decode


def _check_decoding(m: Manifest, to_decode, report: CheckReport, workers: int, progress: bool):
    """Decode every file (threads): unreadable files and repeated image content."""
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
        line, iid = m.line(i), str(m.table["image_id"].iat[i])
        if error:
            report.problems.append(Problem(line, iid, "path", f"{full.name}: {error}"))
            continue
        report.decoded += 1
        if digest not in seen:
            seen[digest] = (line, iid)
            continue
        other_line, other_id = seen[digest]
        if other_id != iid:
            message = f"same image content as {other_id!r} (line {other_line})"
            report.problems.append(Problem(line, iid, "path", message))


def check_manifest(
    manifest: Manifest, decode: bool = True, workers: int = 0, progress: bool = True
) -> CheckReport:
    """Validate a manifest and return every problem found, not only the first one."""
    t = manifest.table
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
    to_decode = _check_rows(manifest, report)
    if decode and to_decode:
        _check_decoding(manifest, to_decode, report, workers, progress)
    _check_labels(manifest, report)
    report.problems.sort(key=lambda p: p.line)
    return report
