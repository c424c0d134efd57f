"""What the dataset adapters share: the registry (`importer` registers an adapter under the
name `fundusfm data import NAME` takes) and helpers to find and read a dataset's files."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fundusfm.data.decode import SUPPORTED_SUFFIXES
from fundusfm.data.manifest import TaskSpec

Importer = Callable[[Path], tuple[pd.DataFrame, dict[str, TaskSpec], list[str]]]
REGISTRY: dict[str, Importer] = {}


def importer(name: str):
    def register(fn: Importer) -> Importer:
        REGISTRY[name] = fn
        return fn

    return register


def images_under(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
    )


def find_file(root: Path, pattern: str) -> Path | None:
    """The first file under root whose name matches a regex (case-insensitive)."""
    rx = re.compile(pattern, re.IGNORECASE)
    return next((p for p in sorted(root.rglob("*")) if p.is_file() and rx.fullmatch(p.name)), None)


def read_table(path: Path, **kwargs) -> pd.DataFrame:
    """A CSV with header cells cleaned (trailing spaces, non-breaking spaces, BOM)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", **kwargs)
    table.columns = [str(c).replace("\u00a0", " ").strip() for c in table.columns]
    return table.loc[:, [c for c in table.columns if c and not c.startswith("Unnamed")]]


def binary_task(frame: pd.DataFrame) -> TaskSpec:
    frame["abnormal"] = frame["abnormal"].astype(int).astype(str)
    return TaskSpec(kind="binary", columns=["abnormal"], classes=["0", "1"])


def index_images(root: Path) -> dict[str, list[Path]]:
    """Image files by lower-case stem (several files may share one across splits)."""
    out: dict[str, list[Path]] = {}
    for p in images_under(root):
        out.setdefault(p.stem.lower(), []).append(p)
    return out


def in_split(paths: list[Path], words: tuple[str, ...], root: Path) -> Path | None:
    """The file whose folders below ROOT name the split (e.g. 'Training' or 'Test')."""
    for p in paths:
        parts = " ".join(p.relative_to(root).parent.parts).lower()
        if any(w in parts for w in words):
            return p
    return None
