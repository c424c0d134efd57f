"""Command line: parse arguments, load the typed config, call one library function, print.

Every command that has settings takes `--config FILE.yaml` and any number of
`--set key=value` overrides; the flags shown in `--help` are shortcuts for the same keys.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import BaseModel

from .. import __version__
from ..config import ConfigError, load_config
from ..decode import ImageDecodeError

app = typer.Typer(
    help="fundusfm: disease-specific foundation models for retinal fundus photographs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect and validate image manifests.", no_args_is_help=True)
grid_app = typer.Typer(help="Run and report the experiment grid.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print measured figures.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(grid_app, name="grid")
app.add_typer(bench_app, name="bench")

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
    except (ConfigError, ImageDecodeError, ValueError) as exc:
        raise fail(str(exc)) from exc
    except OSError as exc:
        raise fail(f"{exc}") from exc


def resolve(model: type[M], config: Path | None, sets: list[str] | None, **flags) -> M:
    """Config file, then `--set`, then explicit flags (flags left at None are not applied)."""
    overrides = list(sets or [])
    overrides += [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    try:
        return load_config(model, config, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fundusfm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """fundusfm: disease-specific foundation models for retinal fundus photographs."""


def run() -> None:  # pragma: no cover - console entry for `python -m fundusfm`
    app(prog_name="fundusfm")
    sys.exit(0)


# The commands register themselves on the apps above.
from . import (  # noqa: E402, F401
    bench_commands,
    data_commands,
    explain_commands,
    grid_commands,
    model_commands,
    segment_commands,
    weights_commands,
)
