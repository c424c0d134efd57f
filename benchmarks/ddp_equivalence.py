"""One process against N under torchrun, same config and global batch: how far apart do they end?

Runs `fundusfm finetune` once plainly and once under `torchrun --nproc_per_node N` (CPU, gloo,
unless --device cuda), then prints each run's validation/test metrics and the largest score
difference. LF runs (frozen BatchNorm) should agree to float rounding; FF runs differ by the
per-process BatchNorm statistics (or not at all with train.sync_batchnorm on GPUs).

    python benchmarks/ddp_equivalence.py --out runs/ddp -- --config C --set method=ff ...

Everything after `--` goes to `fundusfm finetune` (it must not set run.out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

KEYS = ("auroc", "auprc", "balanced_accuracy", "accuracy")


def run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ddp"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("finetune_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    extra = [a for a in args.finetune_args if a != "--"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    one, many = args.out / "one", args.out / f"n{args.nproc}"
    finetune = ["-m", "fundusfm", "finetune", "-q", *extra]
    seconds = {
        "1 process": run([sys.executable, *finetune, "--set", f"run.out={one}"], env),
        f"{args.nproc} processes": run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(args.nproc), *finetune, "--set", f"run.out={many}"],
            env,
        ),
    }  # fmt: skip
    rows = []
    for (name, secs), folder in zip(seconds.items(), (one, many), strict=True):
        metrics = json.loads((folder / "metrics.json").read_text())
        for part in ("val", "test"):
            if part in metrics:
                shown = {k: metrics[part].get(k) for k in KEYS}
                rows.append({"run": name, "part": part, "seconds": round(secs), **shown})
    print(pd.DataFrame(rows).to_string(index=False))
    a, b = pd.read_csv(one / "predictions.csv"), pd.read_csv(many / "predictions.csv")
    cols = [c for c in a.columns if c.startswith("score_")]
    print(f"largest score difference: {(a[cols] - b[cols]).abs().to_numpy().max():.2e}")


if __name__ == "__main__":
    main()
