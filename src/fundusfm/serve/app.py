"""The web app and JSON API of `fundusfm serve` (`create_app`).

    GET  /             the page (page.html, page.js, page.css: plain files, no build step)
    GET  /v1/model     the bundle's model card as JSON (`model_info`)
    POST /v1/predict   one image (multipart field `file`) -> its predictions.csv row as JSON;
                       `?gradcam=true` adds `gradcam_png`, a base64 PNG overlay
    GET  /docs         the OpenAPI page (/openapi.json) in Swagger UI, its files served
                       from the fastapi-offline package (FastAPI's default loads them from
                       a CDN: a blank page on a machine without internet); /redoc likewise
Every refusal is a JSON `{"error": NAME, "detail": WHAT TO DO, "file": ...}` with a 4xx
status (503 when too many uploads wait), and the server keeps serving. The bundle, its
scorer and its shift scorer are loaded once, in `create_app`; each upload is scored in a
pool of `max_concurrent` threads, and the others wait their turn (at most `max_waiting`).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline

from fundusfm import __version__
from fundusfm.config.serve import ServeConfig
from fundusfm.models.loaded import load_bundle
from fundusfm.serve.model_info import json_safe, model_info
from fundusfm.serve.screening import Screener
from fundusfm.serve.upload import FIELD, UploadRefused, read_upload

ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}
# The page loads nothing from elsewhere; overlays arrive as data: URLs
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:",
    "X-Content-Type-Options": "nosniff",
}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {FIELD: {"type": "string", "format": "binary"}},
                    "required": [FIELD],
                }
            }
        },
    }
}
REFUSALS = {
    400: {"description": "not a multipart form, no `file` field, or a bad query"},
    413: {"description": "the upload is over max_upload_bytes"},
    415: {"description": "not an image format fundusfm reads (the file name's suffix)"},
    422: {"description": "unreadable: truncated, empty, not an image, decompression bomb"},
    503: {"description": "too many uploads waiting; retry later"},
}


class Gate:
    """At most `concurrent` uploads scored at once, in threads; `waiting` more may queue."""

    def __init__(self, concurrent: int, waiting: int):
        self.concurrent, self.room = concurrent, concurrent + waiting
        self.inside, self.lock, self.pool = 0, threading.Lock(), None

    async def run(self, fn, *args):
        with self.lock:
            if self.inside >= self.room:
                busy = f"the server is busy: {self.inside} uploads are being scored or wait"
                raise UploadRefused(503, "busy", busy + " (setting max_waiting); retry soon")
            self.inside += 1
            if self.pool is None:  # first upload, or the first since the server stopped
                self.pool = ThreadPoolExecutor(self.concurrent, "fundusfm-serve")
            pool = self.pool
        try:
            return await asyncio.wrap_future(pool.submit(fn, *args))
        finally:
            with self.lock:
                self.inside -= 1

    def close(self) -> None:
        """Stop the threads (when the server stops); a later upload starts new ones."""
        with self.lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _asset(name: str) -> str:
    return (files("fundusfm.serve") / name).read_text("utf-8")


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadRefused)
    async def refused(_: Request, exc: UploadRefused) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        said = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(400, "bad_request", said)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:  # a bug: still JSON
        return _error(500, "internal", f"{type(exc).__name__}: {exc}; please report it")


def _pages(app: FastAPI) -> None:
    page, assets = _asset("page.html"), {name: _asset(name) for name in ASSETS}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in assets:
            return _error(404, "not_found", f"no such file: {name}")
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)


def _api(app: FastAPI, screener: Screener, info: dict, settings: ServeConfig) -> None:
    gate = Gate(settings.max_concurrent, settings.max_waiting)
    app.state.gate = gate

    @app.get("/v1/model", summary="The bundle's model card")
    async def model() -> JSONResponse:
        return JSONResponse(info)

    @app.post(
        "/v1/predict",
        summary="Screen one photograph: its predictions.csv row",
        openapi_extra=UPLOAD_BODY,
        responses=REFUSALS,
    )
    async def predict(
        request: Request,
        gradcam: bool = Query(False, description="add `gradcam_png`, a base64 PNG overlay"),
    ) -> JSONResponse:
        if gradcam and not settings.gradcam:
            raise UploadRefused(400, "gradcam_off", "Grad-CAM is off here (setting gradcam)")
        headers = request.headers
        upload = await read_upload(
            request.stream(),
            headers.get("content-type", ""),
            headers.get("content-length"),
            settings.max_upload_bytes,
        )
        return JSONResponse(json_safe(await gate.run(screener.row, upload, gradcam)))


def create_app(bundle_path: Path, settings: ServeConfig | None = None) -> FastAPI:
    """The app serving `bundle_path` (a classifier bundle), loaded and ready to score."""
    settings = settings or ServeConfig()
    screener = Screener(load_bundle(bundle_path, settings.device), settings)
    info = model_info(screener.bundle, screener.score.engine, screener.notes, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.gate.close()

    app = FastAPIOffline(  # FastAPI, with /docs and /redoc from local files
        title="fundusfm serve",
        version=__version__,
        description=f"Screening with {info['name']}: one photograph per request.",
        lifespan=lifespan,
    )
    _handlers(app)
    _pages(app)
    _api(app, screener, info, settings)
    return app
