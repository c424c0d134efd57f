"""Weights commands: import the authors' checkpoints, print a bundle's card, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import fail, group, user_errors

app = group("Import, inspect and export model weights.")


@app.command("import-legacy")
def import_legacy(
    checkpoint: Annotated[Path, typer.Argument(help="Released .pth checkpoint.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    trust_pickle: Annotated[
        bool,
        typer.Option("--trust-pickle", help="Allow unpickling a whole model (runs its code)."),
    ] = False,
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated class names (2 outputs: normal,abnormal).")
    ] = None,
    resolution: Annotated[int, typer.Option(help="Input size the weights were trained at.")] = 512,
) -> None:
    """Convert the authors' checkpoint (pickled DataParallel ResNet or state dict) to a bundle."""
    from fundusfm.errors import PickleRefused
    from fundusfm.weights import card
    from fundusfm.weights import import_legacy as run

    names = [c.strip() for c in classes.split(",")] if classes else None
    with user_errors():
        try:
            bundle = run(checkpoint, out, trust_pickle, names, resolution)
        except PickleRefused as exc:
            raise fail(str(exc)) from exc
    typer.echo(card(bundle))


@app.command("info")
def info(bundle: Annotated[Path, typer.Argument(help="Bundle folder.")]) -> None:
    """Print a bundle's card: task, classes, thresholds, input, provenance, hashes."""
    from fundusfm.weights import card

    with user_errors():
        typer.echo(card(bundle))


@app.command("export")
def export(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    format_: Annotated[str, typer.Option("--format", help="torchvision or onnx.")] = "torchvision",
    out: Annotated[Path | None, typer.Option(help="Output file (.pth or .onnx).")] = None,
) -> None:
    """Export a classifier as a torchvision state dict or an ONNX model."""
    from fundusfm.weights import export as run

    target = out or Path(bundle) / ("model.onnx" if format_ == "onnx" else "torchvision.pth")
    with user_errors():
        try:
            path = run(bundle, format_, target)
        except RuntimeError as exc:
            raise fail(str(exc)) from exc
    typer.echo(f"wrote {path}")
