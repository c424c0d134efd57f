"""Running the experiment grid: each pending cell (`grid.cells`) trained, evaluated, marked done.

A cell's `done` marker is written after training and every external evaluation; done cells are
skipped, so rerunning the same command resumes a killed grid, and a killed training cell
continues from its checkpoint. A cell that fails leaves `error.txt` (the traceback) and the
grid goes on. `--shard i/n` runs the cells whose position modulo n is i (0-based, like a
Slurm array index), so n machines cover every cell exactly once.

LF cells go through the feature cache (`<out>/features/`) unless `probe.mode: train`;
FF and partial cells run the training loop. Every finished cell is evaluated on each
external set into `<cell>/external/<name>/`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path

from fundusfm.config.grid import (
    ClassificationExternal,
    GridConfig,
    SegmentationExternal,
    SegmentationGrid,
)
from fundusfm.engine.distributed import launched
from fundusfm.errors import ConfigError
from fundusfm.grid.cells import (
    Cell,
    cell_config,
    cell_dir,
    expand,
    parse_shard,
    shard,
    start_cell,
    state,
)
from fundusfm.io import read_json, write_text_atomic
from fundusfm.tasks.classify import finetune, probe_finetune, run_notes
from fundusfm.tasks.evaluate import evaluate
from fundusfm.tasks.segment import evaluate_segmentation, train_segmentation


def _train(cfg: GridConfig, cell: Cell, progress: bool) -> tuple[Path, Callable]:
    """Train (or probe) one cell; returns its folder and how it scores an external set."""
    c = cell_config(cfg, cell)
    c = c.model_copy(update={"run": c.run.model_copy(update={"progress": progress})})
    if isinstance(cfg, SegmentationGrid):
        out = train_segmentation(c)

        def score(ext: SegmentationExternal) -> None:
            evaluate_segmentation(
                out / "bundle", ext.manifest, out / "external" / ext.name, ext.split,
                c.train.device, progress,
            )  # fmt: skip

        return out, score
    if cell.method == "lf" and cfg.probe.mode == "features":
        out = probe_finetune(c, cfg.probe, Path(cfg.out) / "features")
    else:
        out = finetune(c)

    def score(ext: ClassificationExternal) -> None:
        evaluate(
            out / "bundle", ext.manifest, out / "external" / ext.name, ext.label_map,
            ext.task or c.data.task, device=c.train.device, progress=progress,
        )  # fmt: skip

    return out, score


def run_cell(cfg: GridConfig, cell: Cell, stamp: str, progress: bool = False) -> Path:
    """Train (or probe) one cell, then evaluate it on every external set; `stamp` (from
    `start_cell`, computed before training) is written into the `done` marker."""
    out, score = _train(cfg, cell, progress)
    for ext in cfg.external:
        score(ext)
    write_text_atomic(out / "done", stamp)
    return out


def cell_notes(out: Path) -> list[str]:
    """The warnings of a finished classification cell (segmentation cells have none yet)."""
    metrics = out / "metrics.json"
    return run_notes(read_json(metrics)) if metrics.is_file() else []


def run_grid(
    cfg: GridConfig,
    shard_spec: str | None = None,
    dry_run: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run this shard's cells that are not done yet; returns counts by outcome."""
    if launched():
        raise ConfigError(
            "grid run is not run under torchrun: it trains many small cells. Spread cells over "
            "GPUs with --shard I/N (one process per GPU, e.g. a Slurm array); see the README"
        )
    i, n = parse_shard(shard_spec)
    cells = shard(expand(cfg), i, n)
    counts = {"done": 0, "ran": 0, "failed": 0, "pending": 0}
    for k, cell in enumerate(cells):
        if state(cfg, cell) == "done":
            counts["done"] += 1
            continue
        if dry_run:
            counts["pending"] += 1
            say(f"pending {cell.id}")
            continue
        say(f"[{k + 1}/{len(cells)}] {cell.id}")
        stamp = start_cell(cfg, cell)
        error = cell_dir(cfg, cell) / "error.txt"
        try:
            out = run_cell(cfg, cell, stamp, progress)
            counts["ran"] += 1
            for note in cell_notes(out):
                say(f"  warning: {note}")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failed cell is recorded; the others go on
            error.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(error, traceback.format_exc())
            counts["failed"] += 1
            say(f"  failed: {type(exc).__name__}: {exc} (see {error})")
    return counts
