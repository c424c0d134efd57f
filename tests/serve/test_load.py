"""50 concurrent uploads through a real uvicorn server on localhost: none fails, and each
answer (Grad-CAM overlays included) equals the answer to the same upload sent alone; and a
30 MB upload is refused with 413 by the real server, which goes on serving. The timing is
`benchmarks/serve_load.py`'s; nothing here is timed."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import httpx
import numpy as np
import pytest
from PIL import Image

from fundusfm.serve.app import create_app
from fundusfm.serve.server import background
from tests.serve.conftest import SETTINGS, same

pytestmark = pytest.mark.slow
FILES = ["good.png", "gray.png", "cmyk.jpg", "exif rotated.jpg", "black.png"]


def _ask(client: httpx.Client, served, name: str, gradcam: bool) -> tuple[int, dict]:
    files = {"file": (name, (served.folder / name).read_bytes())}
    answer = client.post("/v1/predict", params={"gradcam": str(gradcam).lower()}, files=files)
    return answer.status_code, answer.json()


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(base64.b64decode(row["gradcam_png"]))), dtype=int)


def _equal(alone: dict, together: dict) -> bool:
    if set(alone) != set(together):
        return False
    if "gradcam_png" in alone and np.abs(_pixels(alone) - _pixels(together)).max() > 1:
        return False
    return all(same(alone[k], together[k]) for k in alone if k != "gradcam_png")


def test_fifty_concurrent_requests_all_succeed_with_the_single_request_answers(served):
    jobs = [(FILES[i % len(FILES)], i % 2 == 0) for i in range(50)]
    with background(served.app) as url, httpx.Client(base_url=url, timeout=120) as client:
        alone = {job: _ask(client, served, *job) for job in set(jobs)}
        with ThreadPoolExecutor(50) as pool:
            together = list(pool.map(lambda job: _ask(client, served, *job), jobs))
    assert all(status == 200 for status, _ in alone.values())
    assert [status for status, _ in together] == [200] * 50
    for job, (_, row) in zip(jobs, together, strict=True):
        assert _equal(alone[job][1], row), job
    assert {row["status"] for _, row in together} == {"scored", "ungradable"}


def test_the_real_server_refuses_a_30_mb_upload_early_and_keeps_serving(served):
    small = create_app(served.bundle, SETTINGS.model_copy(update={"max_upload_bytes": 100_000}))
    with background(small) as url, httpx.Client(base_url=url, timeout=60) as client:
        big = client.post("/v1/predict", files={"file": ("big.png", b"\0" * 30_000_000)})
        assert big.status_code == 413 and big.json()["error"] == "too_large"
        assert _ask(client, served, "good.png", False)[1]["status"] == "scored"
