"""Benchmark commands: bench run (every row, one table), bench lf, bench cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import ConfigOpt, SetOpt, group, resolve, user_errors
from fundusfm.config.core import PreprocessConfig
from fundusfm.data.manifest import load_manifest
from fundusfm.io import write_json

JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write figures here.")]

app = group("Benchmarks that print measured figures.")


@app.command("run")
def bench_run_cmd(
    quick: Annotated[
        bool, typer.Option("--quick", help="Smoke-test preset: ResNet-10, tiny sizes.")
    ] = False,
    preset_name: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Sizes: default, quick (= --quick), gpu (rows a and c on CUDA at 512 px).",
        ),
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(help="Rows to run, e.g. a,c: a pipeline, b lf, c screen, d memory."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Loader workers of rows a and b (train.workers).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(help="Loader / in-memory epoch alternations in row a.")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="Model of rows a-c (e.g. resnet18).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Change one preset field, e.g. --set lf_arch=timm:vit_large_patch16_224 "
            "--set lf_resolution=224 --set images=48 (tuples comma-separated).",
        ),
    ] = None,
    json_out: JsonOpt = None,
) -> None:
    """Every benchmark row side by side: input pipeline, LF, screening backends, memory.

    Prints a table (row, setting, figure, ratio, goal); each ratio compares two things
    measured in this run. Progress goes to stderr.
    """
    import dataclasses

    from fundusfm.bench.presets import preset_named, with_changes
    from fundusfm.bench.runner import format_table, parse_only, run_bench

    command = "fundusfm bench run" + "".join(f" {flag}" for flag, on in [("--quick", quick)] if on)
    for flag, value in [("--preset", preset_name), ("--only", only), ("--workers", workers)]:
        command += f" {flag} {value}" if value is not None else ""
    command += f" --rounds {rounds}" if rounds is not None else ""
    command += f" --arch {arch}" if arch else ""
    command += "".join(f" --set {change}" for change in set_ or [])
    with user_errors():
        preset = preset_named(preset_name, quick)
        changes = {"workers": workers, "rounds": rounds, "arch": arch}
        preset = dataclasses.replace(preset, **{k: v for k, v in changes.items() if v is not None})
        preset = with_changes(preset, set_)
        rows = parse_only(only)
        report = run_bench(preset, rows, say=lambda m: typer.echo(m, err=True), command=command)
    typer.echo(format_table(report))
    if json_out:
        with user_errors():
            write_json(json_out, report)


@app.command("lf")
def bench_lf_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    fractions: Annotated[
        str, typer.Option(help="Fractions of the grid.")
    ] = "0.01,0.05,0.1,0.25,0.5,1",
    folds: Annotated[int, typer.Option(help="Folds of the grid.")] = 5,
    json_out: JsonOpt = None,
) -> None:
    """LF through the feature cache vs frozen-backbone head training (a 5 x 6 grid)."""
    from fundusfm.bench import bench_lf
    from fundusfm.config.core import FinetuneConfig

    cfg = resolve(FinetuneConfig, config, set_)
    with user_errors():
        figures = bench_lf(cfg, [float(f) for f in fractions.split(",")], list(range(folds)))
    for key, value in figures.items():
        typer.echo(f"{key:44s} {value:.3f}" if isinstance(value, float) else f"{key:44s} {value}")
    if json_out:
        with user_errors():
            write_json(json_out, figures)


@app.command("cache")
def bench_cache_cmd(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv of the images to time.")],
    resolution: Annotated[int, typer.Option(help="Cache resolution.")] = 512,
    limit: Annotated[int | None, typer.Option(help="Use only the first N images.")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Cache build speed, and cached reads vs decode + preprocess, in images/s."""
    from fundusfm.bench import bench_cache

    cfg = PreprocessConfig(resolution=resolution)
    with user_errors():
        figures = bench_cache(load_manifest(manifest), cfg, limit=limit)
    figures["build_workers"] = cfg.workers or os.cpu_count()
    for key, value in figures.items():
        typer.echo(f"{key:32s} {value:.1f}" if isinstance(value, float) else f"{key:32s} {value}")
    if json_out:
        with user_errors():
            write_json(json_out, figures)
