"""Segmentation commands: `fundusfm segment train` and `fundusfm segment eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import (
    ConfigOpt,
    QuietOpt,
    SetOpt,
    group,
    resolve,
    run_training,
    say_notes,
    user_errors,
)

app = group("Vessel segmentation: a U-Net on the foundation backbone.")

SHOWN = ("dice", "auroc", "auprc", "cldice", "sensitivity", "specificity")
PARTS = {"val": "validation", "train": "training", "none": "no"}


def _line(name: str, metrics: dict) -> str:
    shown = [f"{k} {metrics[k]:.4f}" for k in SHOWN if metrics.get(k) is not None]
    return f"{name} (pooled inside the FOV): " + ", ".join(shown)


def _threshold_lines(metrics: dict) -> list[str]:
    """The threshold used (as stored in the bundle) and the scored set's own best."""
    t = metrics.get("threshold") or {}
    lines = []
    if t:
        how = (
            f"max Dice on the {t['chosen_on_images']} {PARTS[t['chosen_on']]} images"
            if t["rule"] == "max_dice"
            else "fixed"
        )
        lines.append(f"threshold {t['value']:g} ({how}, stored in the bundle)")
    best = metrics.get("optimistic_best")
    if best:
        lines.append(
            f"best threshold on these images' own masks {best['threshold']:g} "
            f"(Dice {best['dice']:.4f}; optimistic, not a result)"
        )
    return lines


@app.command("train")
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a U-Net (encoder: any init, frozen or full) and test it; writes a bundle."""
    from fundusfm.config.segment import SegmentConfig
    from fundusfm.tasks.segment import train_segmentation

    out = run_training(train_segmentation, resolve(SegmentConfig, config, set_), resume, quiet)
    if out is None:  # under torchrun rank 0 reports
        return
    from fundusfm.engine.runs import run_metrics

    metrics = run_metrics(out)
    if metrics.get("test"):
        typer.echo(_line(f"test, {metrics['images']} images", metrics["test"]))
    for line in _threshold_lines(metrics):
        typer.echo(line)
    if metrics.get("observer2"):
        typer.echo(_line("second observer", metrics["observer2"]))
    typer.echo(f"run: {out}\nbundle: {out / 'bundle'}")


@app.command("eval")
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Segmentation bundle folder.")],
    manifest: Annotated[Path, typer.Argument(help="Vessel manifest (fundusfm data import).")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/segment_eval"),
    split: Annotated[
        str, typer.Option(help="Rows of this split column value; 'all' for every row.")
    ] = "test",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    tta_flips: Annotated[
        bool | None,
        typer.Option(
            "--tta-flips/--no-tta-flips",
            help="Average the probabilities over horizontal and vertical flips "
            "(default: as the bundle was tested, its eval.tta_flips).",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Score a segmentation bundle on another manifest: metrics, per-image table, PNGs.
    Images are scaled, fed and predicted as the bundle records (FOV diameter, input form)."""
    from fundusfm.tasks.segment import evaluate_segmentation

    with user_errors():
        metrics = evaluate_segmentation(
            bundle, manifest, out, None if split == "all" else split, device, not quiet, tta_flips
        )
    typer.echo(_line(f"{metrics['images']} images", metrics["external"]))
    for line in _threshold_lines(metrics):
        typer.echo(line)
    if metrics.get("observer2"):
        typer.echo(_line("second observer", metrics["observer2"]))
    say_notes(metrics.get("notes", []))
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'}, {out / 'probabilities'}/")
