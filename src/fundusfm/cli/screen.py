"""`fundusfm predict`: screen a folder of photographs with a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fundusfm.cli.common import ConfigOpt, QuietOpt, SetOpt, resolve, say_notes, user_errors

if TYPE_CHECKING:  # torch: not loaded for --help
    from fundusfm.screen.predict import Screening

BundleArg = Annotated[Path, typer.Argument(help="Classifier bundle folder.")]
FolderArg = Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")]
OutOpt = Annotated[Path, typer.Option(help="Output folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")]
GradcamOpt = Annotated[bool, typer.Option("--gradcam", help="Grad-CAM thumbnails in the report.")]
BatchOpt = Annotated[int, typer.Option(help="Images per batch.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="Processes that decode and check the next images while a batch is scored "
        "(default: one per CPU core but one, 1 to 4; 0: none)."
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or mps.")]
EngineOpt = Annotated[
    str,
    typer.Option(
        help="What computes the probabilities: auto (ONNX Runtime on the CPU when "
        "installed, else PyTorch), torch or onnxruntime (the onnx extra); "
        "--gradcam maps always come from PyTorch."
    ),
]


def predict(
    bundle: BundleArg,
    folder: FolderArg,
    out: OutOpt = Path("runs/predict"),
    overwrite: OverwriteOpt = False,
    gradcam: GradcamOpt = False,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    device: DeviceOpt = "cpu",
    engine: EngineOpt = "auto",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Screen a folder: probabilities, decisions, quality verdicts, unreadable files, HTML."""
    from fundusfm.config.screen import QualityConfig
    from fundusfm.screen.predict import screen

    quality = resolve(QualityConfig, config, set_)
    with user_errors():  # a bad folder, --out or bundle: one `error:` line, exit 2
        done = screen(
            bundle, folder, out, quality, overwrite=overwrite, gradcam=gradcam,
            batch_size=batch_size, workers=workers, device=device, progress=not quiet,
            engine=engine,
        )  # fmt: skip
    _say_done(done, bundle, out)


def _say_done(done: Screening, bundle: Path, out: Path) -> None:
    """The counts per status and the engine, the notes, and where the files are."""
    from fundusfm.bundle import bundle_notes, read_meta

    counts = done.table["status"].value_counts().to_dict()
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" (engine {done.engine})")
    say_notes([*bundle_notes(read_meta(bundle)), *done.notes])
    typer.echo(f"wrote {out / 'predictions.csv'} and {out / 'report.html'}")
