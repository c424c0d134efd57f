"""One tiny bundle, the robustness corpus, predict's table of it and one app, shared by the
serve tests (package scope: built once)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fundusfm.bench.screening import random_bundle
from fundusfm.config.serve import ServeConfig
from fundusfm.screen.predict import screen
from fundusfm.serve.app import create_app
from tests.conftest import TINY_ARCH
from tests.e2e.test_robustness import make_corpus
from tests.fakes import camera_frame

SETTINGS = ServeConfig(engine="torch")  # the ONNX engine's equality: tests/screen/test_engine


@pytest.fixture(scope="package")
def served(tmp_path_factory) -> SimpleNamespace:
    """`bundle`, `folder` (docs/robustness.md's image corpus plus a black image), `table`
    (what `predict` says of each file, by file), `predicted` (predict's output folder: its
    predictions.csv), `app` and its TestClient `client`."""
    root = tmp_path_factory.mktemp("serve")
    bundle = random_bundle(TINY_ARCH, 64, root / "bundle")
    folder = root / "corpus"
    make_corpus(folder, camera_frame(3)[0])
    Image.new("RGB", (96, 96)).save(folder / "black.png")  # no field of view: ungradable
    # one image a batch, as serve scores them: a batch of 32 changes the 8th digit
    out = root / "predicted"
    done = screen(bundle, folder, out, batch_size=1, workers=0, progress=False, engine="torch")
    app = create_app(bundle, SETTINGS)
    table = done.table.set_index("file", drop=False)
    return SimpleNamespace(
        bundle=bundle,
        folder=folder,
        table=table,
        predicted=root / "predicted",
        app=app,
        client=TestClient(app),
    )


OCTETS = "application/octet-stream"  # what a client sends when it does not know the type


def multipart(
    name: bytes | str, data: bytes, field: str = "file", kind: str = OCTETS
) -> tuple[bytes, str]:
    """A multipart/form-data body with one file, its name sent as raw bytes (as a browser
    sends any name) and its part's Content-Type `kind`, and the body's content type."""
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    boundary = "fundusfm-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="'
    tail = f'"\r\nContent-Type: {kind}\r\n\r\n'
    body = head.encode() + raw + tail.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(client, name: bytes | str, data: bytes, query: str = "", kind: str = OCTETS):
    body, form = multipart(name, data, kind=kind)
    return client.post(f"/v1/predict{query}", content=body, headers={"content-type": form})


def page_row(answer) -> dict:
    """The row the page keeps of an answer: the API's row, or for a refusal its file, the
    error's name as status and its detail as reason (page.js `score`)."""
    body = answer.json()
    if answer.status_code == 200:
        return body
    return {"file": body["file"], "status": body["error"], "reason": body["detail"]}


def same(expected, got, tol: float = 1e-6) -> bool:
    """Table value vs JSON value: both missing (NaN/None), numbers within `tol`, or equal."""
    missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
    if missing(expected) or missing(got):
        return missing(expected) and missing(got)
    if isinstance(expected, bool) or isinstance(got, bool):
        return bool(expected) == bool(got)
    if isinstance(expected, int | float) and isinstance(got, int | float):
        return abs(float(expected) - float(got)) <= tol
    return expected == got


def good_photo(served) -> bytes:
    return (served.folder / "good.png").read_bytes()
