"""`fundusfm serve`: its options, localhost by default, a warning when exposed, settings
through --set, and one line when the `serve` extra is missing."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fundusfm.cli import app
from fundusfm.cli import serve as serve_cli
from fundusfm.config.serve import ServeConfig
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


def test_serve_loads_the_bundle_says_the_address_and_runs_uvicorn_on_it(served, monkeypatch):
    ran, said = [], []
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: ran.append((app, kw)))
    server.serve(served.bundle, ServeConfig(engine="torch"), said.append)
    assert said == ["fundusfm serve: http://127.0.0.1:8000/ (Ctrl-C stops it)"]
    ((app, options),) = ran
    assert options["host"] == "127.0.0.1" and options["port"] == 8000
    assert {r.path for r in app.routes} >= {"/", "/v1/predict", "/v1/model", "/docs"}
