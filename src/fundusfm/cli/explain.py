"""`fundusfm explain gradcam` and `fundusfm explain tsne`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import (
    QuietOpt,
    fail,
    group,
    say_notes,
    user_errors,
)

app = group("Grad-CAM maps and t-SNE of the initialisations.")


@app.command("gradcam")
def gradcam(
    bundle: Annotated[Path, typer.Argument(help="Classifier bundle folder.")],
    images: Annotated[list[Path] | None, typer.Argument(help="Image files.")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Explain every image of a manifest.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/gradcam"),
    class_name: Annotated[
        str | None, typer.Option("--class", help="Explain this class (default: predicted).")
    ] = None,
    road: Annotated[bool, typer.Option(help="Score faithfulness with ROAD.")] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="What computes the reported probabilities (and so the predicted class "
            "explained): auto (ONNX Runtime on the CPU when installed, else PyTorch), torch "
            "or onnxruntime. The maps and ROAD always run in PyTorch: they need gradients."
        ),
    ] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Grad-CAM overlays, raw maps, ROAD faithfulness and lesion overlap (with masks)."""
    from fundusfm.explain.gradcam import explain_gradcam, gradcam_summary

    if not images and manifest is None:
        raise fail("give image files or --manifest")
    with user_errors():
        table = explain_gradcam(
            bundle, out, images, manifest, class_name, road, progress=not quiet, engine=engine
        )
    summary = gradcam_summary(out)
    engine_notes = summary.pop("engine_notes", [])
    typer.echo(
        ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
        )
    )
    typer.echo(f"wrote {len(table)} maps to {out}/overlays, {out}/maps and {out / 'gradcam.csv'}")
    from fundusfm.bundle import bundle_notes, read_meta

    say_notes([*bundle_notes(read_meta(bundle)), *engine_notes])


@app.command("tsne")
def tsne(
    bundles: Annotated[list[str] | None, typer.Argument(help="Bundle folders.")] = None,
    init: Annotated[
        list[str] | None, typer.Option("--init", help="An init by name (scratch, imagenet, ...).")
    ] = None,
    manifest: Annotated[Path | None, typer.Option(help="Images to embed (manifest.csv).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/tsne"),
    task: Annotated[str | None, typer.Option(help="Task whose classes colour the points.")] = None,
    arch: Annotated[
        str | None, typer.Option(help="Architecture for --init (default: the bundles').")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Input size (default: the bundles').")
    ] = None,
    umap: Annotated[
        bool, typer.Option("--umap", help="UMAP instead of t-SNE (umap-learn).")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    engine: Annotated[
        str,
        typer.Option(
            help="auto or torch, both PyTorch: t-SNE embeds backbone features, which the "
            "ONNX graph (probabilities only) does not give; onnxruntime is refused."
        ),
    ] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Pooled features per model embedded in 2-D, one panel each, with separation figures."""
    from fundusfm.explain.tsne import explain_tsne

    if manifest is None:
        raise fail("--manifest is required")
    models = [*(bundles or []), *(init or [])]
    with user_errors():  # umap-learn missing is a ConfigError, one line like the others
        table = explain_tsne(
            models,
            manifest,
            out,
            task,
            arch,
            resolution,
            "umap" if umap else "tsne",
            device=device,
            progress=not quiet,
            engine=engine,
        )
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"wrote {out / ('umap' if umap else 'tsne')}.png, separation.csv, embedding.csv")
