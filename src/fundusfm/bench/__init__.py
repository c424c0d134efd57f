"""Benchmarks that print measured figures (never pass/fail): `fundusfm bench ...`.

`runner` assembles the rows of `bench run` (their sizes: `presets`); `pipeline` (row a),
`lf_cache` (row b and `bench cache`), `screening` (row c) and `memory` (row d) time the real
code: the engine's `Trainer`, the preprocessing cache, the exporter. May import every layer
below the command line (tasks, engine, models, data, config, io, errors), never `cli`.
"""

from fundusfm.bench.lf_cache import bench_cache, bench_lf

__all__ = ["bench_cache", "bench_lf"]
