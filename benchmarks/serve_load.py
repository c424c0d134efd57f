"""Load test of `fundusfm serve`: N concurrent uploads to POST /v1/predict on localhost.

Starts the real command (`python -m fundusfm serve BUNDLE --port 0`) in its own process,
reads the port it bound from the address it prints, waits until GET /v1/model answers,
sends one untimed warm-up upload, then fires `--requests` uploads at once (`--concurrency`
connections, asyncio + httpx) of a few generated fundus photographs (JPEG, `--size` px) and
prints the errors, the latency of each upload from send to answer (p50, p95, max), the wall
time and the uploads per second. The bundle defaults to a random-weight ResNet-10 at 64 px
(`fundusfm.bench.screening`), or any classifier bundle with `--bundle`.

    python benchmarks/serve_load.py [--bundle B] [--requests 50] [--gradcam] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from fundusfm.bench.screening import random_bundle
from fundusfm.config.core import SynthConfig
from fundusfm.synthetic.generate import sample_patient
from fundusfm.synthetic.render import render_eye


def photographs(n: int, size: int) -> list[bytes]:
    """`n` generated fundus photographs as JPEG bytes."""
    cfg = SynthConfig(size=size, seed=11)
    out = []
    for i in range(n):
        eye = render_eye(size, sample_patient(cfg, i)[0], cfg.camera, np.random.default_rng(i))
        jpeg = BytesIO()
        Image.fromarray(eye.image).save(jpeg, format="JPEG", quality=92)
        out.append(jpeg.getvalue())
    return out


SAID = "fundusfm serve: "  # the line serve prints once its port is bound


def start(bundle: Path, sets: list[str], log) -> subprocess.Popen:
    """The server on a port the system chooses (`--port 0`: no race for a free port), its
    log (uvicorn's, one line per request) into the file `log`, never a pipe left full."""
    command = [sys.executable, "-m", "fundusfm", "serve", str(bundle), "--port", "0"]
    command += [x for kv in sets for x in ("--set", kv)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)


def exited(log) -> SystemExit:
    log.seek(0)
    return SystemExit(f"the server exited: {log.read().decode(errors='replace')[-2000:]}")


def bound_url(server: subprocess.Popen, log) -> str:
    """The address the server says it listens on (`fundusfm serve: http://HOST:PORT/ ...`)."""
    for line in server.stdout:
        if line.startswith(SAID):
            return line[len(SAID) :].split()[0].rstrip("/")
    raise exited(log)


def wait_ready(url: str, server: subprocess.Popen, log, timeout: float = 300) -> dict:
    start_time = time.monotonic()
    while time.monotonic() - start_time < timeout:
        if server.poll() is not None:
            raise exited(log)
        try:
            return httpx.get(url + "/v1/model", timeout=5).json()
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not answer within {timeout:.0f} s")


async def fire(url: str, images: list[bytes], n: int, concurrency: int, gradcam: bool):
    """Send `n` uploads at once; returns (latencies in s, errors, wall time in s)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    params = {"gradcam": "true"} if gradcam else {}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> tuple[float, str | None]:
            sent = time.perf_counter()
            files = {"file": (f"eye{i}.jpg", images[i % len(images)], "image/jpeg")}
            try:
                answer = await client.post("/v1/predict", files=files, params=params)
                failed = None if answer.status_code == 200 else f"{answer.status_code}"
            except httpx.HTTPError as exc:
                failed = type(exc).__name__
            return time.perf_counter() - sent, failed

        await one(0)  # warm-up, not counted
        began = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - began
    return [r[0] for r in results], [r[1] for r in results if r[1]], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="default: random ResNet-10, 64 px")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=50, help="connections at once")
    parser.add_argument("--size", type=int, default=512, help="side of the photographs, px")
    parser.add_argument("--gradcam", action="store_true", help="ask for Grad-CAM overlays")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="serve setting")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="fundusfm-serve-load-") as tmp,
        tempfile.TemporaryFile() as log,
    ):
        bundle = args.bundle or random_bundle("resnet10", 64, Path(tmp) / "bundle")
        server = start(bundle, args.sets, log)
        try:
            url = bound_url(server, log)
            info = wait_ready(url, server, log)
            images = photographs(5, args.size)
            latency, errors, wall = asyncio.run(
                fire(url, images, args.requests, args.concurrency, args.gradcam)
            )
        finally:
            server.terminate()
            server.wait(30)
    p50, p95 = np.percentile(latency, [50, 95])
    print(
        f"{info['name']}, {info['preprocessing']['resolution']} px, engine "
        f"{info['server']['engine']}, max_concurrent {info['server']['max_concurrent']}, "
        f"{args.size} px JPEGs{', gradcam' if args.gradcam else ''}"
    )
    print(f"requests {args.requests}, concurrency {args.concurrency}, errors {len(errors)}")
    print(f"latency p50 {p50:.3f} s, p95 {p95:.3f} s, max {max(latency):.3f} s")
    print(f"wall {wall:.2f} s, {args.requests / wall:.1f} requests/s")
    if errors:
        print("errors: " + ", ".join(sorted(set(errors))))
        sys.exit(1)


if __name__ == "__main__":
    main()
