"""Row (d): peak memory while streaming a large cache through the training loader.

For each size N, a cache of exactly N images at 512 px is made from one preprocessed image
(hard links: no disk cost, see `workspace.replicated_cache`), and the training loader -
`CachedImages` with augmentation, shuffled, `workers` processes - streams all of it once,
each batch normalised as training does. Each size runs in a fresh Python process, so one
measurement's peak cannot leak into the next; the peaks at N and 10 x N, and what the cache
index and dataset hold per image (tracemalloc), show whether memory grows with the data set.

Memory is the peak, read after every batch (while that batch, as uint8 and as float, and
the workers' next batches are held), of the proportional set size (PSS: shared pages split
between the processes sharing them) summed over the main process and its loader workers,
read from /proc. Where /proc is missing it is an upper bound from `resource.getrusage`: the
main process's peak plus each worker at the largest worker's peak (pages shared with the
parent counted once per process). The cache's files are one inode, so reads come from the
page cache: this row measures memory, not disk speed. Run to run, a worker may once take
over the parent's free heap pages (glibc), about 0.2 GB each; see benchmarks/RESULTS.md.

Run as `python -m fundusfm.bench.memory CACHE_DIR IMAGES BATCH WORKERS`; prints JSON.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from fundusfm.bench.workspace import replicated_cache
from fundusfm.config.core import AugmentConfig
from fundusfm.data.datasets import CachedImages
from fundusfm.data.preprocess import ImageCache
from fundusfm.data.transforms import normalise

PROC = Path("/proc")


def _kb(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in (PROC / str(pid) / "task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_pss_kb(pid: int) -> int:
    """PSS of a process and its children in KiB (RSS where smaps_rollup is missing)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            rollup = PROC / str(p) / "smaps_rollup"
            if rollup.exists():
                total += _kb(rollup, "Pss:")
            else:
                total += _kb(PROC / str(p) / "status", "VmRSS:")
        except (OSError, ValueError):  # a worker that just exited
            continue
    return total


def _maxrss_mb(who: int) -> float:
    """Peak RSS from getrusage. For this process, /proc's VmHWM where present: ru_maxrss
    survives exec, so a child started by a large process would report the parent's peak."""
    status = PROC / "self" / "status"
    if who == resource.RUSAGE_SELF and status.exists():
        return _kb(status, "VmHWM:") / 1024
    kb = resource.getrusage(who).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS


def stream(cache_dir: Path, images: int, batch_size: int, workers: int) -> dict:
    """Stream the first `images` entries of a cache through the training loader, once."""

    start = time.perf_counter()
    tracemalloc.start()  # what the cache index and the dataset keep, per image
    cache = ImageCache(cache_dir)
    sources = [Path(s) for s in list(cache.index)[:images]]
    dataset = CachedImages(cache, sources, np.zeros(len(sources), dtype=int), AugmentConfig())
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=True,
        sampler=RandomSampler(range(len(dataset)), generator=torch.Generator().manual_seed(0)),
        num_workers=workers,
    )
    seen, peak_kb, samples = 0, 0, 0
    sampling = (PROC / str(os.getpid()) / "task").is_dir()
    for batch, _, _ in loader:
        x = normalise(batch)
        seen += len(x)
        if sampling:  # while this batch (uint8 and float) and the workers' next ones are held
            peak_kb, samples = max(peak_kb, tree_pss_kb(os.getpid())), samples + 1
        del batch, x
    seconds = time.perf_counter() - start
    del loader  # joins the workers, so that their peaks count in RUSAGE_CHILDREN
    main, child = _maxrss_mb(resource.RUSAGE_SELF), _maxrss_mb(resource.RUSAGE_CHILDREN)
    bound = main + workers * child
    return {
        "images": seen,
        "dataset_held_mb": held / 2**20,
        "seconds": seconds,
        "images_per_s": seen / seconds,
        "peak_mb": peak_kb / 1024 if samples else bound,
        "measure": "PSS of main + workers, after every batch" if samples else "rusage bound",
        "samples": samples,
        "main_maxrss_mb": main,
        "worker_maxrss_mb": child,
        "rusage_bound_mb": bound,
    }


def measure(cache_dir: Path, images: int, batch_size: int, workers: int) -> dict:
    """`stream` in a fresh interpreter: its own peak, free of what this process holds."""
    args = [str(cache_dir), str(images), str(batch_size), str(workers)]
    done = subprocess.run(
        [sys.executable, "-m", "fundusfm.bench.memory", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"memory stream failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_memory(
    source: Path, resolution: int, sizes: list[int], batch_size: int, workers: int
) -> dict:
    """Peak memory streaming caches of each size; the cache is made in, and removed with, a
    temporary folder."""

    runs = {}
    with tempfile.TemporaryDirectory(prefix="fundusfm-bench-cache-") as tmp:
        for n in sorted(sizes):  # a cache of exactly n images: its index is n rows
            cache = replicated_cache(Path(tmp) / f"cache{n}", source, resolution, n)
            runs[n] = measure(cache.dir, n, batch_size, workers)
    small, large = runs[min(sizes)], runs[max(sizes)]
    per_image_kb = (
        (large["dataset_held_mb"] - small["dataset_held_mb"]) * 1024 / (max(sizes) - min(sizes))
    )
    return {
        "setting": f"{resolution} px, batch {batch_size}, workers {workers}, augmented",
        "runs": {str(n): r for n, r in runs.items()},
        "peak_mb_small": small["peak_mb"],
        "peak_mb_large": large["peak_mb"],
        "dataset_kb_per_image": per_image_kb,
        "ratio": large["peak_mb"] / small["peak_mb"],
    }


if __name__ == "__main__":  # pragma: no cover - run by `measure` in a subprocess
    cache_arg, images_arg, batch_arg, workers_arg = sys.argv[1:5]
    result = stream(Path(cache_arg), int(images_arg), int(batch_arg), int(workers_arg))
    print(json.dumps(result))
