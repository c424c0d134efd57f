"""Shared fixtures: small generated data sets, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fundusfm.config.core import SynthConfig
from fundusfm.synthetic.generate import generate

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The tests' tiny backbone: ResNet-10 (one BasicBlock per stage, models/backbone.py), a
# registered arch, so unit tests that train do not train ResNet-18s. Tests of a named
# architecture's layout (legacy import, ImageNet files) keep their own.
TINY_ARCH = "resnet10"


def pytest_configure(config) -> None:
    """Under pytest-xdist (the default, pyproject's addopts) each worker computes on one
    thread, so that two workers share two cores instead of fighting over them; subprocesses
    the tests start (torchrun, the CLI) inherit OMP_NUM_THREADS."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first (stable order otherwise): a long test begun last would keep one
    worker busy while the others wait."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    return TINY_ARCH


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> Path:
    """40 generated images at 128 px; returns the manifest path. Treat as read-only."""
    out = tmp_path_factory.mktemp("synth")
    return generate(SynthConfig(n=40, size=128, seed=7, workers=1), out, progress=False)


@pytest.fixture(scope="session")
def synth_large(tmp_path_factory) -> Path:
    """300 generated images at 96 px for split statistics. Treat as read-only."""
    out = tmp_path_factory.mktemp("synth_large")
    return generate(SynthConfig(n=300, size=96, seed=3, workers=2), out, progress=False)
