"""Grid and benchmark commands: grid run / status / report, bench lf / cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from ..config import PreprocessConfig
from ..manifest import load_manifest
from . import ConfigOpt, QuietOpt, SetOpt, bench_app, grid_app, resolve, user_errors

GridArg = Annotated[Path, typer.Argument(help="Grid YAML (see configs/grid*.yaml).")]


@grid_app.command("run")
def grid_run(
    grid: GridArg,
    shard: Annotated[
        str | None, typer.Option(help="I/N: run every N-th cell from I (0-based).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells to run.")] = False,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the cells of a grid that are not done yet (rerun to resume)."""
    from ..config_grid import GridConfig
    from ..grid import run_grid

    cfg = resolve(GridConfig, grid, set_)
    with user_errors():
        counts = run_grid(cfg, shard, dry_run, progress=not quiet, say=typer.echo)
    typer.echo(", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"]:
        raise typer.Exit(1)


@grid_app.command("status")
def grid_status(grid: GridArg, set_: SetOpt = None) -> None:
    """Done / failed / pending cells of a grid."""
    from ..config_grid import GridConfig
    from ..grid import status

    table = status(resolve(GridConfig, grid, set_))
    typer.echo(table["state"].value_counts().to_string())
    for cell in table.loc[table.state == "failed", "cell"]:
        typer.echo(f"failed: {cell}")


@grid_app.command("report")
def grid_report(
    grid: GridArg,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for CIs and p-values.")] = 1000,
    set_: SetOpt = None,
) -> None:
    """Tables (CSV), figures (PNG) and one self-contained HTML report of a grid's cells."""
    from ..config_grid import GridConfig
    from ..report import build_report

    with user_errors():
        path = build_report(resolve(GridConfig, grid, set_), n_boot)
    typer.echo(f"report: {path}")


@bench_app.command("lf")
def bench_lf_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    fractions: Annotated[
        str, typer.Option(help="Fractions of the grid.")
    ] = "0.01,0.05,0.1,0.25,0.5,1",
    folds: Annotated[int, typer.Option(help="Folds of the grid.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write figures here.")] = None,
) -> None:
    """LF through the feature cache vs frozen-backbone head training (a 5 x 6 grid)."""
    from ..bench import bench_lf
    from ..config import FinetuneConfig

    cfg = resolve(FinetuneConfig, config, set_)
    with user_errors():
        figures = bench_lf(cfg, [float(f) for f in fractions.split(",")], list(range(folds)))
    for key, value in figures.items():
        typer.echo(f"{key:44s} {value:.3f}" if isinstance(value, float) else f"{key:44s} {value}")
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2))


@bench_app.command("cache")
def bench_cache_cmd(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv of the images to time.")],
    resolution: Annotated[int, typer.Option(help="Cache resolution.")] = 512,
    limit: Annotated[int | None, typer.Option(help="Use only the first N images.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write figures here.")] = None,
) -> None:
    """Cache build speed, and cached reads vs decode + preprocess, in images/s."""
    from ..bench import bench_cache

    cfg = PreprocessConfig(resolution=resolution)
    with user_errors():
        figures = bench_cache(load_manifest(manifest), cfg, limit=limit)
    figures["build_workers"] = cfg.workers or os.cpu_count()
    for key, value in figures.items():
        typer.echo(f"{key:32s} {value:.1f}" if isinstance(value, float) else f"{key:32s} {value}")
    if json_out:
        with user_errors():
            json_out.write_text(json.dumps(figures, indent=2))
