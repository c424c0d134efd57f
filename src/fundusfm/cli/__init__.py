"""Command line: parse arguments, load the typed config, call one library function, print.

Every command that has settings takes `--config FILE.yaml` and any number of
`--set key=value` overrides; the flags shown in `--help` are shortcuts for the same keys.
Errors a user can fix end as one `error:` line with exit code 2 (`user_errors`); any other
exception ends as one line naming the command and the error, also with exit code 2, and
`fundusfm --debug COMMAND ...` shows its traceback instead (`CommandGroup`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from fundusfm import __version__
from fundusfm.cli import bench, data, explain, grid, screen, segment, serve, train, weights
from fundusfm.cli.common import DEBUG, group

app = group(
    "fundusfm: disease-specific foundation models for retinal fundus photographs.",
    pretty_exceptions_enable=False,
    add_completion=False,
)
for command in (
    data.synth, data.preprocess, data.split, screen.predict, serve.serve,
    train.demo, train.pretrain, train.finetune, train.evaluate,
):  # fmt: skip
    app.command()(command)
for sub, name in (
    (data.app, "data"), (grid.app, "grid"), (bench.app, "bench"), (explain.app, "explain"),
    (segment.app, "segment"), (weights.app, "weights"),
):  # fmt: skip
    app.add_typer(sub, name=name)


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
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """fundusfm: disease-specific foundation models for retinal fundus photographs."""
    DEBUG["traceback"] = debug


def run() -> None:  # pragma: no cover - console entry for `python -m fundusfm`
    app(prog_name="fundusfm")
    sys.exit(0)
