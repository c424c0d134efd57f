"""Running the app with uvicorn: in the foreground (`serve`, the command) or in a thread
on a free localhost port (`background`, for the browser and load tests and the benchmark).

`serve` binds the port itself before it says the address (`bind`): a port in use, one that
needs administrator rights, or an address that is not this machine's is one ConfigError
line saying what to do, not uvicorn's log; with port 0 the address said is the port the
system chose. uvicorn then serves on that socket.
"""

from __future__ import annotations

import errno
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
from fundusfm.errors import ConfigError
from fundusfm.serve.app import create_app


def exposed(host: str) -> bool:
    """Whether listening on `host` makes the server reachable from other machines."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return True


def _bind_words(host: str, port: int, exc: OSError) -> str:
    where = f"port {port} on {host}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where} is in use; choose another with --port"
    if exc.errno == errno.EACCES:
        return f"{where} needs administrator rights; choose one over 1023 with --port"
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return f"cannot listen on {host}: not an address of this machine; choose one with --host"
    return f"cannot listen on {where} ({exc.strerror or exc}); choose another with --port"


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (as uvicorn binds one), or a ConfigError in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(_bind_words(host, port, exc)) from exc
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(bundle_path: Path, settings: ServeConfig, say: Callable[[str], object] = print) -> None:
    """Bind the port (a port in use is said at once), load the bundle, say where the page
    is, then serve until Ctrl-C."""
    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    try:
        app = create_app(bundle_path, settings)
        say(f"fundusfm serve: {url(settings.host, port)}/ (Ctrl-C stops it)")
        config = uvicorn.Config(app, host=settings.host, port=port, log_level="info")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", timeout: float = 30) -> Iterator[str]:
    """Serve `app` in a thread on a free port of `host`; yields its URL, stops on exit."""
    sock = bind(host, 0)
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
        yield url(host, port)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
