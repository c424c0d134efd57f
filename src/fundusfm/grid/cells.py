"""The cells of the experiment grid: every task x init x method x resolution x fraction x fold.

Each cell is a run folder under `<out>/cells/` named by its coordinates, e.g.
`task=abnormal/init=fundus/method=lf/res=512/frac=0.1/fold=3`. A cell is done when its
`done` marker exists and holds the fingerprint of the cell's inputs (settings, manifest,
splits, external sets, init weights, FOV rule); a done cell whose inputs changed is stale and
runs again. Torch-free, so `grid status` and `grid report` start fast.
"""

from __future__ import annotations

import functools
import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fundusfm.config.core import FinetuneConfig
from fundusfm.config.grid import (
    VESSELS,
    ClassificationGrid,
    GridConfig,
    ProbeConfig,
    SegmentationGrid,
)
from fundusfm.config.segment import SegmentConfig
from fundusfm.data.manifest import load_manifest, sidecar_path
from fundusfm.data.preprocess import FOV_RULE
from fundusfm.errors import ConfigError, FundusError
from fundusfm.io import file_sha256, read_json, value_sha256, write_text_atomic


@dataclass(frozen=True)
class Cell:
    task: str | None
    init_label: str
    init: str
    method: str
    resolution: int
    fraction: float
    fold: int

    @property
    def id(self) -> str:
        return (
            f"task={self.task or 'default'}/init={self.init_label}/method={self.method}/"
            f"res={self.resolution}/frac={self.fraction:g}/fold={self.fold}"
        )

    def coordinates(self) -> dict:
        return {
            "task": self.task or "default",
            "init": self.init_label,
            "method": self.method,
            "resolution": self.resolution,
            "fraction": self.fraction,
            "fold": self.fold,
        }


def _default_task(cfg: ClassificationGrid) -> str | None:
    """The base task, else the first task the manifest declares (so every cell names one)."""
    if cfg.base.data.task or cfg.base.data.manifest is None:
        return cfg.base.data.task
    try:
        return load_manifest(cfg.base.data.manifest).task(None)[0]
    except (FundusError, OSError):
        return None


def _tasks(cfg: GridConfig) -> list[str | None]:
    """The task axis: a classification grid's (null: the default task), or vessels."""
    if isinstance(cfg, SegmentationGrid):
        return [VESSELS]
    default = _default_task(cfg)
    return [task or default for task in cfg.axes.task]


def expand(cfg: GridConfig) -> list[Cell]:
    """All distinct cells, in a fixed order (the order shards are cut from)."""
    a = cfg.axes
    own = getattr(a, "init_resolution", {})  # classification: inits at their own size
    cells: dict[str, Cell] = {}
    for task, label, method in itertools.product(_tasks(cfg), a.init, a.method):
        resolutions = [own[label]] if label in own else a.resolution
        for res, frac, fold in itertools.product(resolutions, a.fraction, a.fold):
            cell = Cell(task, label, a.init[label], method, res, frac, fold)
            cells.setdefault(cell.id, cell)
    return list(cells.values())


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: I must lie in 0..N-1")
    return i, n


def shard(cells: list[Cell], i: int, n: int) -> list[Cell]:
    return [c for k, c in enumerate(cells) if k % n == i]


def cell_dir(cfg: GridConfig, cell: Cell) -> Path:
    return Path(cfg.out) / "cells" / cell.id


def _segment_config(cfg: SegmentationGrid, cell: Cell) -> SegmentConfig:
    """Built through validation, so a cell's resolution or patch is checked like a file's."""
    d = cfg.segment.model_dump(mode="json")
    d["data"].update(fold=cell.fold, fraction=cell.fraction, resolution=cell.resolution)
    d["model"].update(init=cell.init, encoder=cell.method)
    d["run"].update(out=str(cell_dir(cfg, cell)), resume=True)
    return SegmentConfig.model_validate(d)


def cell_config(cfg: GridConfig, cell: Cell) -> FinetuneConfig | SegmentConfig:
    """The base settings with the cell's coordinates filled in."""
    if isinstance(cfg, SegmentationGrid):
        return _segment_config(cfg, cell)
    base = cfg.base
    data = base.data.model_copy(
        update={
            "task": cell.task or base.data.task,
            "fold": cell.fold,
            "fraction": cell.fraction,
            "resolution": cell.resolution,
        }
    )
    model = base.model.model_copy(update={"init": cell.init})
    run = base.run.model_copy(update={"out": cell_dir(cfg, cell), "resume": True})
    return base.model_copy(update={"data": data, "model": model, "method": cell.method, "run": run})


def _settings(c: FinetuneConfig | SegmentConfig) -> dict:
    """What a cell's result depends on: everything but run.* (output folder, progress)."""
    return {k: v for k, v in c.model_dump(mode="json").items() if k != "run"}


@functools.lru_cache(maxsize=256)
def _digest(path: str, version: tuple) -> str:
    return file_sha256(Path(path))


def content_digest(path: Path | None) -> str | None:
    """sha256 of a file the cells read, computed once per version of it (ctime cannot be set
    back by copying tools, so a rewrite is always seen); a set path that is not a file is an
    error, never a silent change of every fingerprint."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found (paths in a grid YAML are relative to where it runs)")
    st = path.stat()
    version = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
    return _digest(str(path.resolve()), version)


def _init_digest(init: str | None, init_bundle: Path | None, init_file=None) -> str | None:
    """The weights a cell starts from: a bundle's weights sha256, a published checkpoint's
    file sha256 (`retfound:PATH` or `model.init_file`); a name is its own digest."""
    for candidate in (init_bundle, init):
        if candidate and (Path(candidate) / "bundle.json").is_file():
            return read_json(Path(candidate) / "bundle.json").get("weights_sha256")
    name, sep, path = (init or "").partition(":")
    if sep and Path(path).is_file():
        return f"{name}:{content_digest(Path(path))}"
    return f"{init}:{content_digest(init_file)}" if init_file else init


def fingerprint(cfg: GridConfig, cell: Cell) -> str:
    """Hash of what a cell's result depends on, written into its `done` marker: its settings,
    the probe and external sets, the contents of every file it reads (manifest and its YAML,
    splits: a `fundusfm split` rerun in place makes the cells stale; external manifests and
    label maps), the weights of its init bundle and the FOV rule its images were cropped with."""
    c = cell_config(cfg, cell)
    files = [c.data.manifest, c.data.splits]
    files += [sidecar_path(c.data.manifest)] if c.data.manifest else []
    for e in cfg.external:
        files += [e.manifest, sidecar_path(e.manifest)]
        # a label map is a file or the name of a shipped one (part of the settings)
        label_map = getattr(e, "label_map", None)  # classification external sets only
        files += [label_map] if label_map and Path(label_map).is_file() else []
    # Until grids were split by kind both kinds held a probe and every external-set key: the
    # blob keeps them (a segmentation grid's probe at its default, unset keys as null) so
    # that the cells done before stay done.
    probe = cfg.probe if isinstance(cfg, ClassificationGrid) else ProbeConfig()
    unset = {"task": None, "label_map": None, "split": None}
    blob = {
        "cell": _settings(c),
        "probe": probe.model_dump(mode="json"),
        "external": [{**unset, **e.model_dump(mode="json")} for e in cfg.external],
        "files": [content_digest(f) for f in files],
        "init": _init_digest(
            c.model.init, getattr(c.model, "init_bundle", None), c.model.init_file
        ),
        "fov_rule": FOV_RULE,
    }
    return value_sha256(blob)


def state(cfg: GridConfig, cell: Cell) -> str:
    """done (with these settings), stale (done with others), failed or pending."""
    d = cell_dir(cfg, cell)
    marker = d / "done"
    if marker.is_file():
        return "done" if marker.read_text().strip() == fingerprint(cfg, cell) else "stale"
    if (d / "error.txt").is_file():
        return "failed"
    return "pending"


def start_cell(cfg: GridConfig, cell: Cell) -> str:
    """Prepare a cell's folder to run and return its fingerprint.

    The fingerprint is written when the cell starts (`<cell>/fingerprint`); a folder whose
    fingerprint differs or is missing was left by other inputs (settings, manifest, splits,
    init weights, FOV rule), so it is removed and the cell starts fresh, never resuming or
    reusing a model trained on other data. A folder with the same fingerprint (a killed or
    failed run) resumes.
    """
    d = cell_dir(cfg, cell)
    stamp = fingerprint(cfg, cell)
    mark = d / "fingerprint"
    if d.exists() and (not mark.is_file() or mark.read_text().strip() != stamp):
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(mark, stamp)
    for name in ("error.txt", "done"):
        (d / name).unlink(missing_ok=True)
    return stamp


def status(cfg: GridConfig) -> pd.DataFrame:
    """One row per cell: its coordinates and done / stale / failed / pending."""
    rows = [{"cell": c.id, **c.coordinates(), "state": state(cfg, c)} for c in expand(cfg)]
    return pd.DataFrame(rows)
