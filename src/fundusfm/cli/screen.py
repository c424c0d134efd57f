"""`fundusfm predict`: screen a folder of photographs with a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import (
    ConfigOpt,
    QuietOpt,
    SetOpt,
    fail,
    resolve,
    say_notes,
    user_errors,
)


def predict(
    bundle: Annotated[Path, typer.Argument(help="Classifier bundle folder.")],
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/predict"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out.")
    ] = False,
    gradcam: Annotated[
        bool, typer.Option("--gradcam", help="Grad-CAM thumbnails in the report.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Processes that decode and check the next images while a batch is scored "
            "(default: one per CPU core but one, 1 to 4; 0: none)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or mps.")] = "cpu",
    engine: Annotated[
        str,
        typer.Option(
            help="What computes the probabilities: auto (ONNX Runtime on the CPU when "
            "installed, else PyTorch), torch or onnxruntime (the onnx extra); "
            "--gradcam maps always come from PyTorch."
        ),
    ] = "auto",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Screen a folder: probabilities, decisions, quality verdicts, unreadable files, HTML."""
    from fundusfm.config.screen import QualityConfig
    from fundusfm.screen.predict import screen

    quality = resolve(QualityConfig, config, set_)
    with user_errors():
        try:
            done = screen(
                bundle,
                folder,
                out,
                quality,
                overwrite,
                gradcam,
                batch_size,
                workers,
                device,
                not quiet,
                engine,
            )
        except FileExistsError as exc:
            raise fail(str(exc)) from exc
    counts = done.table["status"].value_counts().to_dict()
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" (engine {done.engine})")
    from fundusfm.bundle import bundle_notes, read_meta

    say_notes([*bundle_notes(read_meta(bundle)), *done.notes])
    typer.echo(f"wrote {out / 'predictions.csv'} and {out / 'report.html'}")
