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
    manifests: Annotated[
        list[Path],
        typer.Argument(
            help="Vessel manifest(s) (fundusfm data import); with several, each is scored "
            "into OUT/<dataset>/ and OUT/transfer.csv and transfer.png compare them. "
            "PATH:SPLIT scores that one on its own split (PATH:all: every row)."
        ),
    ],
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
    """Score a segmentation bundle on other manifests: metrics, per-image table, PNGs.
    Images are scaled, fed and predicted as the bundle records (FOV diameter, input form),
    and binarised with its stored threshold."""
    chosen = None if split == "all" else split
    if len(manifests) > 1:
        _evaluate_many(bundle, manifests, out, chosen, device, not quiet, tta_flips)
        return
    from fundusfm.tasks.segment import evaluate_segmentation

    with user_errors():
        metrics = evaluate_segmentation(
            bundle, manifests[0], out, chosen, device, not quiet, tta_flips
        )
    typer.echo(_line(f"{metrics['images']} images", metrics["external"]))
    for line in _threshold_lines(metrics):
        typer.echo(line)
    if metrics.get("observer2"):
        typer.echo(_line("second observer", metrics["observer2"]))
    say_notes(metrics.get("notes", []))
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'}, {out / 'probabilities'}/")


TABLE = ["dataset", "images", "skipped_no_mask", *SHOWN, "dice_at_own_best_threshold"]
SHORT = {"skipped_no_mask": "no_mask", "dice_at_own_best_threshold": "dice_own_best"}


def _evaluate_many(bundle, manifests, out, split, device, progress, tta_flips) -> None:
    """`segment eval` on several manifests: each into OUT/<dataset>/, then the table."""
    from fundusfm.tasks.seg_transfer import evaluate_transfer

    with user_errors():
        table, notes = evaluate_transfer(bundle, manifests, out, split, device, progress, tta_flips)
    shown = table[TABLE].rename(columns=SHORT)
    threshold = table["threshold"].iloc[0]
    typer.echo(f"pooled inside the FOV, at the bundle's threshold {threshold:g}:")
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    typer.echo(
        "no_mask: images left out for having no vessel mask; dice_own_best: at each "
        "dataset's own best threshold (optimistic, not a result)"
    )
    say_notes(notes)
    folders = ", ".join(f"{name}/" for name in table["dataset"])
    typer.echo(f"wrote {out / 'transfer.csv'}, {out / 'transfer.png'} and in {out}: {folders}")
