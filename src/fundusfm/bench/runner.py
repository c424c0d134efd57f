"""`fundusfm bench run`: every benchmark row side by side in one run, as a table and JSON.

Rows (each figure a ratio of two things measured in the same run):
    a  input pipeline: a training epoch through the cache, loader and augmentation vs the
       same steps on batches already in memory (goal <= 1.10 at 128 and 224 px on CPU);
       with CUDA also 512 px with AMP + channels_last (`pipeline.py`)
    b  LF through the feature cache vs training heads on the frozen backbone, and (b.grid) the
       5-fold x 6-fraction LF grid through the features vs one extraction pass, with its
       images/s (goal <= 1.3); model `lf_arch` (default `arch`; any timm:NAME, a ViT built at
       `lf_resolution`) (`lf_cache.py`)
    c  screening: PyTorch eager vs ONNX Runtime vs torch.compile (on the CPU, or on CUDA with
       AMP + channels_last and ONNX Runtime's CUDA provider), and `predict` end to end,
       today's defaults vs the eager path (goal >= 1.5 at 512 px; `screening.py`)
    d  peak memory streaming N and 10 x N cached 512 px images (goal < 2 GB; `memory.py`)
Data is generated into a temporary folder and removed afterwards. The sizes are a `Preset`
(`presets.py`: `default`, `quick`, `gpu`; `--set FIELD=VALUE` changes one field).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fundusfm.bench.lf_cache import bench_lf
from fundusfm.bench.memory import bench_memory
from fundusfm.bench.pipeline import PipelineSetting, bench_pipeline
from fundusfm.bench.presets import Preset
from fundusfm.bench.screening import (
    PredictSetting,
    ScreenSetting,
    bench_predict,
    bench_screening,
)
from fundusfm.bench.workspace import Workspace
from fundusfm.config.core import FinetuneConfig, SynthConfig
from fundusfm.errors import ConfigError
from fundusfm.synthetic.generate import generate

GROUPS = {"a": "pipeline", "b": "lf", "c": "screen", "d": "memory"}
PIPELINE_GOAL, MEMORY_GOAL_MB, PREDICT_GOAL, LF_GRID_GOAL = 1.10, 2048, 1.5, 1.3
GOAL_RESOLUTIONS = (128, 224)


def row(rid: str, name: str, setting: str, **kw) -> dict:
    """One table row: figure (text), ratio, goal (text), met (bool or None), status."""
    base = {"id": rid, "row": name, "setting": setting, "figure": "", "ratio": None}
    return {**base, "goal": "", "met": None, "status": "ok", "reason": "", **kw}


def _pipeline_row(rid: str, s: PipelineSetting, ws: Workspace, say) -> dict:
    say(f"a: input pipeline, {s.describe()}")
    r = bench_pipeline(ws.fold(s.resolution), s)
    figure = (
        f"epoch {sum(r['loader_epoch_s']) / s.rounds:.2f} s through the loader vs "
        f"{sum(r['memory_epoch_s']) / s.rounds:.2f} s in memory "
        f"({r['steps_per_epoch']} steps; {r['loader_images_per_s']:.1f} vs "
        f"{r['memory_images_per_s']:.1f} img/s)"
    )
    goal = s.device == "cuda" or s.resolution in GOAL_RESOLUTIONS  # the settings
    return row(
        rid,
        "input pipeline",
        s.describe(),
        figure=figure,
        ratio=r["ratio"],
        goal=f"<= {PIPELINE_GOAL:.2f}" if goal else "(goal at 128, 224 px)",
        met=r["ratio"] <= PIPELINE_GOAL if goal else None,
        values=r,
    )


def _pipeline_rows(p: Preset, ws: Workspace, say) -> list[dict]:
    rows = []
    for res in p.pipeline_resolutions:
        s = PipelineSetting(p.arch, res, p.batch_size, p.workers, rounds=p.rounds)
        rows.append(_pipeline_row(f"a.cpu.{res}", s, ws, say))
    if p.cpu_variant_workers:  # worker processes on the CPU: they share the cores
        res, workers = p.pipeline_resolutions[0], p.cpu_variant_workers
        s = PipelineSetting(p.arch, res, p.batch_size, workers, rounds=p.rounds)
        rows.append(_pipeline_row(f"a.cpu.{res}.w{workers}p", s, ws, say))
    if not torch.cuda.is_available():
        rows.append(
            row(
                f"a.cuda.{p.gpu_resolution}",
                "input pipeline",
                f"{p.arch}, {p.gpu_resolution} px, AMP, channels_last, cuda",
                status="skipped",
                reason="no CUDA device",
            )
        )
        return rows
    gpu_ws = Workspace(ws.root / "gpu", p.gpu_images, round(p.gpu_resolution * 1.25))
    for workers in p.gpu_workers:
        s = PipelineSetting(
            p.arch,
            p.gpu_resolution,
            p.gpu_batch,
            workers,
            rounds=p.rounds,
            device="cuda",
            amp=True,
            channels_last=True,
        )
        r = _pipeline_row(f"a.cuda.{p.gpu_resolution}.w{workers}", s, gpu_ws, say)
        r["setting"] += f" ({torch.cuda.get_device_name()})"
        rows.append(r)
    return rows


def _lf_rows(p: Preset, ws: Workspace, say) -> list[dict]:
    arch = p.lf_arch or p.arch
    cfg = FinetuneConfig()
    cfg.data = ws.data_config(p.lf_resolution)
    cfg.model.arch, cfg.model.init = arch, "scratch"
    cfg.train.batch_size, cfg.train.workers = p.batch_size, p.workers
    grid = f"{p.lf_folds} folds x {len(p.lf_fractions)} fractions"
    setting = f"{arch}, {p.lf_resolution} px, {p.images} images, {grid}"
    say(f"b: LF through the feature cache, {setting}")
    ws.fold(p.lf_resolution)  # cache built outside the timing
    r = bench_lf(cfg, list(p.lf_fractions), list(range(p.lf_folds)))
    frozen = r["frozen_backbone_50_epochs_s_extrapolated"]
    parts = f"one extraction {r['extract_s']:.1f} s + {r['cells']} probes {r['probes_s']:.1f} s"
    figure = (
        f"{r['lf_via_features_s']:.1f} s ({parts}) vs {frozen:.0f} s frozen-backbone training "
        "(one epoch measured, x 50 epochs x every cell)"
    )
    grid_figure = (
        f"grid {r['lf_via_features_s']:.1f} s = {parts}; extraction "
        f"{r['extract_images_per_s']:.2f} img/s ({r['feature_dim']} features per image)"
    )
    ratio, cost = r["speedup_vs_frozen_backbone_training"], r["lf_cost_vs_one_extraction"]
    return [
        row("b", "LF via feature cache", f"{setting}, 50 epochs", figure=figure, ratio=ratio)
        | {"goal": "> 1 (speed-up)", "met": ratio > 1, "values": r},
        row("b.grid", "LF grid vs one extraction", setting, figure=grid_figure, ratio=cost)
        | {"goal": f"<= {LF_GRID_GOAL:.2f}", "met": cost <= LF_GRID_GOAL, "values": r},
    ]


def _screen_rows(p: Preset, say) -> list[dict]:
    if p.screen_device == "cuda" and not torch.cuda.is_available():
        setting = f"{p.arch}, AMP, channels_last, cuda"
        return [row("c", "screening", setting, status="skipped", reason="no CUDA device")]
    rows = []
    for res in p.screen_resolutions:
        s = ScreenSetting(p.arch, res, p.screen_batch, p.screen_rounds, p.screen_device)
        say(f"c: screening backends, {s.describe()}")
        for name, r in bench_screening(s).items():
            base = row(f"c.{res}.{name}", f"screening: {name}", s.describe(), values=r)
            if r["status"] != "ok":
                rows.append(base | {"status": r["status"], "reason": r["reason"]})
                continue
            figure = f"{r['images_per_s']:.1f} img/s"
            if name != "eager":
                diff = r["max_abs_diff_vs_eager"]
                diff = "n/a" if diff is None else f"{diff:.0e}"
                figure += f" (set-up {r['setup_s']:.0f} s; max |p - eager| {diff})"
            goal = "reference" if name == "eager" else "vs eager"
            rows.append(base | {"figure": figure, "ratio": r["ratio"], "goal": goal})
    s = PredictSetting(
        p.arch,
        p.predict_resolution,
        p.predict_images,
        p.predict_synth_size,
        p.predict_batch,
        device=p.screen_device,
    )
    return [*rows, _predict_row(s, say)]


def _predict_row(s: PredictSetting, say) -> dict:
    say(f"c: fundusfm predict end to end, {s.describe()}")
    r = bench_predict(s)
    built, workers = r["graph_build_s"], r["default_workers"]
    figure = (
        f"{r['default_images_per_s']:.2f} img/s (engine {r['default_engine']}, {workers} "
        f"decoding worker{'' if workers == 1 else 's'}) vs {r['eager_images_per_s']:.2f} img/s "
        "eager (engine torch, no workers)"
        + ("" if built is None else f"; graph built once in {built:.0f} s")
        + f"; max |p - eager| {r['max_abs_diff_vs_eager']:.0e}, decisions "
        + ("equal" if r["same_decisions"] else "DIFFER")
    )
    goal = s.resolution == 512 and s.device == "cpu"  # the setting
    return row(
        f"c.predict.{s.resolution}",
        "predict: defaults vs eager",
        s.describe(),
        figure=figure,
        ratio=r["ratio"],
        goal=f">= {PREDICT_GOAL:.1f}" if goal else "(goal at 512 px on the CPU)",
        met=r["ratio"] >= PREDICT_GOAL if goal else None,
        values=r,
    )


def _memory_rows(p: Preset, tmp: Path, say) -> list[dict]:
    small, large = p.memory_sizes
    source = generate(SynthConfig(n=1, size=640, workers=1), tmp / "one", progress=False)
    image = source.parent / "images" / sorted(os.listdir(source.parent / "images"))[0]
    say(f"d: peak memory streaming {small:,} and {large:,} images at {p.memory_resolution} px")
    r = bench_memory(image, p.memory_resolution, [small, large], p.memory_batch, p.memory_workers)
    figure = (
        f"peak {r['peak_mb_small']:.0f} MB at {small:,} images, {r['peak_mb_large']:.0f} MB "
        f"at {large:,} ({r['runs'][str(large)]['measure']}); the cache index and dataset "
        f"hold {r['dataset_kb_per_image']:.2f} KB per image"
    )
    met = max(r["peak_mb_small"], r["peak_mb_large"]) < MEMORY_GOAL_MB
    return [
        row(
            "d",
            "peak memory, streaming",
            r["setting"],
            figure=figure,
            ratio=r["ratio"],
            goal=f"< {MEMORY_GOAL_MB} MB at both sizes",
            met=met,
            values=r,
        )
    ]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    return info


def parse_only(only: str | None) -> list[str]:
    if not only:
        return list(GROUPS)
    wanted = []
    for part in only.split(","):
        key = part.strip().lower()
        key = next((k for k, v in GROUPS.items() if key in (k, v)), key)
        if key not in GROUPS:
            choices = ", ".join(f"{k} ({v})" for k, v in GROUPS.items())
            raise ConfigError(f"--only: unknown row {part!r}; choose from {choices}")
        wanted.append(key)
    return sorted(set(wanted))


def run_bench(
    preset: Preset,
    only: list[str] | None = None,
    say: Callable[[str], None] = lambda _: None,
    command: str = "",
) -> dict:
    """Run the chosen rows of a preset; returns the report (rows, settings, machine)."""
    only = only or list(GROUPS)
    report = {"command": command, "preset": dataclasses.asdict(preset), "machine": machine()}
    rows: list[dict] = []
    clock = start = time.perf_counter()

    def said(message: str) -> None:  # progress, with the time since the run started
        say(f"[{time.perf_counter() - clock:6.1f} s] {message}")

    with tempfile.TemporaryDirectory(prefix="fundusfm-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        ws = None
        if {"a", "b"} & set(only):
            said(f"generating {preset.images} images at {preset.synth_size} px")
            ws = Workspace(
                tmp / "ws", preset.images, preset.synth_size, preset.lf_folds, preset.lf_fractions
            )
        if "a" in only:
            rows += _pipeline_rows(preset, ws, said)
        if "b" in only:
            rows += _lf_rows(preset, ws, said)
        if "c" in only:
            rows += _screen_rows(preset, said)
        if "d" in only:
            rows += _memory_rows(preset, tmp, said)
    said("done")
    report["rows"] = rows
    report["seconds"] = time.perf_counter() - start
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = os.getloadavg()
    return report


def _ratio_text(value) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def format_table(report: dict) -> str:
    """Aligned text table: row, setting, figure, ratio, goal."""
    lines = [("row", "setting", "figure", "ratio", "goal")]
    for r in report["rows"]:
        figure = r["figure"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        goal = r["goal"]
        if r["met"] is not None:
            goal += " (met)" if r["met"] else " (MISSED)"
        lines.append((f"{r['id']} {r['row']}", r["setting"], figure, _ratio_text(r["ratio"]), goal))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    out = []
    for i, line in enumerate(lines):
        cells = [
            c.ljust(w) if j != 3 else c.rjust(w)
            for j, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    m = report["machine"]
    out.append(
        f"\n{m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", {m['cuda']}" if m["cuda"] else ", no CUDA")
        + f"; {report['seconds']:.0f} s"
        + (
            f"; load average {m['load_average_at_start'][0]:.1f} at start, "
            f"{m['load_average_at_end'][0]:.1f} at end"
            if "load_average_at_end" in m
            else ""
        )
    )
    return "\n".join(out)
