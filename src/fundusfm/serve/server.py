"""Running the app with uvicorn: in the foreground (`serve`, the command) or in a thread
on a free localhost port (`background`, for the browser and load tests and the benchmark)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from fundusfm.config.serve import ServeConfig
from fundusfm.serve.app import create_app


def exposed(host: str) -> bool:
    """Whether listening on `host` makes the server reachable from other machines."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return True


def serve(bundle_path: Path, settings: ServeConfig, say: Callable[[str], object] = print) -> None:
    """Load the bundle, say where the page is, then serve until interrupted (Ctrl-C)."""
    app = create_app(bundle_path, settings)
    say(f"fundusfm serve: http://{settings.host}:{settings.port}/ (Ctrl-C stops it)")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


@contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", timeout: float = 30) -> Iterator[str]:
    """Serve `app` in a thread on a free port of `host`; yields its URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    start = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - start > timeout:
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
