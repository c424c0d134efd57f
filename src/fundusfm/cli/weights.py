"""Weights commands: import the authors' checkpoints, print a bundle's card, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import fail, group, user_errors

app = group("Import, inspect and export model weights.")


LicenseOpt = Annotated[
    str | None,
    typer.Option(
        "--license",
        help="The weights' licence, a model-hub id (e.g. cc-by-nc-4.0); default: the bundle's.",
    ),
]
MetricsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--metrics",
        help="metrics.json of this model for the card (from `fundusfm evaluate`: with CIs); "
        "repeatable. A run's own metrics.json beside its bundle/ is read anyway.",
    ),
]


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
    license_: Annotated[
        str | None,
        typer.Option("--license", help="The weights' licence as their publisher states it."),
    ] = None,
) -> None:
    """Convert the authors' checkpoint (pickled DataParallel ResNet or state dict) to a bundle."""
    from fundusfm.errors import PickleRefused
    from fundusfm.legacy import import_legacy as run
    from fundusfm.weights import card

    names = [c.strip() for c in classes.split(",")] if classes else None
    with user_errors():
        try:
            bundle = run(checkpoint, out, trust_pickle, names, resolution, license_)
        except PickleRefused as exc:
            raise fail(str(exc)) from exc
    typer.echo(card(bundle))


@app.command("import")
def import_(
    name: Annotated[
        str,
        typer.Argument(
            help="retfound, retfound-dinov2, flair, keepfit, visionfm, urfound, file (a timm "
            "or torchvision state dict of --arch) or legacy (the paper authors' classifiers)."
        ),
    ],
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint file as downloaded.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    arch: Annotated[
        str | None,
        typer.Option(
            help="Architecture: needed for `file`; for a published model, one of "
            "the same family replaces its own (e.g. another ViT size)."
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            help="Input size (a ViT's position embeddings are resampled to it); "
            "default: the source's own (224 for the ViTs, 512 for FLAIR/KeepFIT)."
        ),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow unpickling objects beyond tensors (runs code from the file).",
        ),
    ] = False,
    license_: Annotated[
        str | None,
        typer.Option("--license", help="The weights' licence; default: the publisher's."),
    ] = None,
) -> None:
    """Turn a published foundation-model checkpoint into a bundle (the backbone alone, for
    `model.init=BUNDLE`, LF features and fine-tuning), and print its card."""
    from fundusfm.errors import PickleRefused
    from fundusfm.weights import card
    from fundusfm.weights_import import import_checkpoint

    with user_errors():
        try:
            bundle = import_checkpoint(
                name, checkpoint, out, arch, resolution, trust_pickle, license_
            )
        except PickleRefused as exc:
            raise fail(str(exc)) from exc
    typer.echo(card(bundle))


@app.command("info")
def info(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    metrics: MetricsOpt = None,
    license_: LicenseOpt = None,
) -> None:
    """Print a bundle's model card (the README.md of `export --format timm`)."""
    from fundusfm.weights import card

    with user_errors():
        typer.echo(card(bundle, metrics or [], license_))


@app.command("export")
def export(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    format_: Annotated[
        str, typer.Option("--format", help="torchvision, onnx or timm (a model-hub folder).")
    ] = "torchvision",
    out: Annotated[
        Path | None, typer.Option(help="Output file (.pth, .onnx) or folder (timm).")
    ] = None,
    backbone_only: Annotated[
        bool,
        typer.Option(
            "--backbone-only", help="timm, MLP heads: export the backbone alone (features)."
        ),
    ] = False,
    metrics: MetricsOpt = None,
    license_: LicenseOpt = None,
) -> None:
    """Export a classifier: a torchvision state dict, an ONNX model, or a timm model-hub
    folder (config.json, model.safetensors, README.md model card) to push as it is."""
    from fundusfm.weights import export as run

    names = {"onnx": "model.onnx", "timm": "timm"}
    target = out or Path(bundle) / names.get(format_, "torchvision.pth")
    with user_errors():
        try:
            path = run(bundle, format_, target, backbone_only, metrics or [], license_)
        except RuntimeError as exc:
            raise fail(str(exc)) from exc
    typer.echo(f"wrote {path}")
