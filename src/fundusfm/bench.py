"""Benchmarks that print measured figures (never pass/fail): `fundusfm bench ...`.

`bench_cache` measures the preprocessing cache: how fast it is built from the originals, and
how fast a training loader gets normalised tensors from it compared with decoding and
preprocessing the originals every time (what a loader without a cache would do).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .config import ConfigError, PreprocessConfig
from .manifest import Manifest
from .preprocess import ImageCache, build_cache, preprocess_image
from .transforms import normalise, to_tensor


def _rate(fn, items, min_seconds: float = 2.0) -> float:
    """Items per second of `fn` over `items`, repeated until at least `min_seconds` passed."""
    done, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def bench_cache(manifest: Manifest, cfg: PreprocessConfig, limit: int | None = None) -> dict:
    """Build a fresh cache in a temporary folder and time building and reading it."""
    table = manifest.table.head(limit) if limit else manifest.table
    sub = Manifest(path=manifest.path, table=table, spec=manifest.spec, root=manifest.root)
    sources = [sub.image_path(p).resolve() for p in table["path"]]
    with tempfile.TemporaryDirectory() as tmp:
        report = build_cache(sub, cfg, Path(tmp), progress=False)
        if report.errors:
            _, path, reason = report.errors[0]
            raise ConfigError(
                f"{len(report.errors)} images could not be cached (first: {path}: {reason}); "
                "run `fundusfm data check` on the manifest"
            )
        cache = ImageCache(report.directory)
        cached = _rate(lambda s: normalise(to_tensor(cache.read(s))), sources)
        original = _rate(
            lambda s: normalise(to_tensor(preprocess_image(s, cfg)[0])), sources, min_seconds=3.0
        )
    return {
        "images": len(sources),
        "resolution": cfg.resolution,
        "build_images_per_s": report.built / report.seconds,
        "build_workers": cfg.workers,
        "read_cache_images_per_s": cached,
        "decode_preprocess_images_per_s": original,
        "speedup": cached / original,
    }
