"""Command line: parse arguments, load the typed config, call one library function, print.

Every command that has settings takes `--config FILE.yaml` and any number of
`--set key=value` overrides; the flags shown in `--help` are shortcuts for the same keys.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel

from . import __version__
from .config import (
    ConfigError,
    DemoConfig,
    PreprocessConfig,
    SplitConfig,
    SynthConfig,
    dump_config,
    load_config,
)
from .decode import ImageDecodeError
from .manifest import load_manifest

app = typer.Typer(
    help="fundusfm: disease-specific foundation models for retinal fundus photographs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and validate image manifests.", no_args_is_help=True)
grid_app = typer.Typer(help="Run and report the experiment grid.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print measured figures.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(grid_app, name="grid")
app.add_typer(bench_app, name="bench")

M = TypeVar("M", bound=BaseModel)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override one key, e.g. --set seed=3.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix (bad input, paths, permissions) into one clear line."""
    try:
        yield
    except (ConfigError, ImageDecodeError, ValueError) as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        raise fail(f"{exc}") from exc


def resolve(model: type[M], config: Path | None, sets: list[str] | None, **flags) -> M:
    """Config file, then `--set`, then explicit flags (flags left at None are not applied)."""
    overrides = list(sets or [])
    overrides += [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    try:
        return load_config(model, config, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fundusfm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """fundusfm: disease-specific foundation models for retinal fundus photographs."""


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created).")],
    n: Annotated[int | None, typer.Option(help="Number of images (two eyes per patient).")] = None,
    size: Annotated[int | None, typer.Option(help="Image side in pixels.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed; same seed, same data.")] = None,
    workers: Annotated[int | None, typer.Option(help="Processes (0 = all cores).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Generate procedural fundus photographs with lesion and vessel masks and a manifest."""
    from .synthetic import generate

    cfg = resolve(SynthConfig, config, set_, n=n, size=size, seed=seed, workers=workers)
    if (out / "manifest.csv").exists():
        raise fail(f"{out} already holds a generated set; choose a new folder")
    start = time.perf_counter()
    with user_errors():
        manifest = generate(cfg, out, progress=not quiet)
        seconds = time.perf_counter() - start
        dump_config(cfg, out / "config.yaml")
    typer.echo(f"wrote {cfg.n} images to {out} in {seconds:.1f} s ({cfg.n / seconds:.1f} img/s)")
    typer.echo(f"manifest: {manifest}")


@data_app.command("check")
def data_check(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv (with its .yaml sidecar).")],
    decode: Annotated[bool, typer.Option(help="Decode every image (slower, finds more).")] = True,
    report: Annotated[Path | None, typer.Option(help="Also write the problems to a CSV.")] = None,
    workers: Annotated[int, typer.Option(help="Decoding threads (0 = all cores).")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Validate a manifest and list every problem at once (exit 1 if there are any)."""
    from .validate import check_manifest

    with user_errors():
        m = load_manifest(manifest)
        result = check_manifest(m, decode=decode, workers=workers, progress=not quiet)
    typer.echo(f"{manifest}: {result.rows} rows, {result.decoded} images decoded")
    for task, counts in result.class_counts.items():
        typer.echo(f"  task {task}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if not m.spec.tasks:
        typer.echo(f"  no tasks declared ({m.sidecar} absent or empty): labels not checked")
    if report:
        import pandas as pd

        with user_errors():
            pd.DataFrame([p.__dict__ for p in result.problems]).to_csv(report, index=False)
    if result.ok:
        typer.secho("OK: no problems found", fg=typer.colors.GREEN)
        return
    typer.secho(f"{len(result.problems)} problems:", fg=typer.colors.RED)
    for problem in result.problems:
        typer.echo(f"  {problem}")
    raise typer.Exit(1)


@data_app.command("scan")
def data_scan(
    root: Annotated[Path, typer.Argument(help="Folder to scan for images.")],
    out: Annotated[Path, typer.Option(help="Manifest to write (a .yaml sidecar goes beside).")],
    pattern: Annotated[str, typer.Option(help="Glob under ROOT, e.g. '*/images/*'.")] = "**/*",
) -> None:
    """Write a label-free manifest of the images in a folder (each image its own patient)."""
    from .manifest import DatasetSpec, save_manifest, scan_folder

    table = scan_folder(root, pattern)
    if table.empty:
        raise fail(f"no JPEG/PNG/TIFF/BMP/GIF images under {root} match {pattern!r}")
    spec = DatasetSpec(name=root.name, root=os.path.relpath(root.resolve(), out.parent.resolve()))
    with user_errors():
        save_manifest(table, spec, out)
    typer.echo(f"wrote {out}: {len(table)} images under {root}")


@app.command()
def preprocess(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv")],
    resolution: Annotated[int | None, typer.Option(help="Output side in pixels.")] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Cache root (default: cache/ beside the manifest).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Threads (0 = all cores).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Crop to the field of view, pad square, resize; cache the result for training."""
    from .preprocess import build_cache

    cfg = resolve(PreprocessConfig, config, set_, resolution=resolution, workers=workers)
    root = cache or manifest.parent / "cache"
    with user_errors():
        m = load_manifest(manifest)
        result = build_cache(m, cfg, root, progress=not quiet)
        dump_config(cfg, result.directory / "config.yaml")
    rate = result.built / result.seconds if result.built else 0.0
    typer.echo(
        f"cache {result.directory}: {result.built} built ({rate:.1f} img/s), "
        f"{result.skipped} unchanged, {len(result.errors)} failed"
    )
    if result.errors:
        for iid, path, reason in result.errors:
            typer.echo(f"  {iid} ({path}): {reason}")
        typer.echo(f"  listed in {result.directory / 'errors.csv'}")
        raise typer.Exit(1)


@app.command()
def split(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv")],
    out: Annotated[Path, typer.Option(help="Where to write splits.csv.")] = Path("splits.csv"),
    folds: Annotated[int | None, typer.Option(help="Number of folds.")] = None,
    fractions: Annotated[
        str | None, typer.Option(help="Nested labelled fractions, e.g. 0.01,0.1,1.")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Of each fold's training.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Held out from all folds.")] = None,
    task: Annotated[str | None, typer.Option(help="Task to stratify on.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Patient-grouped stratified k-fold with validation parts and nested fractions."""
    from .splits import make_splits, summarise

    try:
        fracs = [float(x) for x in fractions.split(",")] if fractions else None
    except ValueError as exc:
        raise fail(f"--fractions {fractions!r}: expected numbers separated by commas") from exc
    cfg = resolve(
        SplitConfig,
        config,
        set_,
        folds=folds,
        fractions=fracs,
        seed=seed,
        task=task,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    with user_errors():
        m = load_manifest(manifest)
        table = make_splits(m, cfg)
        summary = summarise(table, m, cfg.task)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
        dump_config(cfg, out.with_suffix(".config.yaml"))
    typer.echo(f"wrote {out} ({len(table)} images, {table.patient_id.nunique()} patients)")
    typer.echo(summary.to_string(index=False))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo_out"),
    full: Annotated[bool, typer.Option("--full", help="The paper's settings (GPU).")] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="Never download ImageNet weights.")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """The whole protocol on generated data: pretrain, grid, report (CPU, minutes)."""
    from .demo import FULL_PRESET, run_demo

    sets = [
        *(FULL_PRESET if full else []),
        *(["imagenet=offline"] if offline else []),
        *(set_ or []),
    ]
    cfg = resolve(DemoConfig, config, sets)
    with user_errors():
        report = run_demo(cfg, out, progress=not quiet, say=typer.echo)
    typer.echo(f"\nreport: {report}")


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")]


def _train_command(model, config, set_, resume, quiet, runner) -> None:
    cfg = resolve(model, config, set_)
    cfg = cfg.model_copy(
        update={
            "run": cfg.run.model_copy(
                update={"resume": cfg.run.resume or resume, "progress": not quiet}
            )
        }
    )
    from .train import TrainingDiverged

    with user_errors():
        try:
            out = runner(cfg)
        except TrainingDiverged as exc:
            raise fail(str(exc), code=1) from exc
    metrics = json.loads((out / "metrics.json").read_text())
    for part in ("val", "test"):
        if part in metrics:
            shown = {
                k: v
                for k, v in metrics[part].items()
                if k in ("auroc", "accuracy", "balanced_accuracy", "f1_macro", "kappa_quadratic")
                and v is not None
            }
            typer.echo(f"{part}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    typer.echo(f"run: {out}\nbundle: {out / 'bundle'}")


@app.command()
def pretrain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upstream supervised pretraining (strategy: fundus | imagenet+fundus) -> a bundle."""
    from .config import PretrainConfig
    from .experiment import pretrain as run

    _train_command(PretrainConfig, config, set_, resume, quiet, run)


@app.command()
def finetune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train on one fold and fraction of splits.csv from any init (lf, ff or partial)."""
    from .config import FinetuneConfig
    from .experiment import finetune as run

    _train_command(FinetuneConfig, config, set_, resume, quiet, run)


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    manifest: Annotated[Path, typer.Argument(help="External manifest.csv.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    label_map: Annotated[
        Path | None, typer.Option(help="YAML: column + map to bundle classes.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task of the manifest (no label map).")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache root.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """External validation of a bundle on another dataset: predictions.csv and metrics.json."""
    from .experiment import evaluate as run

    with user_errors():
        metrics = run(bundle, manifest, out, label_map, task, cache, device, not quiet)
    ext = {k: v for k, v in metrics["external"].items() if v is not None}
    typer.echo(
        f"{metrics['images']} images: "
        + ", ".join(
            f"{k} {ext[k]:.3f}" for k in ("auroc", "accuracy", "balanced_accuracy") if k in ext
        )
    )
    typer.echo(f"wrote {out / 'predictions.csv'} and {out / 'metrics.json'}")


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
    from .config import GridConfig
    from .grid import run_grid

    cfg = resolve(GridConfig, grid, set_)
    with user_errors():
        counts = run_grid(cfg, shard, dry_run, progress=not quiet, say=typer.echo)
    typer.echo(", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"]:
        raise typer.Exit(1)


@grid_app.command("status")
def grid_status(grid: GridArg, set_: SetOpt = None) -> None:
    """Done / failed / pending cells of a grid."""
    from .config import GridConfig
    from .grid import status

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
    from .config import GridConfig
    from .report import build_report

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
    from .bench import bench_lf
    from .config import FinetuneConfig

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
    from .bench import bench_cache

    cfg = PreprocessConfig(resolution=resolution)
    with user_errors():
        figures = bench_cache(load_manifest(manifest), cfg, limit=limit)
    figures["build_workers"] = cfg.workers or os.cpu_count()
    for key, value in figures.items():
        typer.echo(f"{key:32s} {value:.1f}" if isinstance(value, float) else f"{key:32s} {value}")
    if json_out:
        with user_errors():
            json_out.write_text(json.dumps(figures, indent=2))


def run() -> None:  # pragma: no cover - console entry for `python -m fundusfm`
    app(prog_name="fundusfm")
    sys.exit(0)
