"""`fundusfm serve`: its options, localhost by default, a warning when exposed, settings
through --set, one line when the `serve` extra is missing, and the port bound before the
address is said (one line when it cannot be, the real port for --port 0)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.cli import serve as serve_cli
from fundusfm.config.serve import ServeConfig
from fundusfm.errors import ConfigError
from fundusfm.serve import server


@pytest.fixture
def started(monkeypatch) -> list:
    """What `fundusfm serve` would have served (bundle, settings), without serving."""
    calls = []
    monkeypatch.setattr(
        server, "serve", lambda bundle, settings, say: calls.append((bundle, settings))
    )
    return calls


def run(*args):
    return CliRunner().invoke(app, ["serve", *map(str, args)])


def test_help_lists_host_and_port_and_says_localhost():
    result = run("--help")
    assert result.exit_code == 0
    for words in ("--host", "--port", "--config", "--set", "127.0.0.1", "max_upload_bytes"):
        assert words in result.output, words


def test_default_host_is_localhost_and_no_warning(started, tmp_path):
    result = run(tmp_path / "bundle")
    assert result.exit_code == 0, result.output
    ((bundle, settings),) = started
    assert bundle == tmp_path / "bundle"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert "warning" not in result.output


def test_any_other_host_warns_that_it_is_reachable(started, tmp_path):
    result = run(tmp_path, "--host", "0.0.0.0", "--port", "9001")
    assert result.exit_code == 0 and started[0][1].host == "0.0.0.0"
    assert started[0][1].port == 9001
    assert "warning: listening on 0.0.0.0: the server is reachable from the network" in (
        result.output
    )
    assert not server.exposed("127.0.0.1") and not server.exposed("localhost")
    assert not server.exposed("::1") and server.exposed("0.0.0.0") and server.exposed("myhost")


def test_settings_come_from_set_and_bad_ones_are_one_line(started, tmp_path):
    result = run(tmp_path, "--set", "max_upload_bytes=1000", "--set", "gradcam=false")
    assert result.exit_code == 0
    settings = started[0][1]
    assert settings.max_upload_bytes == 1000 and settings.gradcam is False
    bad = run(tmp_path, "--set", "max_concurrent=0")
    assert bad.exit_code == 2 and "max_concurrent" in bad.output


def test_without_the_serve_extra_one_line_says_what_to_install(started, monkeypatch, tmp_path):
    monkeypatch.setattr(serve_cli, "missing_serve_packages", lambda: ["fastapi", "uvicorn"])
    result = run(tmp_path)
    assert result.exit_code == 2 and not started
    assert result.output.strip().splitlines() == [
        "error: fundusfm serve needs fastapi, uvicorn: pip install 'fundusfm[serve]'"
    ]


def test_a_bundle_that_does_not_load_is_one_error_line(tmp_path):
    result = run(tmp_path / "missing")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'missing'} is not a bundle: it needs bundle.json and model.safetensors"
    ]


@pytest.fixture
def uvicorn_runs(monkeypatch) -> list:
    """(server, its sockets, where each is bound) of each uvicorn run, without serving."""
    ran = []

    def run(self, sockets=None):
        ran.append((self, sockets, [s.getsockname()[:2] for s in sockets or []]))

    def binds_itself(*_, **__):  # uvicorn.run binds after the address was said, if at all
        raise AssertionError("serve must bind the port itself and give uvicorn the socket")

    monkeypatch.setattr(server.uvicorn.Server, "run", run)
    monkeypatch.setattr(server.uvicorn, "run", binds_itself)
    return ran


def test_serve_binds_the_port_says_the_real_address_and_runs_uvicorn_on_it(served, uvicorn_runs):
    said = []
    server.serve(served.bundle, ServeConfig(engine="torch", port=0), said.append)
    ((uv, sockets, bound),) = uvicorn_runs
    ((host, port),) = bound  # the socket serve bound, given to uvicorn
    assert host == "127.0.0.1" and port > 0 and sockets[0].fileno() == -1  # closed after
    assert said == [f"fundusfm serve: http://127.0.0.1:{port}/ (Ctrl-C stops it)"]  # not :0
    assert (uv.config.host, uv.config.port) == ("127.0.0.1", port)  # uvicorn's settings agree
    assert {r.path for r in uv.config.app.routes} >= {"/", "/v1/predict", "/v1/model", "/docs"}


def test_a_port_in_use_is_one_line_naming_it_and_nothing_is_said_before(served, uvicorn_runs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = []
        with pytest.raises(ConfigError) as refused:
            server.serve(served.bundle, ServeConfig(engine="torch", port=port), said.append)
        result = run(served.bundle, "--port", port, "--set", "engine=torch")
    assert str(refused.value) == f"port {port} on 127.0.0.1 is in use; choose another with --port"
    assert said == [] and uvicorn_runs == []
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {refused.value}"]


def test_an_address_of_another_machine_is_one_line_naming_host():
    with pytest.raises(ConfigError, match=r"cannot listen on 192\.0\.2\.1: not an address of"):
        server.bind("192.0.2.1", 0)  # TEST-NET-1: never this machine's


def test_a_port_out_of_range_names_the_port_option(started, tmp_path):
    result = run(tmp_path, "--port", "80000")
    assert result.exit_code == 2 and not started
    assert "--port" in result.output and "80000" in result.output
    assert "--set" not in result.output
