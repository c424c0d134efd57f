"""GPU check: the CUDA paths of fundusfm in one script, at most 8 minutes on one data-centre GPU.

    bash benchmarks/gpu_check.sh --json gpu.json                # on a CUDA machine
    bash benchmarks/gpu_check.sh --cpu-dry-run --json dry.json  # the script itself, on a CPU

(or `python -m benchmarks.gpu_check ...` from the repository root). Each step runs the real
command line (`python -m fundusfm ...`, torchrun) in a subprocess with its own timeout; a
step that fails is recorded with its reason and the next one still runs (`check_runner.py`).
Data is generated into a temporary folder; DRIVE is read from ../shared/data/DRIVE (--drive).

    bench_a    `bench run --preset gpu --only a`: a training epoch through the cache and the
               loader vs on batches already on the GPU (ResNet-50, 512 px, AMP, channels_last)
    bench_c    `bench run --preset gpu --only c`: eager vs ONNX Runtime (CUDA provider) vs
               torch.compile at 512 px, and `predict` end to end on CUDA
    synth      `synth` + `split`: 200 photographs at 640 px, as `demo --full` makes them
    demo_cell  `finetune`: one cell of `demo --full` (ResNet-50 FF at 512 px), 1 epoch
    segment    `data import drive` + `segment train --config configs/segment.yaml`, 3 epochs
    torchrun   the demo cell under `torchrun --nproc_per_node 1` with NCCL and
               train.sync_batchnorm=true (both read back from DDP's own log)
    ddp_gloo   LF on the one GPU vs 2 processes with gloo (on the CPU: there is no second
               GPU): the same scores to fp32 rounding

Prints PASS / FAIL / SKIP lines, then one JSON object of figures (also written to --json).
Exit status: 0 every step passed or was skipped, 1 a step failed, 2 no CUDA device.
`--cpu-dry-run` runs every step on the CPU at tiny sizes (ResNet-10, 64 px, 1 epoch, gloo,
generated vessels) to check the script itself where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from benchmarks.check_runner import Check, StepFailed, needs, run_steps

from fundusfm.io import json_safe, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# DRIVE beside the checkout (../shared/data) or inside it (shared/data: the device machine's
# copy of the working tree carries shared/ there when the checkout has one)
DRIVES = [ROOT / "shared" / "data" / "DRIVE", ROOT.parent / "shared" / "data" / "DRIVE"]
DRIVE = next((d for d in DRIVES if d.is_dir()), DRIVES[-1])
NO_CUDA = "no CUDA device: run with --cpu-dry-run to check the script on CPU"
PENDING = "CPU dry run at tiny sizes: the script checked end to end; the GPU figures are pending"
# One cell of `fundusfm demo --full`: demo.FULL_PRESET's grid.base settings, 1 epoch.
FULL_CELL = ["model.arch=resnet50", "data.resolution=512", "train.lr=0.0001", "train.workers=8"]
TINY = ["model.arch=resnet10", "data.resolution=64", "train.epochs=1"]


@dataclass(frozen=True)
class Mode:
    """The sizes and settings of one kind of run: the GPU check or the CPU dry run."""

    name: str
    device: str
    bench: list[str]  # the preset flags of `bench run`
    synth: tuple[int, int, int]  # `synth`: images, side in pixels, worker processes
    split: list[str]
    cell: list[str]  # `finetune --set` of the demo cell (and of the torchrun step)
    segment: list[str]
    equivalence: list[str]  # `finetune --set` of both sides of ddp_gloo
    sync_batchnorm: bool
    backend: str
    tolerance: float  # ddp_gloo: the largest |score difference| allowed
    timeouts: tuple[int, ...]  # seconds of each step, in STEPS order
    budget_s: int
    threads: int = 1  # OMP threads of each of ddp_gloo's 2 processes


GPU = Mode(
    "gpu",
    "cuda",
    ["--preset", "gpu"],
    (200, 640, 0),
    ["--folds", "5", "--fractions", "1", "--val-fraction", "0.15"],
    [*FULL_CELL, "train.epochs=1"],
    ["train.epochs=3"],
    ["model.arch=resnet18", "data.resolution=224", "train.epochs=2", "train.batch_size=16"],
    sync_batchnorm=True,
    backend="nccl",
    tolerance=1e-3,  # fp32 on both sides (NVIDIA_TF32_OVERRIDE=0); GPU vs CPU summation order
    timeouts=(70, 120, 25, 75, 70, 55, 45),  # 460 s
    budget_s=470,  # under 8 minutes with the script's own start and the JSON
    threads=max(1, (os.cpu_count() or 2) // 2),
)
DRY = Mode(
    "cpu-dry-run",
    "cpu",
    ["--preset", "quick", "--rounds", "1"],
    (32, 96, 1),
    ["--folds", "3", "--fractions", "1", "--val-fraction", "0.3"],
    [*TINY, "train.batch_size=8", "train.workers=0"],
    [*TINY, "data.fov_diameter=null"],  # segment.yaml's 540 px FOV does not fit 64 px
    [*TINY, "train.batch_size=8"],
    sync_batchnorm=False,  # PyTorch has no SyncBatchNorm on the CPU
    backend="gloo",
    tolerance=1e-5,  # both sides on the CPU: float summation order only
    timeouts=(240,) * 7,
    budget_s=1200,
)


def sets(assignments: list[str]) -> list[str]:
    return [part for a in assignments for part in ("--set", a)]


def bench_rows(c: Check, only: str) -> list[dict]:
    """`bench run` rows of one group; a failed row fails the step, and so does no CUDA row
    on the GPU (ONNX Runtime without its CUDA provider is a row that says so, not a fail)."""
    out = c.work / f"bench_{only}.json"
    c.run(["bench", "run", *c.mode.bench, "--only", only, "--json", out])
    rows = read_json(out)["rows"]
    failed = [f"{r['id']}: {r['reason']}" for r in rows if r["status"] == "failed"]
    if failed:
        raise StepFailed("; ".join(failed))
    on_cuda = [r for r in rows if r["status"] == "ok" and "cuda" in r["setting"]]
    if c.mode.device == "cuda" and not on_cuda:
        raise StepFailed("no row ran on CUDA")
    return rows


def figure(r: dict, keys: str) -> dict:
    values = r.get("values", {})
    shown = {"status": r["status"], "setting": r["setting"], "ratio": r["ratio"]}
    shown |= {k: values[k] for k in keys.split() if k in values}
    return shown | ({"reason": r["reason"]} if r["reason"] else {})


def step_bench_a(c: Check) -> dict:
    keys = "loader_images_per_s memory_images_per_s steps_per_epoch"
    return {r["id"]: figure(r, keys) | {"goal_met": r["met"]} for r in bench_rows(c, "a")}


def step_bench_c(c: Check) -> dict:
    keys = "images_per_s setup_s max_abs_diff_vs_eager default_images_per_s eager_images_per_s"
    return {r["id"]: figure(r, f"{keys} default_engine same_decisions") for r in bench_rows(c, "c")}


def step_synth(c: Check) -> dict:
    data, (n, size, workers) = c.work / "synth", c.mode.synth
    c.run(["synth", data, "--n", n, "--size", size, "--workers", workers, "--seed", 2, "-q"])
    splits = ["--out", data / "splits.csv", *c.mode.split, "--task", "abnormal"]
    c.run(["split", data / "manifest.csv", *splits])
    return {"images": n, "size": size, "split": c.mode.split}


def finetune(c: Check, out: Path, overrides: list[str], env=None, torchrun: int = 0) -> dict:
    """`fundusfm finetune` on the generated set from scratch; the run's headline metrics."""
    data = c.work / "synth"
    shared = [f"data.manifest={data / 'manifest.csv'}", f"data.splits={data / 'splits.csv'}"]
    shared += ["model.init=scratch", "train.select_metric=loss", f"run.out={out}"]
    args = ["finetune", "--config", CONFIGS / "finetune.yaml", *sets([*shared, *overrides])]
    start = time.perf_counter()
    output = c.run([*args, "-q"], env=env, torchrun=torchrun)
    m = read_json(out / "metrics.json")
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "test_auroc": m["test"]["auroc"],
        "train_images": m["labelled"]["train_images"],
        "train_loss": [h["train_loss"] for h in m["history"]],
        "output": output,
    }


def step_demo_cell(c: Check) -> dict:
    needs(c, "synth")
    run = finetune(c, c.work / "cell", [*c.mode.cell, f"train.device={c.mode.device}"])
    run.pop("output")
    return {"settings": c.mode.cell, **run}


def max_score_diff(a: Path, b: Path) -> float:
    x, y = pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv")
    if list(x["image_id"]) != list(y["image_id"]):
        raise StepFailed(f"{a.name} and {b.name} scored different images")
    cols = [col for col in x.columns if col.startswith("score_")]
    return float((x[cols] - y[cols]).abs().to_numpy().max())


def segment_data(c: Check) -> tuple[list[str], dict]:
    """The segmentation data: DRIVE on the GPU (imported in the dry run too, where it is
    here), the generated set's vessel masks in the dry run."""
    figures: dict = {}
    if c.drive.is_dir():
        manifest = c.work / "drive" / "manifest.csv"
        c.run(["data", "import", "drive", c.drive, "--out", manifest, "-q"])
        figures["drive_images"] = len(pd.read_csv(manifest))
        if c.mode.device == "cuda":
            return [f"data.manifest={manifest}"], figures | {"data": "DRIVE"}
    needs(c, "synth")
    data = c.work / "synth"
    found = [f"data.manifest={data / 'manifest.csv'}", f"data.splits={data / 'splits.csv'}"]
    if c.mode.device == "cuda":  # the step still runs, on generated vessels, and says so
        missing = f"generated vessels: DRIVE not found at {c.drive} (pass --drive PATH)"
        return found, figures | {"data": missing}
    return found, figures | {"data": "generated vessels (dry run)"}


def step_segment(c: Check) -> dict:
    data, figures = segment_data(c)
    out = c.work / "segment"
    overrides = [*data, *c.mode.segment, "model.init=scratch", f"train.device={c.mode.device}"]
    start = time.perf_counter()
    config = ["--config", CONFIGS / "segment.yaml"]
    c.run(["segment", "train", *config, *sets([*overrides, f"run.out={out}"]), "-q"])
    m = read_json(out / "metrics.json")
    return figures | {
        "wall_s": round(time.perf_counter() - start, 1),
        "test": {k: m["test"][k] for k in ("dice", "auroc", "cldice")},
        "train_loss": [h["train_loss"] for h in m["history"]],
    }


def ddp_log(output: str) -> dict:
    """backend_name, world_size and has_sync_bn of DDP's "DDP Initialized with:" log."""
    if "DDP Initialized with:" not in output:
        raise StepFailed("no DDP initialisation in the output: the job did not run under DDP")
    found = {}
    for line in output.split("DDP Initialized with:", 1)[1].splitlines()[:80]:
        key, _, value = line.partition(": ")
        if key in ("backend_name", "world_size", "has_sync_bn"):
            found[key] = value.strip()
    return found


def step_torchrun(c: Check) -> dict:
    needs(c, "synth")
    sync = f"train.sync_batchnorm={str(c.mode.sync_batchnorm).lower()}"
    overrides = [*c.mode.cell, f"train.device={c.mode.device}", sync]
    env = c.env(TORCH_DISTRIBUTED_DEBUG="INFO", TORCH_CPP_LOG_LEVEL="INFO")
    run = finetune(c, c.work / "torchrun", overrides, env=env, torchrun=1)
    ddp = ddp_log(run.pop("output"))
    sync_bn = "1" if c.mode.sync_batchnorm else "0"
    want = {"backend_name": c.mode.backend, "world_size": "1", "has_sync_bn": sync_bn}
    if ddp != want:
        raise StepFailed(f"DDP ran with {ddp}, expected {want}")
    diff = None  # against the plain run of the same cell (CUDA kernels are not deterministic)
    if c.done.get("demo_cell", {}).get("status") == "pass":
        diff = max_score_diff(c.work / "cell", c.work / "torchrun")
    return {"ddp": ddp, "max_abs_score_diff_vs_demo_cell": diff, **run}


def step_ddp_gloo(c: Check) -> dict:
    needs(c, "synth")
    off = ["train.amp='off'", "train.channels_last='off'"]  # quoted: YAML reads off as false
    base = [*c.mode.equivalence, "method=lf", "model.head=linear", "train.workers=0", *off]
    one, two = c.work / "one", c.work / "two"
    plain = c.env(NVIDIA_TF32_OVERRIDE="0")  # fp32 convolutions on the GPU, as on the CPU
    first = finetune(c, one, [*base, f"train.device={c.mode.device}"], env=plain)
    env = c.env(OMP_NUM_THREADS=str(c.mode.threads))
    second = finetune(c, two, [*base, "train.device=cpu"], env=env, torchrun=2)
    diff = max_score_diff(one, two)
    if not diff <= c.mode.tolerance:
        raise StepFailed(f"scores differ by {diff:.2e} > {c.mode.tolerance:.0e}")
    return {
        "sides": f"1 process on {c.mode.device} vs 2 gloo processes on the cpu",
        "max_abs_score_diff": diff,
        "tolerance": c.mode.tolerance,
        "settings": base,
        "wall_s": [first["wall_s"], second["wall_s"]],
    }


FUNCTIONS = {
    "bench_a": step_bench_a,
    "bench_c": step_bench_c,
    "synth": step_synth,
    "demo_cell": step_demo_cell,
    "segment": step_segment,
    "torchrun": step_torchrun,
    "ddp_gloo": step_ddp_gloo,
}
STEPS = tuple(FUNCTIONS)


def machine() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": sys.executable,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if cuda else None,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU, tiny")
    p.add_argument("--json", type=Path, help="also write the JSON of figures here")
    p.add_argument("--only", help=f"comma-separated steps of {', '.join(STEPS)}")
    p.add_argument("--drive", type=Path, default=DRIVE, help="the DRIVE folder")
    p.add_argument("--work", type=Path, help="keep the generated data and runs here")
    p.add_argument("--inject-failure", metavar="STEP", help="give STEP a wrong option (tests)")
    return p.parse_args(argv)


def check(args: argparse.Namespace, mode: Mode, steps: list[str]) -> dict:
    work = args.work or Path(tempfile.mkdtemp(prefix="fundusfm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = "1" if mode.device == "cpu" else None  # the dry run shares 2 cores politely
    c = Check(mode, work, args.drive, args.inject_failure, threads)
    timeouts = dict(zip(STEPS, mode.timeouts, strict=True))
    try:
        done = run_steps(c, {s: FUNCTIONS[s] for s in steps}, timeouts, mode.budget_s)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    note = PENDING if mode.device == "cpu" else ""
    return {"check": "fundusfm GPU check", "mode": mode.name, "note": note, **done} | {
        "machine": machine(),
        "budget_s": mode.budget_s,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_CUDA)
        return 2
    wanted = args.only.split(",") if args.only else list(STEPS)
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        print(f"--only: unknown steps {', '.join(unknown)}; choose from {', '.join(STEPS)}")
        return 2
    steps = [s for s in STEPS if s in wanted]
    report = check(args, DRY if args.cpu_dry_run else GPU, steps)
    print(json.dumps(json_safe(report), indent=2, default=str))
    if args.json:
        write_json(args.json, report)
    return 1 if report["summary"]["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
