"""The headless browser of the page tests (Playwright driving the system's chromium; no
browser is downloaded): `chromium` on PATH, as .ci/run finds and installs it, or
$FUNDUSFM_CHROMIUM. Without one the tests skip, unless $FUNDUSFM_REQUIRE_BROWSER is set
(.ci/run sets it), when their absence fails the run instead of hiding."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

CHROMIUM = os.environ.get("FUNDUSFM_CHROMIUM") or shutil.which("chromium")
# Without the background-networking flags chromium's own connections are refused by a
# closed network, and it can stall; the rest keep it quiet and headless as root.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    if CHROMIUM is None:
        return "no chromium on PATH nor in $FUNDUSFM_CHROMIUM (apt-get install chromium)"
    return None


def need_browser() -> None:
    """Skip the calling test (or module) without a browser; fail instead under CI."""
    why = missing()
    if why and os.environ.get("FUNDUSFM_REQUIRE_BROWSER"):
        pytest.fail(f"the browser tests cannot run: {why}", pytrace=False)
    if why:
        pytest.skip(why, allow_module_level=True)


def launch(playwright):
    """A headless chromium from a `sync_playwright()` context."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
