"""Row (c): screening throughput on the CPU - PyTorch eager vs ONNX Runtime vs torch.compile.

All three run the same computation: the model `fundusfm export --format onnx` writes (float
images in [0, 1], normalised inside, class probabilities out), built from a bundle with
random weights of the chosen architecture. Eager is what `fundusfm predict` runs (the
bundle's model under `torch.no_grad`); ONNX Runtime runs the file `weights.export` writes;
torch.compile uses Inductor with weight freezing (its recommended setting for CPU
inference) and static shapes. Set-up (export, compilation) is reported but not counted in
images/s. The backends take turns, one timed batch each, for `rounds` rounds, after one
untimed warm-up call each. A backend that cannot run here (ONNX packages not installed,
no C++ compiler for Inductor) gets a row that says why instead of a figure.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fundusfm.bundle import BundleMeta, save_bundle
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.models.loaded import build_model, load_bundle
from fundusfm.weights import export, exported_module

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
BACKENDS = ("eager", "onnxruntime", "torch.compile")


@dataclass
class ScreenSetting:
    arch: str = "resnet50"
    resolution: int = 224
    batch_size: int = 8
    rounds: int = 3

    def describe(self) -> str:
        return f"{self.arch}, {self.resolution} px, batch {self.batch_size}, cpu"


def random_bundle(arch: str, resolution: int, folder: Path) -> Path:
    """A binary classification bundle with random weights (what screening would load)."""
    meta = BundleMeta.model_validate(
        {
            "architecture": {"arch": arch, "head": "mlp", "hidden": 512, "outputs": 2},
            "task": {
                "name": "bench",
                "kind": "binary",
                "classes": ["normal", "abnormal"],
                "thresholds": [0.5],
            },
            "preprocessing": {
                "resolution": resolution,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "provenance": {"made_by": "fundusfm bench (random weights)"},
        }
    )
    torch.manual_seed(0)
    return save_bundle(build_model(meta), folder, meta)


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def _exported_module(bundle_path: Path) -> torch.nn.Module:

    return exported_module(load_bundle(bundle_path))


def _eager(bundle_path: Path, _: Path) -> Callable[[torch.Tensor], np.ndarray]:
    module = _exported_module(bundle_path)

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()

    return run


def _onnxruntime(bundle_path: Path, tmp: Path) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime as ort

    path = export(bundle_path, "onnx", tmp / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _compiled(bundle_path: Path, _: Path) -> Callable[[torch.Tensor], np.ndarray]:
    import torch._inductor.config as inductor

    module = _exported_module(bundle_path)
    compiled = torch.compile(module, dynamic=False)

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad(), inductor.patch(freezing=True):
            return compiled(x).numpy()

    return run


MAKERS = {"eager": _eager, "onnxruntime": _onnxruntime, "torch.compile": _compiled}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def bench_screening(s: ScreenSetting) -> dict[str, dict]:
    """images/s of each backend (or why it could not run), and its ratio to eager."""
    results: dict[str, dict] = {}
    runners: dict[str, Callable] = {}
    x = torch.rand(
        s.batch_size, 3, s.resolution, s.resolution, generator=torch.Generator().manual_seed(0)
    )
    with tempfile.TemporaryDirectory(prefix="fundusfm-bench-") as tmp:
        bundle_path = random_bundle(s.arch, s.resolution, Path(tmp) / "bundle")
        reference = None
        for name in BACKENDS:
            results[name] = {"backend": name, "setting": s.describe()}
            missing = missing_onnx_packages() if name == "onnxruntime" else []
            if missing:
                results[name].update(
                    status="not installed",
                    reason=f"{', '.join(missing)} not installed: pip install 'fundusfm[onnx]'",
                )
                continue
            start = time.perf_counter()
            try:
                run = MAKERS[name](bundle_path, Path(tmp))
                out = run(x)  # first call: Inductor compiles here; untimed warm-up for all
            except Exception as exc:  # a backend failing is a finding, not a crash
                results[name].update(status="failed", reason=_reason(exc))
                continue
            runners[name] = run
            if name == "eager":
                reference = out
            diff = None if reference is None else float(np.abs(out - reference).max())
            results[name].update(
                status="ok", setup_s=time.perf_counter() - start, max_abs_diff_vs_eager=diff
            )
        seconds = dict.fromkeys(runners, 0.0)
        order = list(runners)
        for r in range(s.rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                start = time.perf_counter()
                runners[name](x)
                seconds[name] += time.perf_counter() - start
    images = s.batch_size * s.rounds
    eager = images / seconds["eager"] if "eager" in seconds else None
    for name, spent in seconds.items():
        rate = images / spent
        results[name].update(images_per_s=rate, ratio=rate / eager if eager else None)
    return results
