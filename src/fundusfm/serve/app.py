"""The web app and JSON API of `fundusfm serve` (`create_app`).

    GET  /             the page (`assets`: page.html, page.js, page.css, the report's colours
                       as tones.css; /favicon.ico, so the browser asks nothing in vain)
    GET  /v1/model     the bundle's model card as JSON (`model_info`)
    POST /v1/predict   one image (multipart field `file`) -> its predictions.csv row as JSON
                       (plus `tone`, its colour); `?gradcam=true` adds `gradcam_png`, a
                       base64 PNG overlay
    POST /v1/csv       rows of /v1/predict ({"rows": [...]}) -> the predictions.csv that
                       `fundusfm predict` writes for the same files (`table`)
    GET  /docs         the OpenAPI page (/openapi.json) in Swagger UI, its files served
                       from the fastapi-offline package (FastAPI's default loads them from
                       a CDN: a blank page on a machine without internet); /redoc likewise
Every refusal, an unknown path's 404 included, is a JSON `{"error": NAME, "detail": WHAT TO
DO, "file": ...}` with a 4xx status (503 when too many uploads wait), and the server keeps
serving. The bundle, its scorer and its shift scorer are loaded once, in `create_app`; a
request takes its turn at the `gate.Gate` before its body is read, so at most
`max_concurrent` bodies are in memory and scored at once, and at most `max_waiting` wait.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from fundusfm import __version__
from fundusfm.config.serve import ServeConfig
from fundusfm.data.manifest import printable
from fundusfm.io import json_safe
from fundusfm.models.loaded import load_bundle
from fundusfm.serve.assets import (
    ASSETS,
    FAVICON,
    PAGE_HEADERS,
    REFUSALS,
    ROWS_BODY,
    UPLOAD_BODY,
    read_assets,
)
from fundusfm.serve.gate import Gate
from fundusfm.serve.model_info import model_info
from fundusfm.serve.screening import Screener
from fundusfm.serve.table import parse_rows, predictions_csv
from fundusfm.serve.upload import UploadRefused, check_length, read_body, read_upload

ROUTES = "the page is /, the API POST /v1/predict, POST /v1/csv and GET /v1/model, its help /docs"
HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


def _error(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _http_detail(request: Request, status: int, said: str) -> str:
    where = printable(request.url.path)
    if status == 404:
        return f"nothing at {where}: {ROUTES}"
    if status == 405:
        return f"{request.method} is not answered at {where}: {ROUTES}"
    return said


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(UploadRefused)
    async def refused(_: Request, exc: UploadRefused) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        code, said = exc.status_code, str(exc.detail)
        detail = _http_detail(request, code, said)
        return _error(code, HTTP_ERRORS.get(code, "http_error"), detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        said = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return _error(400, "bad_request", said)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:  # a bug: still JSON
        return _error(500, "internal", f"{type(exc).__name__}: {exc}; please report it")


def _pages(app: FastAPI) -> None:
    assets = read_assets()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(assets["page.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in ASSETS:
            return _error(404, "not_found", f"no such file: {printable(name)}")
        return Response(assets[name], media_type=ASSETS[name], headers=PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(FAVICON, media_type="image/svg+xml")


def _predict(app: FastAPI, screener: Screener, gate: Gate, settings: ServeConfig) -> None:
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
        headers, limit = request.headers, settings.max_upload_bytes
        check_length(headers.get("content-length"), limit)  # refused without waiting
        async with gate.turn():  # the body is read in its turn: bounded memory
            kind, length = headers.get("content-type", ""), headers.get("content-length")
            upload = await read_upload(request.stream(), kind, length, limit)
            row = await gate.score(screener.row, upload, gradcam)
        return JSONResponse(json_safe(row))


def _table(app: FastAPI, gate: Gate, settings: ServeConfig, classes: list) -> None:
    @app.post(
        "/v1/csv",
        summary="Rows of /v1/predict as the predictions.csv `fundusfm predict` writes",
        openapi_extra=ROWS_BODY,
        response_class=Response,
        responses={200: {"content": {"text/csv": {}}}, 400: {"description": "not rows"}},
    )
    async def table(request: Request) -> Response:
        length, limit = request.headers.get("content-length"), settings.max_upload_bytes
        check_length(length, limit)
        async with gate.turn():
            body = await read_body(request.stream(), length, limit)
            text = await gate.score(lambda: predictions_csv(parse_rows(body), classes))
        disposition = {"Content-Disposition": 'attachment; filename="predictions.csv"'}
        return Response(text, media_type="text/csv; charset=utf-8", headers=disposition)


def create_app(bundle_path: Path, settings: ServeConfig | None = None) -> FastAPI:
    """The app serving `bundle_path` (a classifier bundle), loaded and ready to score."""
    settings = settings or ServeConfig()
    bundle = load_bundle(bundle_path, settings.device)
    bundle.require_classifier("serve")
    screener = Screener(bundle, settings)
    info = model_info(screener.bundle, screener.score.engine, screener.notes, settings)
    gate = Gate(settings.max_concurrent, settings.max_waiting)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        gate.close()

    app = FastAPIOffline(  # FastAPI, with /docs and /redoc from local files
        title="fundusfm serve",
        version=__version__,
        description=f"Screening with {info['name']}: one photograph per request.",
        lifespan=lifespan,
    )
    app.state.gate = gate
    _handlers(app)
    _pages(app)

    @app.get("/v1/model", summary="The bundle's model card")
    async def model() -> JSONResponse:
        return JSONResponse(info)

    _predict(app, screener, gate, settings)
    _table(app, gate, settings, screener.bundle.classes)
    return app
