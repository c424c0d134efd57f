"""`fundusfm serve`: the local web app and JSON API around one bundle."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from fundusfm.cli.common import ConfigOpt, SetOpt, fail, resolve, user_errors

SERVE_PACKAGES = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "python_multipart": "python-multipart",
    "fastapi_offline": "fastapi-offline",
}


def missing_serve_packages() -> list[str]:
    """The packages of the `serve` extra that are not installed."""
    return [
        pip for module, pip in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None
    ]


def serve(
    bundle: Annotated[Path, typer.Argument(help="Classifier bundle folder.")],
    host: Annotated[
        str | None,
        typer.Option(
            help="Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 "
            "makes it reachable from the network, with no authentication)."
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Port, 0-65535 (default 8000; 0: one the system chooses)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Serve a web page and a JSON API that screen dropped photographs with BUNDLE.

    Settings (--set key=value, --config FILE): max_upload_bytes, max_pixels, gradcam, engine,
    device, max_concurrent, max_waiting, quality.* (predict's quality gate).
    """
    missing = missing_serve_packages()
    if missing:
        raise fail(f"fundusfm serve needs {', '.join(missing)}: pip install 'fundusfm[serve]'")
    from fundusfm.config.serve import ServeConfig
    from fundusfm.serve.server import exposed
    from fundusfm.serve.server import serve as run_server

    if port is not None and not 0 <= port <= 65535:  # named as typed, not as --set port
        raise fail(f"--port {port}: a port is a number from 0 to 65535 (0: any free one)")
    settings = resolve(ServeConfig, config, set_, host=host, port=port)
    if exposed(settings.host):
        typer.secho(
            f"warning: listening on {settings.host}: the server is reachable from the network "
            "and has no authentication; anyone who can reach it can upload images",
            fg=typer.colors.YELLOW,
            err=True,
        )
    with user_errors():
        run_server(bundle, settings, typer.echo)
