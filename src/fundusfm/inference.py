"""Inference engines: a loaded bundle and an engine name become one scorer, a callable from
uint8 image batches (N x 3 x R x R, preprocessed as the bundle says) to its probabilities.

    torch        the bundle's own model (`Bundle.predict`), on whatever device it was loaded
    onnxruntime  ONNX Runtime on the CPU, running the graph `weights.export` writes (float
                 images in [0, 1], the bundle's normalisation inside, probabilities out)
    auto         onnxruntime when the device is the CPU and the `onnx` extra is installed
                 (`pip install 'fundusfm[onnx]'`), torch otherwise (GPU, MPS)
`resolve_engine` is the one place that rule lives. `predict`, `evaluate` and the
probabilities of `explain gradcam` take their scorer from `scorer`; what needs gradients or
backbone features (Grad-CAM maps, ROAD, t-SNE) stays in PyTorch (`torch_only`). The
commands default to `auto`; the library functions behind them (`screen.predict.screen`,
`tasks.evaluate.evaluate`, `explain.gradcam.explain_gradcam`) default to `torch`, as before,
so that a caller such as the grid, which scores each freshly trained bundle once, does not
pay an export per bundle unless it asks for one.

The graph is exported once per bundle and kept beside it, `BUNDLE/onnx/NAME.onnx`, NAME
being the weights' sha256 and a hash of what else the graph bakes in (architecture, task
kind: softmax or sigmoid, resolution, mean/std), so changed weights or an edited
bundle.json never reuse a stale graph. It is written atomically, and checked against the
PyTorch model (probabilities within `TOLERANCE`) before it is first used. When the bundle
folder cannot be written, the graph goes to `$FUNDUSFM_HOME/onnx/` and the scorer's notes
say so. This module sits beside `weights.py`, whose exporter it calls.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fundusfm.bundle import BundleMeta, read_preprocessing
from fundusfm.errors import ConfigError, DataError, FundusError, WeightsError
from fundusfm.io import value_sha256, write_atomic
from fundusfm.models.inits import weights_home
from fundusfm.models.loaded import Bundle
from fundusfm.weights import export

ENGINES = ("auto", "torch", "onnxruntime")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the `onnx` extra: export and run
TOLERANCE = 1e-4  # largest |p_onnxruntime - p_torch| a graph may show when it is built


def missing_onnx_packages() -> list[str]:
    """The packages of the `onnx` extra that are not installed."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _check_name(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def resolve_engine(engine: str, device: torch.device | str) -> str:
    """The engine that runs: `torch` or `onnxruntime` (see the module docstring for `auto`)."""
    _check_name(engine)
    on_cpu = torch.device(device).type == "cpu"
    if engine == "auto":
        return "onnxruntime" if on_cpu and not missing_onnx_packages() else "torch"
    if engine == "onnxruntime":
        missing = missing_onnx_packages()
        if missing:
            raise ConfigError(
                f"engine onnxruntime needs {', '.join(missing)}: pip install 'fundusfm[onnx]'"
            )
        if not on_cpu:
            raise ConfigError(
                f"engine onnxruntime runs on the CPU; on {device} use engine torch (or auto)"
            )
    return engine


def torch_only(engine: str, what: str) -> str:
    """`torch` for a step only PyTorch can run (`what` says why); onnxruntime is refused."""
    _check_name(engine)
    if engine == "onnxruntime":
        raise ConfigError(f"{what}, which only PyTorch gives: use engine auto or torch")
    return "torch"


@dataclass(frozen=True)
class Scorer:
    """A bundle's probabilities on one engine: `scorer(images)` -> (N, C) float32 array."""

    engine: str  # what runs: torch | onnxruntime
    run: Callable[[torch.Tensor], np.ndarray]
    graph: Path | None = None  # the ONNX file (onnxruntime)
    notes: tuple[str, ...] = ()  # where the graph is kept, when not beside the bundle

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if images.dtype != torch.uint8:  # a float batch would be scaled twice
            raise DataError(f"expected uint8 images (the bundle normalises), got {images.dtype}")
        return self.run(images)


def graph_name(meta: BundleMeta) -> str:
    """The cached graph's file name: weights sha256 + what else the graph bakes in."""
    pre = read_preprocessing(meta)
    baked = {
        "architecture": meta.architecture.model_dump(mode="json"),
        "kind": meta.task.kind,
        "resolution": pre.resolution,
        "mean": pre.mean,
        "std": pre.std,
    }
    return f"{meta.weights_sha256}-{value_sha256(baked)[:8]}.onnx"


def onnx_home() -> Path:
    """Graphs of bundles in folders that cannot be written: $FUNDUSFM_HOME/onnx."""
    return weights_home().parent / "onnx"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {lines[0][:200]}" if lines else "")


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(exist_ok=True)
    except OSError:  # read-only folder or file system, or a file of that name
        return False
    return folder.is_dir() and os.access(folder, os.W_OK)


def _session(graph: Path | bytes):
    import onnxruntime as ort  # optional dependency (the `onnx` extra)

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the cores PyTorch would use
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run_session(session) -> Callable[[torch.Tensor], np.ndarray]:
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> np.ndarray:
        x = images.to(torch.float32).div_(255).numpy()  # the graph normalises [0, 1] images
        return session.run(None, {name: x})[0]

    return run


def _build(bundle: Bundle, target: Path, progress: bool) -> None:
    """Export the graph, check it against PyTorch, write it to `target` as one file."""
    import onnx  # optional dependency (the `onnx` extra)

    if progress:  # a minute for a ResNet-50 at 512 px on a laptop: say why it waits
        print(f"building the ONNX graph of {bundle.path} (once): {target}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fundusfm-onnx-") as tmp:
        try:
            exported = export(bundle.path, "onnx", Path(tmp) / "model.onnx")
        except FundusError:
            raise
        except Exception as exc:  # the exporter's own errors: many types, one message
            raise WeightsError(
                f"the ONNX exporter failed on {bundle.path} ({_first_line(exc)}); use engine torch"
            ) from exc
        # the exporter keeps the weights in a second file; loaded in, the graph is one file
        graph = onnx.load(str(exported)).SerializeToString()
    r = bundle.resolution
    seed = torch.Generator().manual_seed(0)  # the global RNG is left as it was
    images = torch.randint(0, 256, (2, 3, r, r), generator=seed, dtype=torch.uint8)
    diff = float(np.abs(_run_session(_session(graph))(images) - bundle.predict(images)).max())
    if not diff <= TOLERANCE:
        raise WeightsError(
            f"the ONNX graph of {bundle.path} differs from PyTorch by {diff:.1e} "
            f"(> {TOLERANCE}); use engine torch"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda t: t.write_bytes(graph))


def onnx_graph(bundle: Bundle, progress: bool = False) -> tuple[Path, list[str]]:
    """The bundle's cached ONNX graph (built when missing) and notes on where it is kept."""
    name = graph_name(bundle.meta)
    beside, elsewhere = bundle.path / "onnx" / name, onnx_home() / name
    note = f"{bundle.path} cannot be written: its ONNX graph is kept in {elsewhere.parent}"
    if beside.is_file():
        return beside, []
    if elsewhere.is_file():
        return elsewhere, [note]
    target = beside if _writable(beside.parent) else elsewhere
    _build(bundle, target, progress)
    return target, [] if target == beside else [note]


def scorer(bundle: Bundle, engine: str = "auto", progress: bool = False) -> Scorer:
    """The bundle's probabilities on `engine` (auto, torch or onnxruntime); `progress` says
    on stderr when a graph is being built. Under `auto`, a graph that cannot be exported or
    fails its check leaves the scoring to PyTorch, and the notes say why."""
    device = next(bundle.model.parameters()).device
    chosen = resolve_engine(engine, device)
    if chosen == "torch":
        return Scorer("torch", bundle.predict)
    try:
        path, notes = onnx_graph(bundle, progress)
    except Exception as exc:  # no graph (exporter, check, disk): auto still scores, in PyTorch
        if engine != "auto":
            raise
        note = f"no ONNX graph ({_first_line(exc)}): scored by torch"
        return Scorer("torch", bundle.predict, notes=(note,))
    return Scorer("onnxruntime", _run_session(_session(path)), path, tuple(notes))
