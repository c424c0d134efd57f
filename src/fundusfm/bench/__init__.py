"""Benchmarks that print measured figures (never pass/fail): `fundusfm bench ...`."""

from fundusfm.bench.lf_cache import bench_cache, bench_lf

__all__ = ["bench_cache", "bench_lf"]
