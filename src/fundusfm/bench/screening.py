"""Row (c): screening throughput - PyTorch eager vs ONNX Runtime vs torch.compile, then
`fundusfm predict` end to end (`bench_predict`, described there) - on the CPU or on CUDA.

All three run the same computation: the model `fundusfm export --format onnx` writes (float
images in [0, 1], normalised inside, class probabilities out), built from a bundle with
random weights of the chosen architecture. Eager is what `fundusfm predict` runs (the
bundle's model under `torch.no_grad`); ONNX Runtime runs the file `weights.export` writes;
torch.compile uses Inductor with weight freezing (its recommended setting for CPU
inference) and static shapes. Set-up (export, compilation) is reported but not counted in
images/s. The backends take turns, one timed batch each, for `rounds` rounds, after one
untimed warm-up call each. A backend that cannot run here (ONNX packages not installed,
no C++ compiler for Inductor) gets a row that says why instead of a figure.

On CUDA (`device="cuda"`) eager and torch.compile run in channels_last under autocast
(bf16 where the GPU has it, as `train.amp=auto`) and ONNX Runtime runs the same fp32 graph
on its CUDAExecutionProvider (`onnxruntime-gpu`; without it the row says so). Every backend
takes the same batch from host memory and hands back a NumPy array, so each figure counts
the copies to and from the GPU.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fundusfm.bundle import BundleMeta, save_bundle
from fundusfm.config.core import SynthConfig
from fundusfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fundusfm.engine.device import Runtime
from fundusfm.errors import ConfigError
from fundusfm.inference import missing_onnx_packages, onnx_graph
from fundusfm.models.loaded import build_model, load_bundle
from fundusfm.screen.predict import default_workers, screen
from fundusfm.synthetic.generate import generate
from fundusfm.weights import export, exported_module

BACKENDS = ("eager", "onnxruntime", "torch.compile")


@dataclass
class ScreenSetting:
    arch: str = "resnet50"
    resolution: int = 224
    batch_size: int = 8
    rounds: int = 3
    device: str = "cpu"  # or cuda: AMP + channels_last, ONNX Runtime's CUDA provider

    def describe(self) -> str:
        extra = ", AMP, channels_last" if self.device == "cuda" else ""
        return f"{self.arch}, {self.resolution} px, batch {self.batch_size}{extra}, {self.device}"

    def runtime(self) -> Runtime:
        """Autocast and memory format of eager and torch.compile: `auto`, as training."""
        return Runtime.of(torch.device(self.device), "auto", "auto", self.batch_size)


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
                "thresholds_validated": False,  # random weights: nothing was validated
                "thresholds_note": "0.5: a benchmark bundle with random weights",
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


def _exported_module(bundle_path: Path, rt: Runtime) -> torch.nn.Module:
    """The exported module (its normalisation buffers too) on the device, in its format."""
    fmt = torch.channels_last if rt.channels_last else torch.preserve_format
    return exported_module(load_bundle(bundle_path)).to(rt.device, memory_format=fmt)


def _on_device(module: Callable, rt: Runtime) -> Callable[[torch.Tensor], np.ndarray]:
    """Host batch in, NumPy out: to the device, in its memory format, under its autocast."""
    fmt = torch.channels_last if rt.channels_last else torch.contiguous_format

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad(), rt.autocast():
            out = module(x.to(rt.device).contiguous(memory_format=fmt))
        return out.float().cpu().numpy()

    return run


def _eager(bundle_path: Path, _: Path, s: ScreenSetting) -> Callable[[torch.Tensor], np.ndarray]:
    rt = s.runtime()
    return _on_device(_exported_module(bundle_path, rt), rt)


CUDA_PROVIDER = "CUDAExecutionProvider"


class ProviderMissing(ConfigError):
    """ONNX Runtime is installed without the provider the device needs (a row, not a crash)."""


def _onnxruntime(bundle_path: Path, tmp: Path, s: ScreenSetting):
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if s.device == "cuda":
        if CUDA_PROVIDER not in ort.get_available_providers():
            raise ProviderMissing(
                f"onnxruntime has no {CUDA_PROVIDER} here: pip install onnxruntime-gpu"
            )
        providers.insert(0, CUDA_PROVIDER)
    path = export(bundle_path, "onnx", tmp / "model.onnx")
    session = ort.InferenceSession(str(path), providers=providers)
    if session.get_providers()[0] != providers[0]:  # ORT falls back without raising
        raise ConfigError(f"{providers[0]} did not start (CUDA libraries?)")
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _compiled(bundle_path: Path, _: Path, s: ScreenSetting):
    import torch._inductor.config as inductor

    rt = s.runtime()
    run = _on_device(torch.compile(_exported_module(bundle_path, rt), dynamic=False), rt)

    def frozen(x: torch.Tensor) -> np.ndarray:
        with inductor.patch(freezing=True):
            return run(x)

    return frozen


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
                run = MAKERS[name](bundle_path, Path(tmp), s)
                out = run(x)  # first call: Inductor compiles here; untimed warm-up for all
            except ProviderMissing as exc:
                results[name].update(status="not installed", reason=str(exc))
                continue
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


@dataclass
class PredictSetting:
    arch: str = "resnet50"
    resolution: int = 512
    images: int = 48
    synth_size: int = 512  # side of the generated photographs
    batch_size: int = 32  # `fundusfm predict`'s default
    rounds: int = 1
    device: str = "cpu"  # `predict --device`; on CUDA `auto` runs torch

    def describe(self) -> str:
        return (
            f"{self.arch}, {self.resolution} px, {self.images} generated {self.synth_size} px "
            f"images, batch {self.batch_size}, {self.device}"
        )


PREDICT_RUNS = {  # name -> engine and workers of `screen`
    "eager": ("torch", 0),  # `fundusfm predict` before engines and overlapped decoding
    "default": ("auto", None),  # today's defaults: ONNX Runtime when installed, workers
}


def _screen_timed(bundle_path: Path, folder: Path, out: Path, s: PredictSetting, name: str):
    engine, workers = PREDICT_RUNS[name]
    start = time.perf_counter()
    done = screen(
        bundle_path, folder, out, None, True, False, s.batch_size, workers, s.device, False, engine
    )
    return done, time.perf_counter() - start


def bench_predict(s: PredictSetting) -> dict:
    """`fundusfm predict` over a folder, whole calls timed (bundle load, decoding, quality
    gate, cropping, scoring, CSV and report): the eager path (engine torch, no decoding
    workers) vs the defaults (engine auto, `default_workers()`). The ONNX graph is built
    before the timing (reported as `graph_build_s`: once per bundle, then cached), and each
    run is warmed up untimed on two of the images; then the two take turns for `rounds`
    rounds. Also compares their probabilities and decisions."""
    with tempfile.TemporaryDirectory(prefix="fundusfm-bench-predict-") as tmp:
        root = Path(tmp)
        cfg = SynthConfig(n=s.images, size=s.synth_size, workers=1)
        folder = generate(cfg, root / "synth", progress=False).parent / "images"
        (root / "warm").mkdir()
        for image in sorted(folder.iterdir())[:2]:
            (root / "warm" / image.name).hardlink_to(image)
        bundle_path = random_bundle(s.arch, s.resolution, root / "bundle")
        build = None
        if s.device == "cpu" and not missing_onnx_packages():  # what `auto` runs, else torch
            start = time.perf_counter()
            onnx_graph(load_bundle(bundle_path))
            build = time.perf_counter() - start
        seconds, tables, engines = dict.fromkeys(PREDICT_RUNS, 0.0), {}, {}
        for name in PREDICT_RUNS:  # imports, first calls, worker start-up paths
            _screen_timed(bundle_path, root / "warm", root / name, s, name)
        for r in range(s.rounds):
            for name in list(PREDICT_RUNS)[:: 1 if r % 2 == 0 else -1]:
                done, spent = _screen_timed(bundle_path, folder, root / name, s, name)
                seconds[name] += spent
                tables[name], engines[name] = done.table, done.engine
    eager, default = tables["eager"], tables["default"]
    probs = [c for c in eager.columns if c.startswith("p_")]
    rate = {name: s.images * s.rounds / spent for name, spent in seconds.items()}
    return {
        "setting": s.describe(),
        "eager_images_per_s": rate["eager"],
        "default_images_per_s": rate["default"],
        "ratio": rate["default"] / rate["eager"],
        "default_engine": engines["default"],
        "default_workers": default_workers(),
        "graph_build_s": build,
        "scored": int((default["status"] == "scored").sum()),
        "max_abs_diff_vs_eager": float((eager[probs] - default[probs]).abs().max().max()),
        "same_decisions": bool(eager["decision"].equals(default["decision"])),
    }
