"""Data commands: synth, data check / scan, preprocess, split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import ConfigOpt, QuietOpt, SetOpt, fail, group, resolve, user_errors
from fundusfm.config.core import PreprocessConfig, SplitConfig, SynthConfig
from fundusfm.data.manifest import load_manifest

app = group("Inspect and validate image manifests.")


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
    from fundusfm.synthetic.generate import generate_set

    cfg = resolve(SynthConfig, config, set_, n=n, size=size, seed=seed, workers=workers)
    start = time.perf_counter()
    with user_errors():
        manifest = generate_set(cfg, out, progress=not quiet)
    seconds = time.perf_counter() - start
    typer.echo(f"wrote {cfg.n} images to {out} in {seconds:.1f} s ({cfg.n / seconds:.1f} img/s)")
    typer.echo(f"manifest: {manifest}")


@app.command("check")
def data_check(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv (with its .yaml sidecar).")],
    decode: Annotated[bool, typer.Option(help="Decode every image (slower, finds more).")] = True,
    report: Annotated[Path | None, typer.Option(help="Also write the problems to a CSV.")] = None,
    workers: Annotated[int, typer.Option(help="Decoding threads (0 = all cores).")] = 0,
    quiet: QuietOpt = False,
) -> None:
    """Validate a manifest and list every problem at once (exit 1 if there are any)."""
    from fundusfm.data.validate import check_manifest

    with user_errors():
        m = load_manifest(manifest)
        result = check_manifest(m, decode=decode, workers=workers, progress=not quiet)
    typer.echo(f"{manifest}: {result.rows} rows, {result.decoded} images decoded")
    for task, counts in result.class_counts.items():
        typer.echo(f"  task {task}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    if not m.spec.tasks:
        typer.echo(f"  no tasks declared ({m.sidecar} absent or empty): labels not checked")
    if report:
        with user_errors():
            result.write_csv(report)
    if result.ok:
        typer.secho("OK: no problems found", fg=typer.colors.GREEN)
        return
    typer.secho(f"{len(result.problems)} problems:", fg=typer.colors.RED)
    for problem in result.problems:
        typer.echo(f"  {problem}")
    raise typer.Exit(1)


@app.command("scan")
def data_scan(
    root: Annotated[Path, typer.Argument(help="Folder to scan for images.")],
    out: Annotated[Path, typer.Option(help="Manifest to write (a .yaml sidecar goes beside).")],
    pattern: Annotated[str, typer.Option(help="Glob under ROOT, e.g. '*/images/*'.")] = "**/*",
) -> None:
    """Write a label-free manifest of the images in a folder (each image its own patient)."""
    from fundusfm.data.manifest import scan_to_manifest

    with user_errors():
        n, skipped = scan_to_manifest(root, out, pattern)
    if skipped:
        typer.echo(
            f"skipped {len(skipped)} files whose names are not valid UTF-8 "
            f"({', '.join(skipped[:3])}); rename them to include them"
        )
    typer.echo(f"wrote {out}: {n} images under {root}")


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
    from fundusfm.data.preprocess import preprocess_manifest

    cfg = resolve(PreprocessConfig, config, set_, resolution=resolution, workers=workers)
    with user_errors():
        result = preprocess_manifest(manifest, cfg, cache, progress=not quiet)
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


def split(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv")],
    out: Annotated[Path, typer.Option(help="Where to write splits.csv.")] = Path("splits.csv"),
    folds: Annotated[int | None, typer.Option(help="Number of folds.")] = None,
    fractions: Annotated[
        str | None, typer.Option(help="Nested labelled fractions, e.g. 0.01,0.1,1.")
    ] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Of each fold's training.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Held out from all folds.")] = None,
    val_policy: Annotated[
        str | None,
        typer.Option(help="scaled (default): validation shrinks with the fraction; fixed."),
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task to stratify on.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Patient-grouped stratified k-fold with validation parts and nested fractions."""
    from fundusfm.data.splits import write_splits

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
        val_policy=val_policy,
        test_fraction=test_fraction,
    )
    with user_errors():
        table, summary = write_splits(manifest, cfg, out)
    typer.echo(f"wrote {out} ({len(table)} images, {table.patient_id.nunique()} patients)")
    shown = ["fold", "fraction", "share", "train_images", "val_images", "test_images"]
    classes = [c for c in summary.columns if c.startswith("train_") and c not in shown]
    classes = [c for c in classes if not c.startswith(("train_pool", "train_patients"))]
    typer.echo(
        summary[[*shown, *classes]].to_string(index=False, float_format=lambda v: f"{v:.3f}")
    )
    typer.echo(
        f"share = training images / the fold's training pool; validation is {cfg.val_policy} "
        f"(class counts of both parts in {out.with_suffix('.summary.csv')})"
    )


@app.command("import")
def data_import(
    name: Annotated[
        str,
        typer.Argument(
            help="Vessels: drive, chase_db1, stare, hrf, fives. Classification: jsiec, rfmid, "
            "odir, aptos, eyepacs, idrid, messidor2, eye_diseases, folder, csv."
        ),
    ],
    root: Annotated[Path, typer.Argument(help="The dataset's folder as downloaded.")],
    out: Annotated[Path, typer.Option(help="Manifest to write.")],
    group_duplicates: Annotated[
        bool, typer.Option(help="Join near-duplicate images into one patient (perceptual hash).")
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Manifest of a public dataset: images, labels, patients, official split, duplicates."""
    from fundusfm.data.adapters.registry import import_dataset

    with user_errors():
        path, summary, notes = import_dataset(name, root, out, group_duplicates, progress=not quiet)
    typer.echo(f"wrote {path}: {summary}")
    for note in notes:
        typer.echo(note)


@app.command("harmonise")
def data_harmonise(
    manifest: Annotated[Path, typer.Argument(help="Manifest from `fundusfm data import`.")],
    mapping: Annotated[
        str, typer.Option(help="Shipped mapping (jsiec, rfmid, odir, eye_diseases) or a file.")
    ],
    out: Annotated[Path, typer.Option(help="Harmonised manifest to write.")],
) -> None:
    """Add the shared vocabulary of conditions (tasks vocabulary and normal_abnormal)."""
    from fundusfm.data.labels import harmonise

    with user_errors():
        path, counts = harmonise(manifest, mapping, out)
    typer.echo(
        f"wrote {path}: {counts['images']} images ({counts['left_out']} mapped to no term, "
        f"left out); terms: {', '.join(counts['terms'])}"
    )
