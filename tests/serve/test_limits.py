"""What bounds a server's memory: `max_pixels`, read from the image's header before any pixel
is decoded, and the gate, which a request passes before its body is read."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import zlib
from io import BytesIO

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fundusfm.serve import screening
from fundusfm.serve.app import create_app
from fundusfm.serve.gate import Gate
from tests.serve.conftest import SETTINGS, good_photo, multipart, post


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    body = chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + head + body


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # 144 MP: it is
def test_an_image_over_max_pixels_is_refused_from_its_header_without_decoding(served, monkeypatch):
    decoded = []
    prepare = screening.prepare_item
    monkeypatch.setattr(screening, "prepare_item", lambda *a: decoded.append(a) or prepare(*a))
    big = post(served.client, "huge.png", png_header(12000, 12000))  # 3 * 144 MB decoded
    assert big.status_code == 413 and decoded == []
    assert big.json() == {
        "error": "too_many_pixels",
        "detail": "the image is 12000x12000 (144,000,000 pixels), over the 40,000,000-pixel "
        "limit (setting max_pixels); send a smaller image or raise the limit",
        "file": "huge.png",
    }
    assert post(served.client, "good.png", good_photo(served)).json()["status"] == "scored"
    assert len(decoded) == 1


def test_max_pixels_is_a_setting_and_the_decoders_bomb_limit_stays_predicts(served):
    w, h = Image.open(BytesIO(good_photo(served))).size
    tight = TestClient(
        create_app(served.bundle, SETTINGS.model_copy(update={"max_pixels": w * h - 1}))
    )
    refused = post(tight, "good.png", good_photo(served))
    assert refused.status_code == 413 and f"{w}x{h}" in refused.json()["detail"]
    roomy = TestClient(create_app(served.bundle, SETTINGS.model_copy(update={"max_pixels": w * h})))
    assert post(roomy, "good.png", good_photo(served)).status_code == 200
    bomb = post(tight, "bomb.png", (served.folder / "bomb.png").read_bytes())  # 900 MP
    assert bomb.status_code == 422 and "decompression bomb" in bomb.json()["detail"]
    with pytest.raises(ValueError, match="max_pixels"):
        SETTINGS.model_validate({"max_pixels": 0})


class Client:
    """One request straight to the ASGI app, recording whether its body was read."""

    def __init__(self, app, name: str, data: bytes):
        self.app, self.read, self.sent = app, False, []
        self.body, self.kind = multipart(name, data)

    async def receive(self) -> dict:
        if self.read:
            await asyncio.sleep(3600)  # the client stays; nothing more comes
        self.read = True
        return {"type": "http.request", "body": self.body, "more_body": False}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    async def call(self) -> tuple[int, dict]:
        headers = [(b"content-type", self.kind.encode()), (b"host", b"test")]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1"}
        scope |= {"method": "POST", "scheme": "http", "path": "/v1/predict", "headers": headers}
        scope |= {"raw_path": b"/v1/predict", "query_string": b"", "root_path": ""}
        scope |= {"client": ("127.0.0.1", 1), "server": ("test", 80)}
        await self.app(scope, self.receive, self.send)
        status = next(m["status"] for m in self.sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        return status, json.loads(body)


def test_the_gate_is_passed_before_the_body_is_read(served, monkeypatch):
    """One scored at a time, one waiting: the waiting request's body and the refused one's
    are not read (memory holds max_concurrent bodies, not max_waiting)."""
    app = create_app(
        served.bundle, SETTINGS.model_copy(update={"max_concurrent": 1, "max_waiting": 1})
    )
    release, score = threading.Event(), screening.score_items
    monkeypatch.setattr(screening, "score_items", lambda *a: release.wait(30) and score(*a))
    photo = good_photo(served)
    first, second, third = (Client(app, f"{n}.png", photo) for n in ("a", "b", "c"))

    async def main():
        one, two = asyncio.ensure_future(first.call()), asyncio.ensure_future(second.call())
        await asyncio.sleep(0.3)
        waiting = (first.read, second.read)  # the first is being scored, the second waits
        busy = await third.call()
        release.set()
        return waiting, busy, await one, await two

    waiting, busy, one, two = asyncio.run(main())
    assert waiting == (True, False)
    assert busy[0] == 503 and busy[1]["error"] == "busy" and not third.read
    assert one[0] == two[0] == 200 and second.read
    assert [one[1]["file"], two[1]["file"]] == ["a.png", "b.png"]
    app.state.gate.close()


def test_a_request_that_goes_away_while_waiting_gives_its_place_up():
    gate = Gate(concurrent=1, waiting=2)

    async def main():
        held = gate.turn()
        await held.__aenter__()
        gone = asyncio.ensure_future(gate.run(len, "ab"))
        after = asyncio.ensure_future(gate.run(len, "abc"))
        await asyncio.sleep(0.05)
        gone.cancel()  # its client disconnected while it waited
        await asyncio.sleep(0.05)
        assert (gate.inside, len(gate.queue)) == (2, 1)
        await held.__aexit__(None, None, None)
        return await after

    assert asyncio.run(main()) == 3  # the turn went to the one still waiting
    assert (gate.inside, gate.active, len(gate.queue)) == (0, 0, 0)
    gate.close()
