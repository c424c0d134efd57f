"""What every command shares: one-line errors (`fail`, `user_errors`, `CommandGroup`), notes,
the `--config`/`--set` options and `resolve`, which turns them into a typed config."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import click
import typer
from pydantic import BaseModel
from typer.core import TyperGroup

from fundusfm.config.core import load_config
from fundusfm.errors import ConfigError, FundusError, TrainingDiverged

DEBUG = {"traceback": False}  # set by `fundusfm --debug`


# What typer itself reports (a bad option value, --help, Ctrl-C): typer 0.29+ raises the
# exceptions of its own bundled click, older releases click's; both pass through untouched.
PASS_THROUGH = (
    typer.Exit,
    click.exceptions.Exit,
    click.ClickException,
    click.Abort,
    *([typer.exceptions.TyperException] if hasattr(typer, "exceptions") else []),
    *([typer.Abort] if hasattr(typer, "Abort") else []),
)


class CommandGroup(TyperGroup):
    """A command group whose commands end an unexpected exception with one line and exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PASS_THROUGH:
            raise
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if DEBUG["traceback"]:
                raise
            words = [*ctx.command_path.split()[1:], ctx.invoked_subcommand or ""]
            command = " ".join(words).strip()  # e.g. `data check`, without the program name
            typer.secho(
                f"error: fundusfm {command} failed: {type(exc).__name__}: {exc}. fundusfm does "
                f"not check for this yet, or it is a bug: rerun as `fundusfm --debug {command} "
                "...` to see the traceback, and please report it",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(2) from exc


def group(help_text: str, **kwargs) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, cls=CommandGroup, **kwargs)


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
    except (FundusError, ValueError, OSError) as exc:
        if DEBUG["traceback"]:  # a ValueError may be a bug too: --debug shows where it arose
            raise
        raise fail(str(exc)) from exc


def say_notes(notes: list[str]) -> None:
    """Warnings about a result (not errors): on stderr, in yellow, one line each."""
    for note in notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)


def resolve(model: type[M], config: Path | None, sets: list[str] | None, **flags) -> M:
    """Config file, then `--set`, then explicit flags (flags left at None are not applied)."""
    overrides = list(sets or [])
    overrides += [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    try:
        return load_config(model, config, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def run_training(runner: Callable[[M], Path], cfg: M, resume: bool, quiet: bool) -> Path | None:
    """Run a training command with `--resume`/`--quiet` applied; a diverged loss exits 1.
    Returns the run folder on the process that reports (rank 0 under torchrun), else None."""
    from fundusfm.engine.distributed import is_main  # torch: not loaded for --help

    run = cfg.run.model_copy(update={"resume": cfg.run.resume or resume, "progress": not quiet})
    with user_errors():
        try:
            out = runner(cfg.model_copy(update={"run": run}))
        except TrainingDiverged as exc:
            raise fail(str(exc), code=1) from exc
    return out if is_main() else None
