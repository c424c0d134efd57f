"""Model commands: demo, pretrain, finetune, evaluate."""

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
    run_training,
    say_notes,
    user_errors,
)
from fundusfm.config.grid import DemoConfig


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
    from fundusfm.demo import FULL_PRESET, run_demo

    sets = [
        *(FULL_PRESET if full else []),
        *(["imagenet=offline"] if offline else []),
        *(set_ or []),
    ]
    cfg = resolve(DemoConfig, config, sets)
    with user_errors():
        try:
            report = run_demo(cfg, out, progress=not quiet, say=typer.echo)
        except RuntimeError as exc:
            raise fail(str(exc), code=1) from exc
    typer.echo(f"\nreport: {report}")


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")]


def _train_command(model, config, set_, resume, quiet, runner) -> None:
    out = run_training(runner, resolve(model, config, set_), resume, quiet)
    if out is None:  # under torchrun rank 0 reports
        return
    from fundusfm.engine.runs import run_metrics

    metrics = run_metrics(out)
    for part in ("val", "test", "holdout"):
        if part in metrics:
            shown = {
                k: v
                for k, v in metrics[part].items()
                if k in ("auroc", "accuracy", "balanced_accuracy", "f1_macro", "kappa_quadratic")
                and v is not None
            }
            typer.echo(f"{part}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    from fundusfm.tasks.classify import run_notes

    say_notes(run_notes(metrics))
    typer.echo(f"run: {out}\nbundle: {out / 'bundle'}")


def pretrain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upstream supervised pretraining (strategy: fundus | imagenet+fundus) -> a bundle."""
    from fundusfm.config.core import PretrainConfig
    from fundusfm.tasks.classify import pretrain as run

    _train_command(PretrainConfig, config, set_, resume, quiet, run)


def finetune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train on one fold and fraction of splits.csv from any init (lf, ff or partial)."""
    from fundusfm.config.core import FinetuneConfig
    from fundusfm.tasks.classify import finetune as run

    _train_command(FinetuneConfig, config, set_, resume, quiet, run)


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
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples (patients) for CIs.")] = 1000,
    engine: Annotated[
        str,
        typer.Option(
            help="What scores the images: auto (ONNX Runtime on the CPU when installed, "
            "else PyTorch), torch or onnxruntime (the onnx extra)."
        ),
    ] = "auto",
    quiet: QuietOpt = False,
) -> None:
    """External validation of a bundle on another dataset: predictions.csv and metrics.json."""
    from fundusfm.tasks.evaluate import evaluate as run

    with user_errors():
        metrics = run(
            bundle, manifest, out, label_map, task, cache, device, not quiet, n_boot, engine
        )
    ci = metrics["external_ci"]
    typer.echo(f"{metrics['images']} images of {ci['patients']} patients (95% CI, patients):")
    for name in ("auroc", "auprc", "sensitivity", "specificity"):
        if name in ci and ci[name]["value"] is not None:
            c = ci[name]
            typer.echo(
                f"  {name:<12} {c['value']:.3f} ({_fmt(c['ci_low'])} to {_fmt(c['ci_high'])})"
            )
    typer.echo(f"  (per class in metrics.json: external_ci.per_class; engine {metrics['engine']})")
    say_notes([*metrics["notes"], *metrics["engine_notes"], *metrics["shift"]["notes"]])
    typer.echo(f"wrote {out / 'predictions.csv'} and {out / 'metrics.json'}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
