"""Grid commands: grid run / status / report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import QuietOpt, SetOpt, group, resolve, user_errors

GridArg = Annotated[Path, typer.Argument(help="Grid YAML (see configs/grid*.yaml).")]

app = group("Run and report the experiment grid.")


@app.command("run")
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
    from fundusfm.config.grid import GridConfig
    from fundusfm.grid.runner import run_grid

    cfg = resolve(GridConfig, grid, set_)
    with user_errors():
        counts = run_grid(cfg, shard, dry_run, progress=not quiet, say=typer.echo)
    typer.echo(", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"]:
        raise typer.Exit(1)


@app.command("status")
def grid_status(grid: GridArg, set_: SetOpt = None) -> None:
    """Done / failed / pending cells of a grid."""
    from fundusfm.config.grid import GridConfig
    from fundusfm.grid.cells import status

    table = status(resolve(GridConfig, grid, set_))
    typer.echo(table["state"].value_counts().to_string())
    for cell in table.loc[table.state == "failed", "cell"]:
        typer.echo(f"failed: {cell}")


@app.command("report")
def grid_report(
    grid: GridArg,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for CIs and p-values.")] = 1000,
    allow_incomplete: Annotated[
        bool,
        typer.Option(
            "--allow-incomplete",
            help="Also compare groups whose folds are not all done (failed, stale, pending).",
        ),
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Tables (CSV), figures (PNG) and one self-contained HTML report of a grid's cells."""
    from fundusfm.config.grid import GridConfig
    from fundusfm.grid.report import build_report
    from fundusfm.grid.tables import completeness, incomplete_lines

    cfg = resolve(GridConfig, grid, set_)
    with user_errors():
        path = build_report(cfg, n_boot, allow_incomplete)
        lines = incomplete_lines(completeness(cfg))
    typer.echo(f"report: {path}")
    if lines:
        fate = (
            "compared anyway (--allow-incomplete)"
            if allow_incomplete
            else ("left out of comparisons.csv; --allow-incomplete compares them")
        )
        typer.echo(f"{len(lines)} incomplete groups, marked in summary.csv, {fate}:")
        for line in lines:
            typer.echo(f"  {line}")
